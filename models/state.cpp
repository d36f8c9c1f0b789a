#include "models/state.h"

#include <ATen/ATen.h>

#include <map>

#include "core/error.h"

namespace qf::models {

NamedTensors model_state(const torch::nn::Module& m) {
  NamedTensors out;
  for (auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  for (auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

void load_model_state(torch::nn::Module& m, const NamedTensors& state, const std::string& origin, bool strict) {
  std::map<std::string, at::Tensor> by;
  for (auto& [n, t] : state) by[n] = t;
  at::NoGradGuard ng;
  auto assign = [&](const std::string& name, at::Tensor dst) {
    auto it = by.find(name);
    if (it == by.end()) {
      QF_CHECK_INPUT(!strict, origin, ": missing tensor '", name, "' expected by the model (shape ", dst.sizes(), ")");
      return;
    }
    QF_CHECK_INPUT(it->second.sizes() == dst.sizes(), origin, ": tensor '", name, "' has shape ", it->second.sizes(),
                   " but the model expects ", dst.sizes(), " (does the config match the checkpoint?)");
    dst.copy_(it->second);
    by.erase(it);
  };
  for (auto& p : m.named_parameters()) assign(p.key(), p.value());
  for (auto& b : m.named_buffers()) assign(b.key(), b.value());
  if (strict && !by.empty())
    throw InputError(str(origin, ": tensor '", by.begin()->first, "' (and ", by.size() - 1,
                         " more) is not part of the model (does the config match the checkpoint?)"));
}

}  // namespace qf::models
