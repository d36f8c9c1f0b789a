#include "trainer/dist/env.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifndef USE_C10D_GLOO
#error "USE_C10D_GLOO is not defined: ProcessGroupGloo.hpp would compile to nothing (torch's targets define it)"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/cuda.h>

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

c10::intrusive_ptr<c10d::Backend> init_backend(const Env& env, BackendKind kind, std::chrono::milliseconds timeout) {
  const bool cuda = torch::cuda::is_available();
  if (kind == BackendKind::Auto) kind = cuda ? BackendKind::Nccl : BackendKind::Gloo;
  QF_CHECK_INPUT(kind != BackendKind::Nccl || cuda,
                 "dist.backend: nccl needs a CUDA device, and this process (rank ", env.rank,
                 ") sees none; use gloo (CPU) or auto");
  QF_CHECK_INPUT(kind == BackendKind::Gloo, "dist.backend: nccl is not wired in this build yet; use gloo");
  c10d::TCPStoreOptions o{};
  o.port = static_cast<uint16_t>(env.master_port);
  o.isServer = env.rank == 0;
  o.numWorkers = static_cast<int>(env.world_size);
  o.waitWorkers = true;
  o.timeout = timeout;
  c10::intrusive_ptr<c10d::TCPStore> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
  } catch (const std::exception& e) {
    std::string what = e.what();
    const char* hint = what.find("EADDRINUSE") != std::string::npos ? "MASTER_PORT already in use"
                       : env.rank == 0 ? "not every rank joined: check WORLD_SIZE and that every rank started"
                                       : "is MASTER_ADDR reachable and rank 0 started?";
    throw Error(str("distributed rendezvous: rank ", env.rank, " of ", env.world_size, " could not ",
                    env.rank == 0 ? "serve" : "reach", " the store at ", env.master_addr, ":", env.master_port,
                    " within ", timeout.count() / 1000.0, " s (", hint, "): ", what.substr(0, what.find('\n'))));
  }
  auto go = c10d::ProcessGroupGloo::Options::create(timeout);
  // Loopback rendezvous (one node): listen on 127.0.0.1. Otherwise the interface GLOO_SOCKET_IFNAME
  // names, or the address this host's name resolves to (as torch.distributed does).
  const bool loopback = env.master_addr == "127.0.0.1" || env.master_addr == "localhost";
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  go->devices.push_back(loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                        : (ifname && *ifname) ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                              : c10d::ProcessGroupGloo::createDefaultDevice());
  try {
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(env.rank), static_cast<int>(env.world_size), go);
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error(str("distributed init (gloo): rank ", env.rank, " of ", env.world_size,
                    " could not connect to its peers within ", timeout.count() / 1000.0, " s: ",
                    what.substr(0, what.find('\n'))));
  }
}

}  // namespace qf::trainer::dist
