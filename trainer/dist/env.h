// Distributed launch contract, torchrun's: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT. Under SLURM (no RANK set) SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
// SLURM_NTASKS_PER_NODE stand in, with MASTER_ADDR / MASTER_PORT still read from the environment.
// No variable set = one process without a process group; WORLD_SIZE=1 = a process group of one.
// Invariant: read_env either returns a consistent Env (0 <= rank < world_size, 0 <= local_rank <
// local_world_size <= world_size, a port in 1..65535) or throws ConfigError naming each variable.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>

namespace qf::trainer::dist {

struct Env {
  int64_t rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  std::string source = "single";  // "torchrun" (RANK/WORLD_SIZE), "slurm" or "single"
  // Launched (torchrun/SLURM variables present), even as a world of one: that runs the same
  // process group, reducer and ZeRO code as N ranks.
  bool distributed() const { return world_size > 1 || source != "single"; }
};

using GetEnv = std::function<const char*(const char*)>;
Env read_env(const GetEnv& get = [](const char* k) { return std::getenv(k); });

// `dist.backend`: auto = NCCL when CUDA is available, else Gloo (see trainer/dist/backend.h).
enum class BackendKind { Auto, Gloo, Nccl };

}  // namespace qf::trainer::dist
