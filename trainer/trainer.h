// The training lifecycle: setup -> train -> save_checkpoint -> cleanup (torchtune's recipe shape).
// Invariant: the loss curve depends only on the resolved config and the data; resuming from a
// checkpoint (model, optimizer, schedule position, RNG, sampler position) continues it identically.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/sampler.h"
#include "data/tokenizer.h"
#include "models/transformer.h"
#include "quant/ptq.h"
#include "trainer/run_lock.h"
#include "trainer/dist/backend.h"
#include "trainer/checkpoint.h"
#include "trainer/dist/reducer.h"
#include "trainer/run_config.h"
#include "trainer/metrics.h"
#include "trainer/run_dir.h"

namespace torch::optim {
class AdamW;
}
namespace qf::core {
class TensorBoardWriter;
}

namespace qf::trainer {

struct EvalResult {
  double loss = 0;  // mean cross-entropy (nats/token)
  double ppl = 0;
  int64_t tokens = 0;
};

struct TrainResult {
  std::vector<double> losses;  // one per optimizer step run in this process
  double val_before = -1, val_after = -1;  // validation loss at start (fresh runs) and end
  int64_t start_step = 0, end_step = 0;
  double tokens_per_s = 0;
  std::string checkpoint;
  std::string converted;        // QAT runs: <run>/converted/step_N (packed integer weights)
  std::string adapter;          // LoRA runs: <run>/adapter (PEFT format)
  std::string merged;           // peft.merge_at_end without quant: <run>/merged/step_N (fp32)
  double val_merged = -1;       // validation loss of the merged model
  double val_converted = -1;    // validation loss of the converted model
  int64_t model_bytes = 0;      // weight bytes as stored at the end (packed when converted)
  // Training memory while stepping: weights as stored (NF4/bf16/fake-quant fp32), gradients of the
  // trainable parameters, AdamW state; and the process's peak RSS. Also in <run>/train_summary.json.
  int64_t train_weight_bytes = 0, grad_bytes = 0, optim_bytes = 0, peak_rss_bytes = 0;
};

// Non-finite loss or gradient: the run stops, nothing is saved, the last checkpoint stays valid.
struct DivergedError : Error {
  using Error::Error;
};

class Trainer {
 public:
  explicit Trainer(RunConfig cfg);
  ~Trainer();
  void setup();
  TrainResult train();
  std::string save_checkpoint();
  void cleanup();

  EvalResult evaluate(const data::PackedSet& set, int64_t max_batches);
  models::CausalLM& model() { return *model_; }
  const data::Tokenizer& tokenizer() const { return *tok_; }
  const data::Dataset& dataset() const { return ds_; }
  const RunConfig& config() const { return cfg_; }
  int64_t step() const { return step_; }
  // Data parallel: this process's place (world size 1 when not launched distributed).
  const dist::Env& dist_env() const { return denv_; }
  bool is_rank0() const { return denv_.rank == 0; }

 private:
  void write_metrics(const nlohmann::json& j);
  double train_step();
  void restore(const std::string& ckpt_dir);
  std::string save_converted();
  // Writes the current model as <run>/<sub>/step_N with trainer_state model_format = format.
  std::string save_model_dir(const std::string& sub, ModelFormat format);
  ModelMeta model_meta(ModelFormat format, bool lora, bool with_bytes) const;
  // Rank 0, after the last checkpoint (trainer/finalize.cpp): adapter, merged / converted models
  // (evaluated with `eval`), train_summary.json; fills res's end-of-run fields.
  void finalize(TrainResult& res, const std::function<EvalResult()>& eval);

  RunConfig cfg_;
  RunDirLock run_lock_;  // rank 0: the one writer of run.out_dir
  std::unique_ptr<data::Tokenizer> tok_;
  data::Dataset ds_;
  std::shared_ptr<models::CausalLM> model_;
  std::unique_ptr<torch::optim::AdamW> opt_;
  std::unique_ptr<data::Sampler> sampler_;
  MetricsLog metrics_;  // rank 0: metrics.jsonl + TensorBoard
  at::Device device_{at::kCPU};
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  double last_val_ = -1;
  bool resumed_ = false;
  bool created_run_dir_ = false;  // rank 0: this run created run.out_dir (a failed one removes it if empty)
  bool finished_ = false;         // train() ran to the end
  std::optional<quant::PtqResult> ptq_;  // quant.init: what PTQ produced (GPTQ's exact codes)
  dist::Env denv_;
  c10::intrusive_ptr<c10d::Backend> pg_;  // null unless WORLD_SIZE > 1
  std::unique_ptr<dist::GradReducer> reducer_;  // bucketed gradient sync (data parallel only)
  // ZeRO (dist.zero > 0 with WORLD_SIZE > 1): trainable_[i] is owned by rank owner_[i]; this rank's
  // AdamW holds only its own parameters' state.
  int64_t zero_ = 0;
  std::vector<at::Tensor> trainable_;
  std::vector<int> owner_;
  bool owns(size_t i) const { return zero_ == 0 || owner_[i] == denv_.rank; }
  void broadcast_model();
  // Sums over the ranks in one all-reduce; `what` and `step` name it if a peer is gone.
  std::vector<double> allreduce_sums(std::vector<double> v, const char* what, int64_t step);
  double allreduce_sum(double v) { return allreduce_sums({v}, "all-reduce", step_ + 1)[0]; }
  void barrier();
  double clip_sharded_grads(double max_norm);  // ZeRO-2: the global norm from each rank's own gradients
  void sync_params();                        // ZeRO: each owner broadcasts its updated parameters
  NamedTensors gather_optimizer_state();     // ZeRO: the whole optimizer state, on rank 0
};

// Runs cfg.quant.init (rtn|gptq|awq) on the float `model`: calibration from quant.calib.data's
// recipe (tokenized with `tok`) or else `own` (the run's training split). Learned (LSQ) rules
// are calibrated as their plain affine spec; seed_learned_scales then starts them at GPTQ's scales.
quant::PtqResult run_ptq_init(models::CausalLM& model, const RunConfig& cfg, const data::Tokenizer& tok,
                              const data::PackedSet& own);

// Applies the `peft:` section to a model (after quant::prepare): LoRA wrappers, frozen base storage,
// optional PEFT adapter to start from. verbose logs the parameter report.
peft::ApplyReport apply_peft(torch::nn::Module& model, const peft::LoraConfig& pc, bool verbose);
at::Device pick_device(DeviceChoice d);
// Intra-op CPU threads for run.threads (0 = every core).
void set_threads(int64_t threads);
// Mean next-token cross-entropy over a packed set (batches in order).
// Data parallel (shard.world > 1): each global batch of batch_size * world sequences is split
// across ranks and shard.sum adds (loss, tokens) over them, so every rank gets the number one
// process with that global batch computes, in 1/world of the time.
struct EvalShard {
  int64_t rank = 0, world = 1;
  std::function<void(double& loss_sum, double& tokens)> sum;
};
EvalResult evaluate_model(models::CausalLM& m, const data::PackedSet& set, int64_t batch_size, int64_t max_batches,
                          at::Device dev, bool bf16, const EvalShard& shard = {});

}  // namespace qf::trainer
