#include "core/fs.h"

#include <fcntl.h>
#include <signal.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/fault.h"

namespace qf::fs {

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

AtomicWriter::AtomicWriter(std::string path) : path_(std::move(path)) {
  tmp_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  QF_CHECK_INPUT(fd_ >= 0, "cannot write '", path_, "': ", std::strerror(errno));
}

AtomicWriter::~AtomicWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void AtomicWriter::write(std::string_view bytes) {
  QF_CHECK(fd_ >= 0, "AtomicWriter: write after commit to '", path_, "'");
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd_, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw InputError(str("cannot write '", path_, "' (", size_ + off, " bytes in): ", std::strerror(errno)));
    }
    off += static_cast<size_t>(n);
  }
  size_ += off;
}

void AtomicWriter::commit() {
  QF_CHECK(fd_ >= 0, "AtomicWriter: '", path_, "' committed twice");
  const int fd = fd_;
  fd_ = -1;
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    throw InputError(str("cannot flush '", path_, "': ", std::strerror(e)));
  }
  if (::close(fd) != 0) throw InputError(str("cannot flush '", path_, "': ", std::strerror(errno)));
  fault("file_synced", path_);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw InputError(str("cannot rename '", tmp_, "' to '", path_, "': ", std::strerror(errno)));
  tmp_.clear();
  std::filesystem::path p(path_);
  fsync_path(p.has_parent_path() ? p.parent_path().string() : ".");
  fault("file_renamed", path_);
}

void write_atomic(const std::string& path, std::string_view bytes) {
  AtomicWriter w(path);
  w.write(bytes);
  w.commit();
}

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  QF_CHECK_INPUT(fd >= 0, "cannot open '", path, "': ", std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    throw InputError(str("'", path, "' is not a regular file"));
  }
  len_ = static_cast<size_t>(sb.st_size);
  if (len_ > 0) {
    addr_ = ::mmap(nullptr, len_, PROT_READ, MAP_SHARED, fd, 0);
    if (addr_ == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      addr_ = nullptr;
      throw InputError(str("cannot map '", path, "': ", std::strerror(e)));
    }
    ::madvise(addr_, len_, MADV_SEQUENTIAL);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (addr_) ::munmap(addr_, len_);
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

bool pid_alive(long pid) {
  if (pid <= 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

int remove_dead_temps(const std::string& dir, const std::function<bool(const std::string&)>& match) {
  namespace stdfs = std::filesystem;
  std::error_code ec;
  if (!stdfs::is_directory(dir, ec)) return 0;
  std::vector<std::string> dead;
  for (auto it = stdfs::directory_iterator(dir, ec); !ec && it != stdfs::directory_iterator(); it.increment(ec)) {
    const std::string n = it->path().filename().string();
    size_t d = n.size();
    while (d > 0 && std::isdigit(static_cast<unsigned char>(n[d - 1]))) --d;
    if (d == n.size() || n.size() - d > 9) continue;
    size_t e = d;
    if (e > 0 && n[e - 1] == '.') --e;  // AtomicWriter's "<path>.tmp.<pid>"
    std::string base;
    for (const char* tag : {".tmp", ".old", ".link"}) {
      const size_t t = std::strlen(tag);
      if (e >= t && n.compare(e - t, t, tag) == 0) {
        base = n.substr(0, e - t);
        break;
      }
    }
    if (base.empty() || !match(base) || pid_alive(std::stol(n.substr(d)))) continue;
    dead.push_back(it->path().string());
  }
  for (auto& p : dead) remove_tree(p);
  return static_cast<int>(dead.size());
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

uint64_t hash64(std::string_view b) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ b.size();
  size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, b.data() + i, 8);
    h = (h ^ (w * 0xBF58476D1CE4E5B9ULL)) * 0x94D049BB133111EBULL;
    h ^= h >> 29;
  }
  for (; i < b.size(); ++i) h = (h ^ static_cast<unsigned char>(b[i])) * 1099511628211ULL;
  return h;
}

std::string hash_file(const std::string& path) { return hex64(fnv1a64(read_file(path))); }

}  // namespace qf::fs
