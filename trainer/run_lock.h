// One writer per run directory: an exclusive flock on the directory itself, held for the life of
// the process (the kernel drops it when the process dies, kill -9 included, so a crashed run never
// leaves a stale lock). A second trainer on the same run.out_dir fails before it writes anything,
// naming the process that holds it. Readers (eval, export, generate, inspect) take no lock.
#pragma once

#include <sys/types.h>

#include <string>

namespace qf::trainer {

class RunDirLock {
 public:
  RunDirLock() = default;
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  ~RunDirLock();
  // Locks `dir` (which must exist); a no-op when this object already holds it. Throws InputError
  // naming the holder (pid and command line, from /proc/locks) when another process holds it.
  void acquire(const std::string& dir);
  bool held() const { return held_; }

 private:
  bool held_ = false;  // holds a reference to this process's lock of (dev_, ino_)
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  std::string dir_;
};

}  // namespace qf::trainer
