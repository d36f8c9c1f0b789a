// A module's tensors by name (parameters, then buffers): what checkpoints, exporters and tests
// save and load. Kept in models/ so the quant and peft libraries and their tests need no trainer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace qf::models {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

NamedTensors model_state(const torch::nn::Module& m);
// Copies tensors into the module's parameters/buffers by name; every entry of the module must be
// present with the same shape (error names the checkpoint file and tensor otherwise).
void load_model_state(torch::nn::Module& m, const NamedTensors& state, const std::string& origin, bool strict = true);

}  // namespace qf::models
