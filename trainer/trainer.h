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
#include "trainer/checkpoint.h"
#include "trainer/dist/env.h"
#include "trainer/evaluate.h"
#include "trainer/run_config.h"
#include "trainer/metrics.h"
#include "trainer/run_dir.h"

namespace torch::optim {
class Optimizer;
}
namespace qf::core {
class TensorBoardWriter;
}

namespace qf::trainer {

class DataParallel;  // trainer/data_parallel.h

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
  // eval.gate with `against` on a converting run: the converted model vs the reference on the
  // validation split (trainer/quality_gate.h); the report, its statistics, and the gates missed.
  std::string gate_report;
  nlohmann::json gate_stats;
  std::vector<std::string> gate_missed;
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
  // setup's steps, in order (each its own concern; setup() reads as the list).
  void init_distributed();   // launcher env, this rank's device, process group, threads per rank
  void load_inputs();        // run-dir lock, tokenizer (model.vocab_size), dataset, crash recovery
  void load_teacher();       // distill.teacher: the frozen model the loss distills from
  void create_model();       // architecture + initial weights (seed, model.from, run.init_from)
  void transform_model(bool ptq_init);  // quant.init, quant.prepare, peft, onto the device
  void attach_data_parallel();  // rank 0's weights everywhere; trainable parameters to dp_
  void build_optimizer();    // AdamW / AdamW8bit over this rank's parameters (ZeRO: its shard)
  void write_run_files(bool resumed);  // config.yaml, metrics.jsonl (rank 0)
  void log_setup() const;
  void check_memory() const;  // the training memory estimate vs what the host has (trainer/memory_estimate.h)

  void write_metrics(const nlohmann::json& j);
  double train_step();
  // distill: one micro-batch's summed distillation loss (evaluate.h DistillTarget).
  at::Tensor distill_loss_sum(const data::Batch& b, bool bf16);
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
  std::shared_ptr<models::CausalLM> teacher_;  // distill: frozen, eval mode, on device_
  std::unique_ptr<torch::optim::Optimizer> opt_;  // AdamW or AdamW8bit (trainer.optim.name)
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
  int64_t setup_peak_rss_ = 0;  // peak RSS once the model is loaded and transformed (train_summary.json)
  dist::Env denv_;  // the launcher's environment (rank 0 of 1 when not launched)
  // Process group, gradient sync, ZeRO, observer sync; set by setup (a group only when launched).
  std::unique_ptr<DataParallel> dp_;
};

// Runs cfg.quant.init (rtn|gptq|awq) on the float `model`: calibration from quant.calib.data's
// recipe (tokenized with `tok`) or else `own` (the run's training split). Learned (LSQ) rules
// are calibrated as their plain affine spec; seed_learned_scales then starts them at GPTQ's scales.
// `hooks`: quant::run_ptq's per-layer calls (streaming quantize).
quant::PtqResult run_ptq_init(models::CausalLM& model, const RunConfig& cfg, const data::Tokenizer& tok,
                              const data::PackedSet& own, const quant::PtqLayerHooks& hooks = {});

// Applies the `peft:` section to a model (after quant::prepare): LoRA wrappers, frozen base storage,
// optional PEFT adapter to start from. verbose logs the parameter report.
peft::ApplyReport apply_peft(torch::nn::Module& model, const peft::LoraConfig& pc, bool verbose);
at::Device pick_device(DeviceChoice d);
// Intra-op CPU threads for run.threads (0 = every core).
void set_threads(int64_t threads);
// This process image's peak resident set so far (VmHWM; ru_maxrss without /proc), in bytes.
int64_t peak_rss_bytes();

}  // namespace qf::trainer
