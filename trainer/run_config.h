// The whole run configuration: one typed struct per component, parsed and validated in one pass.
// Invariant: parse_run_config either returns a fully valid RunConfig (and the resolved YAML, with
// every default filled in) or throws ConfigError listing every problem with its key path.
#pragma once
#include <yaml-cpp/yaml.h>

#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "models/config.h"
#include "models/generate.h"
#include "peft/lora.h"
#include "quant/qat.h"
#include "trainer/dist/env.h"
#include "trainer/quality_gate.h"
#include "trainer/trainer_config.h"

namespace qf::trainer {

struct RunSection {
  std::string name = "run";
  std::string out_dir = "runs/run";  // run directory: config.yaml, metrics.jsonl, tb/, checkpoints/
  int64_t seed = 1234;
  int64_t threads = 0;               // intra-op threads; 0 = all cores
  std::string init_from;             // a checkpoint dir (or run dir) whose model weights start this run
  static RunSection from_config(cfg::Reader& r);
};

// `dist:` data-parallel settings; the process layout itself comes from the launcher's environment
// (trainer/dist/env.h: RANK, WORLD_SIZE, MASTER_ADDR, ...).
struct DistConfig {
  dist::BackendKind backend = dist::BackendKind::Auto;  // auto: NCCL on CUDA, else Gloo
  double timeout_s = 300;           // rendezvous and every collective
  int64_t zero = 0;                 // 0: replicated AdamW; 1: optimizer state sharded (ZeRO-1); 2: + gradients (ZeRO-2)
  double bucket_mb = 25;            // gradient bucket size (DDP's bucket_cap_mb)
  double first_bucket_mb = 1;       // the first bucket, small so communication starts early
  bool overlap = true;              // launch buckets from autograd hooks during backward (false: after it)
  static DistConfig from_config(cfg::Reader& r);
};

// The tokenizer of a Hugging Face checkpoint dir: tokenizer.model (type sentencepiece, preferred, as
// convert_hf_to_gguf.py does for Llama) else tokenizer.json (type huggingface); `type` non-empty
// accepts only that kind. Empty path when the dir has none.
struct HfTokenizerFile {
  std::string type, path;
};
HfTokenizerFile hf_dir_tokenizer(const std::string& dir, const std::string& type = "");

struct RunConfig {
  RunSection run;
  models::ModelConfig model;
  data::TokenizerConfig tokenizer;
  data::DataConfig data;
  TrainerConfig trainer;
  quant::QatConfig quant;             // `quant:` QAT rules (prepare before training, convert after)
  peft::LoraConfig peft;              // `peft:` LoRA / QLoRA adapters (applied after quant.prepare)
  models::SamplingConfig sample;      // `sample:` settings for the end-of-run generated text
  DistConfig dist;                    // `dist:` data parallel (used when launched with WORLD_SIZE > 1)
  EvalConfig eval;                    // `eval:` the quality gate (eval.gate) against a reference model
  DistillConfig distill;              // `distill:` knowledge distillation from a frozen teacher
  std::vector<std::string> sample_prompts;
  YAML::Node resolved;                // the resolved config (defaults filled in)
  std::string source;                 // the file it came from
  std::string hash() const;           // stable hash of the resolved config
};

// A `model.from` checkpoint without tokenizer.path (and no tokenizer training) uses the
// checkpoint's own tokenizer (hf_dir_tokenizer), logged and recorded in the resolved config.
RunConfig parse_run_config(const YAML::Node& root, const std::string& source);
RunConfig load_run_config(const std::string& file, const std::vector<std::string>& overrides);

}  // namespace qf::trainer
