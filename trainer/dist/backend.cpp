#include "trainer/dist/backend.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifndef USE_C10D_GLOO
#error "USE_C10D_GLOO is not defined: ProcessGroupGloo.hpp would compile to nothing (torch's targets define it)"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/cuda.h>

#include <cstdlib>

#include "core/error.h"

namespace qf::trainer::dist {

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
