#include "trainer/run_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "core/error.h"

namespace qf::trainer {

namespace {

// The pid holding a flock on (dev, ino), from /proc/locks ("1: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF",
// MAJ and MIN in hex); -1 when it cannot be told.
long lock_holder(const struct stat& st) {
  std::ifstream f("/proc/locks");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::string id, kind, mode, rw, dev;
    long pid = -1;
    if (!(in >> id >> kind >> mode >> rw >> pid >> dev) || kind != "FLOCK") continue;
    unsigned maj = 0, min = 0;
    unsigned long long ino = 0;
    if (std::sscanf(dev.c_str(), "%x:%x:%llu", &maj, &min, &ino) != 3) continue;
    if (ino == static_cast<unsigned long long>(st.st_ino) && maj == major(st.st_dev) && min == minor(st.st_dev)) return pid;
  }
  return -1;
}

std::string cmdline(long pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  for (auto& c : s)
    if (c == '\0') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s.size() > 200 ? s.substr(0, 200) + "..." : s;
}

// flock conflicts between two descriptors of one process too: the locks this process holds are
// shared by every RunDirLock of it (a test, or a later Trainer, on the same run in one process).
struct Held {
  int fd;
  int refs;
};
using Key = std::pair<dev_t, ino_t>;
std::mutex g_mu;
std::map<Key, Held>& held_locks() {
  static std::map<Key, Held> m;
  return m;
}

void release(const Key& k) {
  std::lock_guard<std::mutex> g(g_mu);
  auto it = held_locks().find(k);
  if (it != held_locks().end() && --it->second.refs == 0) {
    ::close(it->second.fd);  // closing the descriptor drops the flock
    held_locks().erase(it);
  }
}

}  // namespace

RunDirLock::~RunDirLock() {
  if (held_) release({dev_, ino_});
}

void RunDirLock::acquire(const std::string& dir) {
  if (held_ && dir == dir_) return;
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  QF_CHECK_INPUT(fd >= 0, "run.out_dir: cannot open '", dir, "' to lock it: ", std::strerror(errno));
  struct stat me {};
  if (::fstat(fd, &me) != 0) {
    const int err = errno;
    ::close(fd);
    throw InputError(str("run.out_dir: cannot stat '", dir, "': ", std::strerror(err)));
  }
  const Key key{me.st_dev, me.st_ino};
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (auto it = held_locks().find(key); it != held_locks().end()) {  // this process holds it already
      ::close(fd);
      ++it->second.refs;
    } else if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      held_locks().emplace(key, Held{fd, 1});
    } else {
      const int err = errno;
      const long holder = lock_holder(me);
      ::close(fd);
      if (err != EWOULDBLOCK) throw InputError(str("run.out_dir: cannot lock '", dir, "': ", std::strerror(err)));
      const std::string who =
          holder > 0 ? str("process ", holder, " (", cmdline(holder), ")") : std::string("another process");
      throw InputError(str("run.out_dir: '", dir, "' is in use by ", who,
                           "; two trainers writing one run would corrupt its checkpoints. Wait for it to finish or "
                           "stop it, or give this run another run.out_dir"));
    }
  }
  if (held_) release({dev_, ino_});
  held_ = true;
  dev_ = me.st_dev;
  ino_ = me.st_ino;
  dir_ = dir;
}

}  // namespace qf::trainer
