// Checkpoints: <run>/checkpoints/step_<N>/ {model.safetensors, optimizer.safetensors,
// trainer_state.json} plus <run>/checkpoints/latest (text: the directory name).
// Invariant: a checkpoint directory is built under a temporary name, every file fsynced, then
// renamed into place, and only then is `latest` atomically repointed; a crash (even SIGKILL) at any
// moment leaves `latest` naming a complete, loadable checkpoint. Re-saving an existing step never
// moves the live directory aside first: the new one becomes .step_N.next, `latest` names it, then
// step_N is replaced by a (hard-linked) copy and `latest` names step_N again.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "models/state.h"
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace qf::trainer {

using models::NamedTensors;  // models/state.h
using models::model_state;
using models::load_model_state;

// The optimizer's state by parameter name: torch::optim::AdamW as exp_avg/, exp_avg_sq/, step/<name>;
// AdamW8bit (trainer/adamw8bit.h) as state1/, state2/, absmax1/, absmax2/, step/<name>.
NamedTensors optimizer_state(const torch::nn::Module& m, torch::optim::Optimizer& opt);
// Restores that state for the parameters `opt` holds (a ZeRO rank: its share). Every entry of the
// file must be state of a trainable parameter of `m` in its shape (parameters without state never
// stepped); anything else throws InputError naming the file, the parameter and the shapes/counts.
// State of the other optimizer (AdamW vs AdamW8bit) throws InputError naming the file, both
// trainer.optim.name values, and the ways out (switch back, or delete the file).
void load_optimizer_state(const torch::nn::Module& m, torch::optim::Optimizer& opt, const NamedTensors& state,
                          const std::string& origin);

// What kind of model a checkpoint holds (trainer_state.json's "model_format"): fp = plain weights;
// fake_quant = QAT modules (scales, observers: rebuilt with the run's quant rules); converted =
// packed integer / llama.cpp-block weights (quant::convert of those modules).
enum class ModelFormat { Fp, FakeQuant, Converted };
const cfg::Names<ModelFormat>& model_format_names();  // fp, fake_quant, converted
// The model facts trainer_state.json records beside the training state; the one reader and writer
// of those keys (model_format, lora, model_family, vocab_size, model_bytes).
struct ModelMeta {
  ModelFormat format = ModelFormat::Fp;
  bool lora = false;          // LoRA wrappers (the run's peft section) around the base linears
  std::string family;         // model.family
  int64_t vocab_size = 0;     // embedding rows (0: unknown)
  int64_t model_bytes = -1;   // bytes of weights as stored (-1: not recorded)
  void write_to(nlohmann::json& state) const;
  static ModelMeta read_from(const nlohmann::json& state);  // state passed load_checkpoint's checks
  std::string describe() const;                             // "fp", "converted", "fake_quant+lora"
};

struct CheckpointData {
  NamedTensors model, optimizer, extra;  // extra: RNG states etc.
  nlohmann::json state;                   // step, sampler position, config hash, ...
};

// Writes step_<N> atomically and repoints `latest`; removes older checkpoints beyond keep_last.
// Returns the checkpoint directory.
std::string save_checkpoint(const std::string& ckpt_root, int64_t step, const CheckpointData& d, int64_t keep_last);
// Finishes a re-save that a kill interrupted (latest naming .step_N.next) and removes the temp dirs
// of killed saves (dead PIDs only). save_checkpoint calls it; the trainer calls it at start.
void recover_checkpoints(const std::string& ckpt_root);
// Test hook: called with the name of each rename/fsync point of save_checkpoint ("written",
// "renamed", "latest", "next", "latest_next", "old_aside", "linked", "final_in_place",
// "latest_final"); a throw from it leaves the disk as a kill there would. Empty = none.
// QFORGE_FAULT=<point> SIGKILLs the process at that point (core/fault.h; for end-to-end tests).
void set_checkpoint_fault_hook(std::function<void(const char* point)> hook);
// Resolves a run dir, a checkpoints dir or a step dir to a step dir; "" when none exists.
std::string resolve_checkpoint(const std::string& path);
// A step dir without optimizer.safetensors (deleted to restart AdamW) loads with no optimizer state,
// saying so.
CheckpointData load_checkpoint(const std::string& step_dir, bool with_optimizer = true);

}  // namespace qf::trainer
