// CPU threading policy: how many threads qforge's OpenMP/ATen work uses, and how idle OpenMP
// workers wait. Invariant: on a machine another process also loads, a step slows in proportion to
// the cores it lost, not by an order of magnitude (workers that spin-wait steal the cores the
// working threads need, so qforge makes them sleep unless the user chose a wait policy).
#pragma once

namespace qf::threads {

// Re-executes the process once with OMP_WAIT_POLICY=PASSIVE when the user has set neither
// OMP_WAIT_POLICY nor GOMP_SPINCOUNT: libgomp reads them when it loads, before main(), so setting
// them later has no effect. Returns normally when nothing needs to change (or exec fails).
void ensure_passive_wait(char** argv);

// Cores this process may run on (its affinity mask: taskset, cgroups' cpusets), at least 1.
int usable_cores();

}  // namespace qf::threads
