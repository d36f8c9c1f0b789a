#include "trainer/dist/env.h"

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace qf::trainer::dist {
namespace {

// An integer environment variable; `problems` gets "NAME='v': expected ..." on a bad value.
bool int_var(const GetEnv& get, const char* name, int64_t* out, std::vector<std::string>* problems) {
  const char* v = get(name);
  if (!v || !*v) return false;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  if (errno != 0 || *end != 0) {
    problems->push_back(str(name, "='", v, "': expected an integer"));
    return false;
  }
  *out = x;
  return true;
}

}  // namespace

Env read_env(const GetEnv& get) {
  Env e;
  std::vector<std::string> p;
  const bool torchrun = get("RANK") || get("WORLD_SIZE");
  const bool slurm = !torchrun && get("SLURM_PROCID") && get("SLURM_NTASKS");
  if (torchrun) {
    e.source = "torchrun";
    if (!int_var(get, "RANK", &e.rank, &p) && !get("RANK")) p.push_back("RANK is not set but WORLD_SIZE is");
    if (!int_var(get, "WORLD_SIZE", &e.world_size, &p) && !get("WORLD_SIZE")) p.push_back("WORLD_SIZE is not set but RANK is");
    e.local_rank = e.rank;
    e.local_world_size = e.world_size;
    int_var(get, "LOCAL_RANK", &e.local_rank, &p);
    int_var(get, "LOCAL_WORLD_SIZE", &e.local_world_size, &p);
  } else if (slurm) {
    e.source = "slurm";
    int_var(get, "SLURM_PROCID", &e.rank, &p);
    int_var(get, "SLURM_NTASKS", &e.world_size, &p);
    e.local_rank = e.rank;
    e.local_world_size = e.world_size;
    int_var(get, "SLURM_LOCALID", &e.local_rank, &p);
    if (const char* n = get("SLURM_NTASKS_PER_NODE")) {
      // "4" or "4(x2)": the count before any parenthesis.
      e.local_world_size = std::atoll(n);
      if (e.local_world_size <= 0) p.push_back(str("SLURM_NTASKS_PER_NODE='", n, "': expected a positive count"));
    }
  }
  if (const char* a = get("MASTER_ADDR"); a && *a) e.master_addr = a;
  int_var(get, "MASTER_PORT", &e.master_port, &p);
  if (e.world_size < 1) p.push_back(str("WORLD_SIZE=", e.world_size, ": expected >= 1"));
  if (e.rank < 0 || e.rank >= e.world_size)
    p.push_back(str("RANK=", e.rank, " is outside [0, WORLD_SIZE=", e.world_size, ")"));
  if (e.local_world_size < 1 || e.local_world_size > e.world_size)
    p.push_back(str("LOCAL_WORLD_SIZE=", e.local_world_size, ": expected 1..WORLD_SIZE=", e.world_size));
  if (e.local_rank < 0 || e.local_rank >= e.local_world_size)
    p.push_back(str("LOCAL_RANK=", e.local_rank, " is outside [0, LOCAL_WORLD_SIZE=", e.local_world_size, ")"));
  if (e.master_port < 1 || e.master_port > 65535) p.push_back(str("MASTER_PORT=", e.master_port, ": expected 1..65535"));
  if (!p.empty()) {
    for (auto& s : p) s = "distributed launch (" + e.source + " environment): " + s;
    throw ConfigError(p);
  }
  return e;
}

}  // namespace qf::trainer::dist
