#include "trainer/dist/backend.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifndef USE_C10D_GLOO
#error "USE_C10D_GLOO is not defined: ProcessGroupGloo.hpp would compile to nothing (torch's targets define it)"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/cuda.h>

#include <cstdlib>
#include <thread>

#include "core/error.h"

namespace qf::trainer::dist {

namespace {
// Every rank posts its WORLD_SIZE; a rank disagreeing with rank 0 says so and stops, and rank 0
// stops too (instead of waiting for ranks that will never come). Then waits until all joined.
void check_world(c10d::Store& store, const Env& env, std::chrono::milliseconds timeout) {
  const auto as_bytes = [](const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); };
  const auto as_str = [](const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); };
  store.set("qforge/world_size/" + std::to_string(env.rank), as_bytes(std::to_string(env.world_size)));
  if (env.rank != 0) {
    store.wait({"qforge/world_size/0"}, timeout);
    const std::string w0 = as_str(store.get("qforge/world_size/0"));
    if (w0 != std::to_string(env.world_size)) {
      const std::string msg = str("rank ", env.rank, " has WORLD_SIZE=", env.world_size, " but rank 0 has WORLD_SIZE=", w0);
      store.set("qforge/mismatch", as_bytes(msg));
      throw ConfigError({str("distributed rendezvous at ", env.master_addr, ":", env.master_port, ": ", msg,
                             "; every rank must be started with the same WORLD_SIZE")});
    }
  }
  store.add("qforge/joined", 1);
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    if (store.check({"qforge/mismatch"}))
      throw ConfigError({str("distributed rendezvous at ", env.master_addr, ":", env.master_port, ": ",
                             as_str(store.get("qforge/mismatch")), "; every rank must be started with the same WORLD_SIZE")});
    const int64_t joined = store.add("qforge/joined", 0);
    if (joined == env.world_size) break;
    if (joined > env.world_size)
      throw ConfigError({str("distributed rendezvous at ", env.master_addr, ":", env.master_port, ": ", joined,
                             " ranks joined a world of WORLD_SIZE=", env.world_size, " (two launches on one MASTER_PORT?)")});
    if (std::chrono::steady_clock::now() - t0 > timeout)
      throw Error(str("distributed rendezvous: rank ", env.rank, " of ", env.world_size, ": only ", joined, " of ",
                      env.world_size, " ranks joined at ", env.master_addr, ":", env.master_port, " within ",
                      timeout.count() / 1000.0, " s (not every rank joined: check WORLD_SIZE and that every rank started)"));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}
}  // namespace

c10::intrusive_ptr<c10d::Backend> init_backend(const Env& env, BackendKind kind, std::chrono::milliseconds timeout) {
  const bool cuda = torch::cuda::is_available();
  if (kind == BackendKind::Auto) kind = cuda ? BackendKind::Nccl : BackendKind::Gloo;
  QF_CHECK_INPUT(kind != BackendKind::Nccl || cuda,
                 "dist.backend: nccl needs a CUDA device, and this process (rank ", env.rank,
                 ") sees none; use gloo (CPU) or auto");
#ifndef QFORGE_WITH_NCCL
  QF_CHECK_INPUT(kind == BackendKind::Gloo,
                 "dist.backend: nccl: this qforge was built without the CUDA toolkit (no ProcessGroupNCCL); use gloo");
#endif
  c10d::TCPStoreOptions o{};
  o.port = static_cast<uint16_t>(env.master_port);
  o.isServer = env.rank == 0;
  o.numWorkers = static_cast<int>(env.world_size);
  o.waitWorkers = false;  // joining is checked below, where a WORLD_SIZE mismatch can be named
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
                    " within ", timeout.count() / 1000.0, " s (", hint, "): ", first_line(what)));
  }
  check_world(*store, env, timeout);
#ifdef QFORGE_WITH_NCCL
  if (kind == BackendKind::Nccl) {
    try {
      return make_nccl(store, env, timeout);
    } catch (const std::exception& e) {
      throw Error(str("distributed init (nccl): rank ", env.rank, " of ", env.world_size, ": ", first_line(e.what())));
    }
  }
#endif
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
    throw Error(str("distributed init (gloo): rank ", env.rank, " of ", env.world_size,
                    " could not connect to its peers within ", timeout.count() / 1000.0, " s: ", first_line(e.what())));
  }
}

}  // namespace qf::trainer::dist
