// Data-parallel gradient reduction the way PyTorch DDP does it, on a c10d backend:
// - trainable parameters are grouped into buckets (the first small, then ~25 MB; one dtype each),
//   in the order their gradients become ready (rebuilt from the first step's order, rank 0's
//   order broadcast so every rank launches the same collectives in the same sequence);
// - a post-accumulate-grad hook on each parameter marks it ready; when a bucket is complete it is
//   launched asynchronously (buckets in index order) while backward goes on;
// - micro-steps that are not the last of an optimizer step do not sync (gradients accumulate
//   locally, as DDP's no_sync());
// - ZeRO-2 (`to_owner`): each bucket is *reduced* to the ranks owning its parameters instead of
//   all-reduced, and non-owned gradients are dropped as soon as they are copied out.
// Invariant: after finish(), every gradient this rank keeps is the sum over ranks (buckets are
// flat copies, so the values equal one flat all-reduce's); parameters whose gradient is undefined
// on every rank (unused in the step) stay undefined.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "trainer/dist/env.h"

namespace qf::trainer::dist {

struct ReducerOptions {
  int64_t bucket_bytes = 25ll << 20;       // DDP's bucket_cap_mb 25
  int64_t first_bucket_bytes = 1ll << 20;  // DDP's first bucket: small, so communication starts early
  bool overlap = true;  // false: every bucket is launched after backward (the bench's baseline)
  bool to_owner = false;  // ZeRO-2: reduce to the owner (see partition()) instead of all-reduce
};

// Where time went, summed over optimizer steps (for the bench and metrics).
struct ReducerStats {
  int64_t steps = 0, collectives = 0, bytes = 0;  // bytes: gradient bytes sent through collectives
  int64_t launched_in_backward = 0;  // buckets launched from the hooks, while backward was running
  double exposed_s = 0;  // wall time in finish(): communication not hidden behind backward
};

// ZeroRedundancyOptimizer's partition: parameters in order, each to the rank holding the fewest
// elements so far. Returns the owner rank of each parameter.
std::vector<int> partition(const std::vector<at::Tensor>& params, int64_t world);

// Turns a failing collective (a peer died, a timeout) into qf::Error naming this rank, the
// operation and the step, so every surviving rank exits non-zero with a readable message.
template <class F>
void collective(const Env& env, int64_t step, const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    throw Error(str("data parallel: rank ", env.rank, " of ", env.world_size, ": ", what, " at step ", step,
                    " failed (another rank died, was killed or timed out): ", first_line(e.what())));
  }
}

class GradReducer {
 public:
  // params: the trainable parameters (same order on every rank). owner: partition(params) when
  // opts.to_owner, else empty.
  GradReducer(c10::intrusive_ptr<c10d::Backend> pg, Env env, std::vector<at::Tensor> params, ReducerOptions opts,
              std::vector<int> owner = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Before each micro-step's backward: sync = true on the last micro-step of the optimizer step.
  void begin_backward(bool sync);
  // After the last micro-step's backward: launches what is left, waits, writes the sums back.
  // `step` (1-based) names the step in errors.
  void finish(int64_t step);

  const ReducerStats& stats() const { return stats_; }
  // Parameter indices of each bucket, in launch order.
  const std::vector<std::vector<size_t>>& buckets() const { return buckets_; }
  void ready(size_t i);  // called by the parameter hooks

 private:
  struct InFlight {
    size_t bucket;
    std::vector<size_t> params;  // the ones with a gradient, in buffer order
    std::vector<std::pair<int, at::Tensor>> parts;  // (owner or -1 for all-reduce, flat buffer)
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
  };
  void build(const std::vector<size_t>& order);
  void launch(size_t b);
  void complete(InFlight& f);

  c10::intrusive_ptr<c10d::Backend> pg_;
  Env env_;
  std::vector<at::Tensor> params_;
  ReducerOptions opts_;
  std::vector<int> owner_;
  std::vector<std::vector<size_t>> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> pending_;
  std::vector<char> launched_;
  size_t next_ = 0;
  bool sync_ = false, rebuilt_ = false;
  std::vector<size_t> ready_order_;
  std::vector<InFlight> inflight_;
  ReducerStats stats_;
};

}  // namespace qf::trainer::dist
