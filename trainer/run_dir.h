// A run directory as a unit. Layout: <run>/config.yaml (the resolved recipe that made it),
// <run>/checkpoints|converted|merged/step_N/ (model.safetensors + trainer_state.json, see
// checkpoint.h), metrics.jsonl, train_summary.json, adapter/. What a checkpoint's model is
// (ModelMeta: fp / fake_quant / converted, LoRA) is typed in checkpoint.h; rebuild_model is the one
// place a model is rebuilt from (config, checkpoint), in the one valid order
// build -> quant::prepare -> quant::convert -> LoRA -> g_idx -> weights, and load_run / load_model
// (eval, generate, export, quantize, inspect) go through it. (train's run.init_from instead loads a
// checkpoint's plain weights into the model it builds, before its own prepare and LoRA.)
// write_run_dir writes a complete run dir (quantize's output) through the staged-rename path.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/tokenizer.h"
#include "models/hf.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"
#include "trainer/run_config.h"

namespace qf::trainer {

// The model a checkpoint holds under the run config `cfg` (whose quant / peft sections describe
// its modules): built, prepared, converted and LoRA-wrapped as ck.state says, then loaded.
// The returned model's `cfg` is the ModelConfig it was built with: cfg.model with the vocab_size
// the checkpoint records (its embedding rows), when it records one.
// InputError when the checkpoint needs a section the config lacks.
std::shared_ptr<models::CausalLM> rebuild_model(const RunConfig& cfg, const CheckpointData& ck,
                                                const std::string& checkpoint_dir);

// A complete run dir at `out` holding `model` as step 0 of checkpoints/ (state: `meta` plus
// `extra_state`), config.yaml = `config_text`, and `files` (name, bytes) beside them. Staged beside
// `out` and renamed into place (exporter::write_staged_dir): a kill leaves no half run; an existing
// `out` is refused unless `force`. Returns the step dir's path under `out`.
std::string write_run_dir(const std::string& out, bool force, const std::string& config_text, models::CausalLM& model,
                          const ModelMeta& meta, const nlohmann::json& extra_state,
                          const std::vector<std::pair<std::string, std::string>>& files);

// Everything needed to use a finished run: its config snapshot, tokenizer and model weights.
struct LoadedRun {
  RunConfig cfg;
  std::unique_ptr<data::Tokenizer> tok;
  std::shared_ptr<models::CausalLM> model;
  std::string checkpoint;  // the step dir, or the Hugging Face dir
  ModelMeta meta;       // what the checkpoint holds (an HF dir: fp)
  std::string format;  // meta.describe(): fp | fake_quant | converted, + "+lora"
  bool hf_dir = false;  // loaded from a Hugging Face checkpoint dir (cfg holds defaults, no data sources)
  // Where the run's weights started, as its config.yaml says (load_run clears these keys in cfg):
  std::string model_from, init_from;
};
// `path` is a run directory (config.yaml + checkpoints/) or a checkpoint step directory inside one.
LoadedRun load_run(const std::string& path, const std::vector<std::string>& overrides);

// A Hugging Face checkpoint dir: config.json next to the safetensors (see models/hf.h).
bool is_hf_dir(const std::string& path);
// Its model; dtype auto = bf16 when stored in bf16, else fp32. populate=false leaves zero-copy
// weights unread until used (one-pass exporters). `info` (optional) gets what was read. `streamer`:
// the linears it claims are built by it (models::load_hf_weights).
std::shared_ptr<models::CausalLM> load_hf_dir(const std::string& dir, const std::string& dtype,
                                              nlohmann::json* info = nullptr, bool populate = true,
                                              const models::LinearStreamer* streamer = nullptr);
// key=value overrides that point a recipe at a Hugging Face dir: model.from, the dir's tokenizer
// (hf_dir_tokenizer), no run.init_from, no tokenizer training. InputError when it has no tokenizer.
std::vector<std::string> hf_dir_overrides(const std::string& dir);
// Every command that takes a model: a run (load_run) or a Hugging Face checkpoint dir with its
// tokenizer (tokenizer.model or tokenizer.json; BOS added as its tokenizer_config.json says). An
// HF dir's cfg is the defaults with the checkpoint's model and tokenizer and no data sources;
// `overrides` apply to runs only (refused for an HF dir).
LoadedRun load_model(const std::string& path, const std::vector<std::string>& overrides);
// base_model_name_or_path of a run's PEFT adapter: model.from's absolute path (what
// AutoPeftModelForCausalLM loads), else run.init_from, else "qforge:<run name>".
std::string adapter_base_name(const std::string& model_from, const std::string& init_from, const std::string& run_name);


}  // namespace qf::trainer
