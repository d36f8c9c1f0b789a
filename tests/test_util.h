// Shared test helpers. TmpDir: a fresh directory under $TMPDIR removed (with qf::fs::remove_tree,
// never std::filesystem::remove_all, which segfaults against libtorch 2.11) when it goes out of scope.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

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

}  // namespace qf::testing
