#include "peft/adapter.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "core/safetensors.h"
#include "core/strings.h"

namespace qf::peft {
namespace {

const std::string kPrefix = "base_model.model.";
const std::string kWeights = "adapter_model.safetensors";
const std::string kConfig = "adapter_config.json";
// qforge's own facts about the adapter, kept out of adapter_config.json (PEFT reads every key of
// that file into LoraConfig and warns "upgrade PEFT" about keys it does not know).
const std::string kExtras = "qforge_adapter.json";

std::string last_component(const std::string& name) {
  auto p = name.rfind('.');
  return p == std::string::npos ? name : name.substr(p + 1);
}

}  // namespace

void save_adapter(torch::nn::Module& model, const LoraConfig& cfg, const std::string& dir,
                  const std::string& base_model_name, bool fan_in_fan_out) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<std::string> targets;
  for (auto& [name, l] : lora_layers(model)) {
    tensors.emplace_back(kPrefix + name + ".lora_A.weight", l->lora_A->weight.detach().to(at::kFloat).cpu());
    tensors.emplace_back(kPrefix + name + ".lora_B.weight", l->lora_B->weight.detach().to(at::kFloat).cpu());
    targets.insert(last_component(name));
  }
  QF_CHECK(!tensors.empty(), "save_adapter: the model has no LoRA layers");
  for (auto& p : model.named_parameters())
    for (auto& m : cfg.modules_to_save)
      if (p.key().rfind(m + ".", 0) == 0) tensors.emplace_back(kPrefix + p.key(), p.value().detach().cpu());
  nlohmann::json c = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model_name},
      {"r", cfg.r},
      {"lora_alpha", cfg.alpha},
      {"lora_dropout", cfg.dropout},
      {"use_rslora", cfg.rslora},
      {"use_dora", false},
      {"bias", "none"},
      {"fan_in_fan_out", fan_in_fan_out},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"modules_to_save", cfg.modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(cfg.modules_to_save)},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"rank_pattern", nlohmann::json::object()},
      {"alpha_pattern", nlohmann::json::object()},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"revision", nullptr},
  };
  const nlohmann::json extras = {{"base", base_format_name(cfg.base)}, {"exact_merge", cfg.exact_merge}};
  // Build in a temp dir next to the target, then swap it in (an old adapter stays until then).
  const std::string tmp = dir + ".tmp" + std::to_string(::getpid());
  fs::remove_tree(tmp);
  fs::ensure_dir(tmp);
  st::save(tmp + "/" + kWeights, tensors, {{"format", "pt"}});
  fs::write_atomic(tmp + "/" + kConfig, c.dump(2) + "\n");
  fs::write_atomic(tmp + "/" + kExtras, extras.dump(2) + "\n");
  fs::fsync_path(tmp);
  const std::string old = dir + ".old" + std::to_string(::getpid());
  const bool had = std::filesystem::exists(dir);
  if (had) fs::rename_atomic(dir, old);
  fs::rename_atomic(tmp, dir);
  if (had) fs::remove_tree(old);
}

AdapterInfo read_adapter_config(const std::string& dir) {
  const std::string path = dir + "/" + kConfig;
  const nlohmann::json c = json_file::read(path);
  QF_CHECK_INPUT(c.is_object(), path, ": expected a JSON object");
  // A key of the wrong type ("peft_type": 1): "<path>: 'peft_type': expected a string, found a number".
  return json_file::interpret(path, [&] {
    auto type = c.value("peft_type", std::string());
    QF_CHECK_INPUT(type == "LORA", path, ": peft_type '", type, "' is not supported; qforge loads LORA adapters");
    QF_CHECK_INPUT(!c.value("use_dora", false), path, ": use_dora: true (DoRA) is not supported");
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      QF_CHECK_INPUT(!c.contains(k) || c[k].is_null() || c[k].empty(), path, ": ", k,
                     " (per-layer ranks/alphas) is not supported");
    auto bias = c.value("bias", std::string("none"));
    QF_CHECK_INPUT(bias == "none", path, ": bias '", bias, "' is not supported; expected none");
    AdapterInfo a;
    QF_CHECK_INPUT(c.contains("r") && c["r"].is_number_integer() && c["r"].get<int64_t>() > 0, path,
                   ": 'r' must be a positive integer");
    a.r = c["r"].get<int64_t>();
    QF_CHECK_INPUT(c.contains("lora_alpha") && c["lora_alpha"].is_number(), path, ": 'lora_alpha' must be a number");
    a.alpha = c["lora_alpha"].get<double>();
    a.rslora = c.value("use_rslora", false);
    a.dropout = c.contains("lora_dropout") && c["lora_dropout"].is_number() ? c["lora_dropout"].get<double>() : 0.0;
    if (c.contains("modules_to_save") && c["modules_to_save"].is_array())
      for (auto& m : c["modules_to_save"]) a.modules_to_save.push_back(m.get<std::string>());
    return a;
  });
}

