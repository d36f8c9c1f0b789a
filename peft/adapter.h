// PEFT adapter directories: adapter_model.safetensors + adapter_config.json, as
// `peft.PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained` reads them, plus
// qforge_adapter.json (qforge's extras: base storage, exact_merge), which PEFT ignores.
// Keys: base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]; modules_to_save
// as base_model.model.<module>.<param>. (tests/interop/test_peft_lora.py checks both directions.)
// Invariants: save writes a temp dir and renames it into place; load validates the config and
// every tensor's name and shape against the model before changing anything.
#pragma once
#include <torch/nn/module.h>

#include <string>

#include "peft/lora.h"

namespace qf::peft {

struct AdapterInfo {
  int64_t r = 0;
  double alpha = 0;
  bool rslora = false;
  double dropout = 0;
  std::vector<std::string> modules;          // module names with an adapter
  std::vector<std::string> modules_to_save;  // fully saved modules
};

// `fan_in_fan_out` is true for families whose HF base layers are Conv1D (GPT-2; ArchSpec::has_conv1d);
// adapters themselves are identical.
void save_adapter(torch::nn::Module& model, const LoraConfig& cfg, const std::string& dir,
                  const std::string& base_model_name, bool fan_in_fan_out);
// Reads and checks adapter_config.json (LORA only; DoRA, rank/alpha patterns rejected).
AdapterInfo read_adapter_config(const std::string& dir);
// Loads an adapter into `model`: layers that are not LoRA-wrapped yet get wrapped (normal mode)
// with the adapter's r / alpha / rslora; wrapped ones must have the same rank. Returns the info.
AdapterInfo load_adapter(torch::nn::Module& model, const std::string& dir, double dropout = 0.0);

}  // namespace qf::peft
