#include "core/fs.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace qf::fs {

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void write_atomic(const std::string& path, std::string_view bytes) {
  namespace stdfs = std::filesystem;
  stdfs::path p(path);
  std::string dir = p.has_parent_path() ? p.parent_path().string() : ".";
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  QF_CHECK_INPUT(fd >= 0, "cannot write '", tmp, "': ", std::strerror(errno));
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw InputError(str("cannot write '", path, "': ", std::strerror(e)));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    throw InputError(str("cannot flush '", path, "': ", std::strerror(e)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    throw InputError(str("cannot rename '", tmp, "' to '", path, "': ", std::strerror(e)));
  }
  fsync_path(dir);
}

void rename_atomic(const std::string& from, const std::string& to) {
  namespace stdfs = std::filesystem;
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw InputError(str("cannot rename '", from, "' to '", to, "': ", std::strerror(errno)));
  stdfs::path p(to);
  fsync_path(p.has_parent_path() ? p.parent_path().string() : ".");
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  QF_CHECK_INPUT(f.good(), "cannot read '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void ensure_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  QF_CHECK_INPUT(!ec && std::filesystem::is_directory(dir), "cannot create directory '", dir, "': ", ec.message());
  QF_CHECK_INPUT(::access(dir.c_str(), W_OK) == 0, "directory '", dir, "' is not writable");
}

void check_writable_dir(const std::string& dir) {
  std::string p = dir;
  while (true) {
    struct stat st;
    if (::stat(p.c_str(), &st) == 0) {
      QF_CHECK_INPUT(S_ISDIR(st.st_mode), "run directory '", dir, "' cannot be created: '", p, "' is not a directory");
      QF_CHECK_INPUT(::access(p.c_str(), W_OK | X_OK) == 0, "run directory '", dir, "' is not writable ('", p,
                     "' denies write access)");
      return;
    }
    auto slash = p.find_last_of('/');
    if (slash == std::string::npos) return;  // relative path under the (writable) cwd
    p = slash == 0 ? "/" : p.substr(0, slash);
  }
}

void remove_tree(const std::string& path) {
  if (::access(path.c_str(), F_OK) != 0) return;
  ::nftw(
      path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p) == 0 ? 0 : 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

uint64_t fnv1a64(std::string_view b, uint64_t h) {
  for (unsigned char c : b) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string hash_file(const std::string& path) { return hex64(fnv1a64(read_file(path))); }

}  // namespace qf::fs
