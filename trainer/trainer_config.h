// `trainer:` section: optimisation, schedule, precision, evaluation and checkpoint cadence.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace qf::trainer {

enum class Schedule { Cosine, Linear, Constant };
enum class Precision { F32, BF16 };  // bf16 = autocast to bfloat16 over fp32 master weights
enum class DeviceChoice { Auto, Cpu, Cuda };
enum class Resume { Auto, Never };
// adamw: torch's AdamW (fp32 moments, 8 bytes per trainable element); adamw8bit: bitsandbytes'
// AdamW8bit (trainer/adamw8bit.h: 8-bit blockwise moments, ~2.03 bytes per element of a parameter
// with >= 4096 elements).
enum class OptimName { AdamW, AdamW8bit };
const cfg::Names<OptimName>& optim_names();  // adamw, adamw8bit

struct OptimConfig {
  OptimName name = OptimName::AdamW;
  double lr = 3e-4;
  std::vector<double> betas{0.9, 0.95};
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled (AdamW); never applied to norms, biases (params with < 2 dims)
  static OptimConfig from_config(cfg::Reader& r);
};

struct ScheduleConfig {
  Schedule type = Schedule::Cosine;
  int64_t warmup_steps = 100;  // when not given: default_warmup(horizon)
  double min_lr_ratio = 0.1;  // final lr = lr * min_lr_ratio (cosine, linear)
  int64_t total_steps = 0;    // schedule horizon; 0 = trainer.max_steps (set it to stop early and resume later)
  // `max_steps`: trainer.max_steps, the horizon when total_steps is 0.
  static ScheduleConfig from_config(cfg::Reader& r, int64_t max_steps);
  // The default warmup: a tenth of the horizon, at most 100 steps (fits any max_steps, 0 for < 10).
  static int64_t default_warmup(int64_t horizon) { return std::min<int64_t>(100, horizon / 10); }
  // lr multiplier in [0, 1] at `step` (0-based); horizon = total_steps or max_steps.
  double factor(int64_t step, int64_t max_steps) const;
};

struct TrainerConfig {
  int64_t max_steps = 1000;
  int64_t batch_size = 16;   // sequences per micro-batch
  int64_t grad_accum = 1;    // micro-batches per optimizer step
  double grad_clip = 1.0;    // max global grad norm; 0 = off
  Precision precision = Precision::F32;
  DeviceChoice device = DeviceChoice::Auto;
  int64_t eval_every = 100;  // steps; 0 = only at start and end
  int64_t eval_batches = 0;  // 0 = the whole validation split
  int64_t save_every = 0;    // steps; 0 = only at the end
  int64_t keep_last = 2;     // checkpoints kept
  int64_t log_every = 10;
  Resume resume = Resume::Auto;  // auto: continue from out_dir/checkpoints/latest when present
  // Memory: recompute each checkpointed decoder layer in backward instead of keeping its
  // activations (every `every`-th layer: 1 = all); the loss computes logits this many tokens at a
  // time (0 = all at once, -1 = auto, about 2^25 logits per chunk).
  bool activation_checkpointing = false;
  int64_t activation_checkpointing_every = 1;
  int64_t loss_chunk_tokens = -1;
  bool memory_check = true;  // refuse a run whose estimated training memory exceeds the host's (CPU)
  OptimConfig optim;
  ScheduleConfig schedule;
  static TrainerConfig from_config(cfg::Reader& r);
};

// `distill:` knowledge distillation from a frozen teacher (the QAT / QLoRA recipe of torchao's and
// llm-compressor's KD, Axolotl's kd_alpha / kd_ce_alpha / kd_temperature). Each training token's loss
// is ce_weight * CE(student, label) + kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
// summed over the labelled tokens and normalised as the CE alone is. The teacher is `init` (the
// weights this run starts from: run.init_from, else model.from, loaded as that run / checkpoint
// holds them) or a run dir, checkpoint dir, Hugging Face dir or GGUF file sharing the run's vocabulary.
// Validation loss stays the plain cross-entropy.
struct DistillConfig {
  std::string teacher;     // "" = off
  double kd_weight = 1.0;  // weight of the KL term
  double ce_weight = 0.0;  // weight of the label cross-entropy
  double temperature = 1.0;
  bool enabled() const { return !teacher.empty(); }
  static DistillConfig from_config(cfg::Reader& r);
};

}  // namespace qf::trainer
