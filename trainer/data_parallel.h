// Data parallel as one component the Trainer assembles: a c10d process group (Gloo or NCCL), rank
// 0's weights broadcast at the start, the bucketed gradient all-reduce (dist::GradReducer), ZeRO-1/2
// (AdamW state, and under ZeRO-2 the gradients, sharded by dist::partition; sharded clipping, the
// parameter all-gather, the whole optimizer state gathered on rank 0 for checkpoints), the
// observer-statistics sync of static activation quantizers, and the loop's scalar sums and barriers.
// Invariant: every rank makes the same calls in the same order (they are collectives). Without a
// process group (one process, rank 0 of 1) each call is the identity or a no-op and the ZeRO stage
// is 0, so a single process runs the same code path as N ranks.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "models/state.h"
#include "trainer/dist/backend.h"
#include "trainer/dist/reducer.h"
#include "trainer/run_config.h"

namespace qf::trainer {

// One process per GPU: a distributed rank on CUDA trains on device LOCAL_RANK (checked against
// this node's device count), made current. Otherwise `device` as it is.
at::Device local_rank_device(const dist::Env& env, at::Device device);

class DataParallel {
 public:
  // pg: the group this rank belongs to; null = one process (env.world_size 1). device: where the
  // collectives' tensors live (NCCL reduces this rank's CUDA tensors). cfg: the `dist:` section.
  DataParallel(c10::intrusive_ptr<c10d::Backend> pg, dist::Env env, at::Device device, DistConfig cfg);
  ~DataParallel();  // removes the observer sync if start_observer_sync installed it
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Joins the group `env` describes (a launched process, even a world of one) over cfg.backend
  // (auto: NCCL for a CUDA device, else Gloo) within cfg.timeout_s; no group when not launched.
  static std::unique_ptr<DataParallel> connect(const dist::Env& env, at::Device device, const DistConfig& cfg);

  bool active() const { return static_cast<bool>(pg_); }
  const dist::Env& env() const { return env_; }
  int64_t zero() const { return zero_; }  // the ZeRO stage in effect: dist.zero with a group, else 0

  // Start of training: InputError on a rank whose `config_hash` (RunConfig::hash) is not rank 0's;
  // then every rank's `params` take rank 0's values.
  void broadcast_model(const std::vector<at::Tensor>& params, const std::string& config_hash, int64_t step);

  // The trainable parameters, in the same order on every rank; call once, before the optimizer is
  // built. Under ZeRO they are partitioned among the ranks (one dtype required), and with a group
  // the gradient reducer hooks them.
  void attach(std::vector<at::Tensor> trainable);
  bool owns(size_t i) const { return zero_ == 0 || owner_[i] == env_.rank; }
  // The parameters this rank's optimizer holds (all of them unless ZeRO), in attach's order.
  std::vector<at::Tensor> owned() const;
  // Gradient bytes this rank holds while stepping (ZeRO-2: only its own parameters').
  int64_t grad_bytes() const;

  // One optimizer step's backward: begin_backward before each micro-step (sync = the last one:
  // accumulation micro-steps do not communicate), finish_backward after the last. Afterwards every
  // gradient this rank keeps is the sum over the ranks. `step` (1-based) names the step in errors.
  void begin_backward(bool sync);
  void finish_backward(int64_t step);
  // torch's clip_grad_norm_ over the trainable parameters (max_norm / (total + 1e-6), clamped to 1);
  // returns the total norm. ZeRO-2: the norm of every rank's own gradients, combined.
  double clip_grad_norm(double max_norm, int64_t step);
  // After the optimizer step under ZeRO: each owner broadcasts its updated parameters.
  void sync_params(int64_t step);
  // The AdamW state of `model`'s trainable parameters (the ones attached, in that order), as one
  // process holds it, on rank 0: under ZeRO each owner sends its share there (other ranks get
  // nothing), so a checkpoint saved by N ranks resumes on any M. ZeRO shards torch's AdamW only
  // (trainer.optim.name adamw8bit refuses dist.zero > 0 at config time).
  models::NamedTensors gather_optimizer_state(const torch::nn::Module& model, torch::optim::Optimizer& opt,
                                              int64_t step);

  // Element-wise sums over the ranks in one all-reduce; `what` and `step` name it if a peer is gone.
  std::vector<double> allreduce_sums(std::vector<double> v, const char* what, int64_t step);
  double allreduce_sum(double v, int64_t step) { return allreduce_sums({v}, "all-reduce", step)[0]; }
  void barrier(int64_t step);

  // A quantizer observer's statistics over the ranks: exact = the min of the mins and the max of
  // the maxes (what one process sees), else the means (quant::set_observer_sync's contract).
  void sync_observer(at::Tensor& mn, at::Tensor& mx, bool exact, int64_t step);
  // With a group: installs sync_observer as quant's process-wide observer sync, `step()` naming the
  // step in errors, until stop_observer_sync (or destruction).
  void start_observer_sync(std::function<int64_t()> step);
  void stop_observer_sync();

  // train_summary.json's data_parallel entry: world size, backend, ZeRO stage, overlap, buckets and
  // the reducer's per-step traffic. Empty without a group.
  nlohmann::json summary() const;

 private:
  double clip_sharded_grads(double max_norm, int64_t step);

  c10::intrusive_ptr<c10d::Backend> pg_;
  dist::Env env_;
  at::Device device_;
  DistConfig cfg_;
  int64_t zero_ = 0;
  std::vector<at::Tensor> trainable_;
  std::vector<int> owner_;  // ZeRO: trainable_[i] belongs to rank owner_[i]
  std::unique_ptr<dist::GradReducer> reducer_;
  bool observer_sync_ = false;
};

}  // namespace qf::trainer
