#include "core/threads.h"

#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

namespace qf::threads {

void ensure_passive_wait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  // Marks the re-executed process so a failed setenv can never loop.
  if (std::getenv("QFORGE_OMP_REEXEC")) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  setenv("QFORGE_OMP_REEXEC", "1", 1);
  execv("/proc/self/exe", argv);
  // exec failed (no /proc): carry on with the default policy rather than refuse to run.
}

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

}  // namespace qf::threads
