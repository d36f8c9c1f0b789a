// The qforge binary as a test runs it: `QFORGE_PROGRESS=0 [env] qforge args 2>&1`, its exit code and
// everything it printed. For CLI tests that only need the command's outcome (tests/apps/cli_test.cpp
// keeps its own shell runner for multi-process cases).
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace qf::testing {

struct CliOut {
  int rc;
  std::string text;
};

inline CliOut run_qforge(const std::string& args, const std::string& env = "") {
  const std::string cmd = "QFORGE_PROGRESS=0 " + env + (env.empty() ? "" : " ") + QFORGE_BINARY + " " + args + " 2>&1";
  CliOut r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) r.text.append(buf.data(), n);
  const int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace qf::testing