AdapterInfo load_adapter(torch::nn::Module& model, const std::string& dir, double dropout) {
  AdapterInfo info = read_adapter_config(dir);
  const std::string wpath = dir + "/" + kWeights;
  auto file = st::load(wpath);
  const double scaling = info.rslora ? info.alpha / std::sqrt(static_cast<double>(info.r)) : info.alpha / info.r;

  // Pass 1: resolve and check every tensor against the model.
  std::map<std::string, models::LinearSlot*> slots;
  for (auto& ns : models::linear_slots(model)) slots[ns.name] = ns.slot;
  std::map<std::string, at::Tensor> params;
  for (auto& p : model.named_parameters()) params[p.key()] = p.value();
  struct Pair {
    at::Tensor a, b;
  };
  std::map<std::string, Pair> pairs;
  std::vector<std::pair<at::Tensor, at::Tensor>> saved;  // (model param, adapter tensor)
  for (auto& [key, t] : file.tensors) {
    QF_CHECK_INPUT(key.rfind(kPrefix, 0) == 0, wpath, ": tensor '", key, "' does not start with '", kPrefix, "'");
    std::string name = key.substr(kPrefix.size());
    std::string which;
    for (const char* suffix : {".lora_A.weight", ".lora_B.weight"})
      if (ends_with(name, suffix)) which = suffix;
    if (which.empty()) {
      auto it = params.find(name);
      QF_CHECK_INPUT(it != params.end(), wpath, ": tensor '", key, "' names neither a LoRA factor nor a model parameter");
      QF_CHECK_INPUT(it->second.sizes() == t.sizes(), wpath, ": tensor '", key, "' has shape ", t.sizes(),
                     " but the model's ", name, " has ", it->second.sizes());
      saved.emplace_back(it->second, t);
      continue;
    }
    name = name.substr(0, name.size() - which.size());
    auto it = slots.find(name);
    QF_CHECK_INPUT(it != slots.end(), wpath, ": tensor '", key, "' is for module '", name,
                   "', which is not a linear layer of this model");
    auto& base = *it->second->get();
    const bool is_a = which == ".lora_A.weight";
    const std::vector<int64_t> want = is_a ? std::vector<int64_t>{info.r, base.in_features}
                                           : std::vector<int64_t>{base.out_features, info.r};
    QF_CHECK_INPUT(t.sizes().vec() == want, wpath, ": tensor '", key, "' has shape ", t.sizes(), ", expected [", want[0],
                   ", ", want[1], "] (r = ", info.r, ", layer ", base.in_features, " -> ", base.out_features, ")");
    if (auto l = dynamic_cast<LoraLinear*>(&base)) {
      QF_CHECK_INPUT(l->r == info.r, wpath, ": module '", name, "' already has a rank-", l->r, " adapter, the file has r = ",
                     info.r);
      QF_CHECK_INPUT(std::fabs(l->scaling - scaling) <= 1e-9 * std::fabs(scaling), dir, "/", kConfig,
                     ": scaling (lora_alpha / r", info.rslora ? " with rsLoRA" : "", ") = ", scaling,
                     " differs from the run's peft settings (", l->scaling, "); set peft.alpha / peft.rslora to match");
    }
    (is_a ? pairs[name].a : pairs[name].b) = t;
  }
  for (auto& [name, p] : pairs)
    QF_CHECK_INPUT(p.a.defined() && p.b.defined(), wpath, ": module '", name, "' has only one of lora_A / lora_B");
  QF_CHECK_INPUT(!pairs.empty(), wpath, ": no LoRA tensors (expected keys like ", kPrefix,
                 "<layer prefix>.<module>.lora_A.weight)");

  // Pass 2: apply.
  at::NoGradGuard ng;
  for (auto& [name, p] : pairs) {
    auto* slot = slots[name];
    auto l = std::dynamic_pointer_cast<LoraLinear>(slot->get());
    if (!l) {
      l = std::make_shared<LoraLinear>(slot->get(), info.r, scaling, dropout, false);
      slot->replace(l);
    }
    l->lora_A->weight.copy_(p.a);
    l->lora_B->weight.copy_(p.b);
    l->lora_A->weight.set_requires_grad(true);
    l->lora_B->weight.set_requires_grad(true);
    info.modules.push_back(name);
  }
  for (auto& [param, t] : saved) param.copy_(t);
  return info;
}

}  // namespace qf::peft
