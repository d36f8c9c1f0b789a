// Shared test helpers. TmpDir: a fresh directory under $TMPDIR removed (with qf::fs::remove_tree,
// never std::filesystem::remove_all, which segfaults against libtorch 2.11) when it goes out of scope.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/config.h"
#include "core/error.h"
#include "core/fs.h"

namespace qf::testing {

struct TmpDir {
  std::string path;
  explicit TmpDir(const std::string& prefix = "qf_test") {
    std::string t = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    path = ::mkdtemp(t.data());
  }
  ~TmpDir() { qf::fs::remove_tree(path); }
  TmpDir(const TmpDir&) = delete;
  TmpDir& operator=(const TmpDir&) = delete;
  std::string operator/(const std::string& rel) const { return path + "/" + rel; }
};

inline void write_text(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// Parses one `section:` of a YAML document with Cfg::from_config, as a run config would; throws
// the ConfigError listing every problem. `resolved` receives the resolved (defaults filled) tree.
template <class Cfg>
Cfg parse_section(const std::string& yaml, const std::string& section, YAML::Node* resolved = nullptr) {
  YAML::Node root = YAML::Load(yaml);
  qf::cfg::Problems p;
  YAML::Node res(YAML::NodeType::Map);
  qf::cfg::Reader top(root, "", &p, res);
  auto r = top.child(section);
  Cfg c = Cfg::from_config(r);
  top.finish();
  p.throw_if_any();
  if (resolved) *resolved = res;
  return c;
}

// The ConfigError message `fn` throws, or "<no error>".
template <class Fn>
std::string config_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const qf::ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace qf::testing
