// File-system helpers. Invariant: every file qforge writes that a later run depends on goes through
// write_atomic (temp file in the same directory + fsync + rename + fsync of the directory), so a
// reader sees either the old complete file or the new complete file, never a torn one.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace qf::fs {

void write_atomic(const std::string& path, std::string_view bytes);

// A file written in pieces that appears at `path` only on commit(): the bytes go to a temp file in
// the same directory (path + ".tmp.<pid>"); commit() fsyncs it, renames it into place and fsyncs the
// directory. A failed write (ENOSPC, EROFS, EIO...) throws InputError naming `path` and the errno
// text; the destructor of an uncommitted writer removes the temp file, so nothing partial remains.
class AtomicWriter {
 public:
  explicit AtomicWriter(std::string path);
  ~AtomicWriter();
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;
  void write(std::string_view bytes);
  uint64_t size() const { return size_; }
  void commit();

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// A whole file mapped read-only (PROT_READ, MAP_SHARED); throws InputError naming the path.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(addr_), len_}; }

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};
// Reads a whole file; throws InputError naming the path when it cannot.
std::string read_file(const std::string& path);
// fsync of a file or directory path (best effort on directories).
void fsync_path(const std::string& path);
// Renames a fully written temp directory into place atomically and fsyncs the parent.
void rename_atomic(const std::string& from, const std::string& to);
// Creates a directory (and parents); throws InputError naming it if that fails or it is not writable.
void ensure_dir(const std::string& dir);

// Throws InputError naming `dir` unless it is (or can be created as) a writable directory; creates nothing.
void check_writable_dir(const std::string& dir);

// Recursive delete (like rm -rf; missing path is fine). Use this, never std::filesystem::remove_all:
// libtorch_cpu.so (built with GCC 13) exports its own std::filesystem symbols, and remove_all
// compiled with Debian's GCC 12 headers binds to them and segfaults.
void remove_tree(const std::string& path);

// Stable 64-bit FNV-1a hash (hex) of bytes / of a file's bytes; used for cache keys and config hashes.
// Leftovers of a killed writer: entries of `dir` named <base>.tmp<PID>, <base>.tmp.<PID> (AtomicWriter),
// <base>.old<PID> or <base>.link<PID> whose PID is no live process (a live writer's files are never
// touched) and whose <base> satisfies `match`. Removes them; returns how many.
bool pid_alive(long pid);
int remove_dead_temps(const std::string& dir, const std::function<bool(const std::string& base)>& match);

uint64_t fnv1a64(std::string_view bytes, uint64_t seed = 1469598103934665603ULL);
std::string hex64(uint64_t v);
// Fast non-cryptographic 64-bit hash (8 bytes per step, ~10x fnv1a64) for checking written data
// against a re-read; not stable across versions, never store it.
uint64_t hash64(std::string_view bytes);
std::string hash_file(const std::string& path);

}  // namespace qf::fs
