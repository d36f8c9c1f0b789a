// `qforge launch`: torchrun's job for qforge's own binary. Starts nproc_per_node copies of a
// command on this node with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), forwards SIGINT/SIGTERM to them, and when one
// exits non-zero stops the rest (SIGTERM, then SIGKILL after a grace period) and returns that
// exit code. Multi-node: the same command on every node with --nnodes, --node-rank and a
// --master-addr every node reaches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qf::trainer::dist {

struct LaunchOptions {
  int64_t nproc_per_node = 1;
  int64_t nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 0;  // 0: a free port on this host (single node), else 29500 (torchrun's default)
  double grace_s = 10;      // after a failure, how long the others get between SIGTERM and SIGKILL
};

// Runs `argv` (argv[0] = the program) nproc_per_node times; returns 0 when all succeeded, else
// the first failing rank's exit code (128 + signal for a killed one). Throws ConfigError for
// impossible layouts.
int launch(const LaunchOptions& o, const std::vector<std::string>& argv);

// A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, read it back, close).
int free_port();

}  // namespace qf::trainer::dist
