#include "core/log.h"

#include <cstdio>
#include <ctime>

namespace qf::log {
static bool g_quiet = false;
void set_quiet(bool q) { g_quiet = q; }
bool quiet() { return g_quiet; }
static void emit(const char* lvl, const std::string& s) {
  std::time_t t = std::time(nullptr);
  char ts[32];
  std::strftime(ts, sizeof ts, "%H:%M:%S", std::localtime(&t));
  std::fprintf(stderr, "[%s %s] %s\n", ts, lvl, s.c_str());
  std::fflush(stderr);
}
void info_line(const std::string& s) {
  if (!g_quiet) emit("info", s);
}
void warn_line(const std::string& s) { emit("warn", s); }
}  // namespace qf::log
