// ProcessGroupNCCL (built into libtorch_cuda) behind dist::make_nccl. Compiled only when the CUDA
// toolkit is present, against the nccl.h of the nvidia-nccl wheel libtorch loads (its
// ProcessGroupNCCL::Options layout depends on that header's NCCL_HAS_* macros).
#include "trainer/dist/backend.h"

#ifndef USE_C10D_NCCL
#error "USE_C10D_NCCL is not defined: torch_cuda's targets should define it"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace qf::trainer::dist {

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, const Env& env,
                                            std::chrono::milliseconds timeout) {
  auto o = c10d::ProcessGroupNCCL::Options::create();
  o->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(env.rank), static_cast<int>(env.world_size), o);
}

}  // namespace qf::trainer::dist
