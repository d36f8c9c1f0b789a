// c10d process groups for data parallel: a TCPStore rendezvous, then Gloo (CPU) or NCCL (CUDA).
// Kept apart from env.h so config code does not pull in c10d's headers.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

#include "trainer/dist/env.h"

namespace qf::trainer::dist {

// Rendezvous over a TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it), then a Gloo (CPU) or
// NCCL (CUDA, one device per process: LOCAL_RANK) backend. Everything waits at most `timeout`;
// failures are qf::Error naming the address, the rank and what to check.
#ifdef QFORGE_WITH_NCCL
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, const Env& env,
                                            std::chrono::milliseconds timeout);
#endif

c10::intrusive_ptr<c10d::Backend> init_backend(const Env& env, BackendKind kind, std::chrono::milliseconds timeout);

}  // namespace qf::trainer::dist
