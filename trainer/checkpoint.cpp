#include "trainer/checkpoint.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

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

NamedTensors optimizer_state(const torch::nn::Module& m, torch::optim::AdamW& opt) {
  NamedTensors out;
  auto& st = opt.state();
  for (auto& p : m.named_parameters()) {
    auto it = st.find(p.value().unsafeGetTensorImpl());
    if (it == st.end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    out.emplace_back("exp_avg/" + p.key(), s.exp_avg());
    out.emplace_back("exp_avg_sq/" + p.key(), s.exp_avg_sq());
    out.emplace_back("step/" + p.key(), at::scalar_tensor(static_cast<int64_t>(s.step()), at::kLong));
  }
  return out;
}

void load_optimizer_state(const torch::nn::Module& m, torch::optim::AdamW& opt, const NamedTensors& state,
                          const std::string& origin) {
  std::map<std::string, at::Tensor> by;
  for (auto& [n, t] : state) by[n] = t;
  auto& st = opt.state();
  std::set<const void*> mine;  // under ZeRO an optimizer holds only its rank's share of the parameters
  for (auto& g : opt.param_groups())
    for (auto& p : g.params()) mine.insert(p.unsafeGetTensorImpl());
  for (auto& p : m.named_parameters()) {
    if (!p.value().requires_grad() || !mine.count(p.value().unsafeGetTensorImpl())) continue;
    auto a = by.find("exp_avg/" + p.key());
    if (a == by.end()) continue;  // parameter never stepped
    auto b = by.find("exp_avg_sq/" + p.key());
    auto s = by.find("step/" + p.key());
    QF_CHECK_INPUT(b != by.end() && s != by.end(), origin, ": incomplete optimizer state for '", p.key(), "'");
    QF_CHECK_INPUT(a->second.sizes() == p.value().sizes(), origin, ": optimizer state for '", p.key(), "' has shape ",
                   a->second.sizes(), ", parameter has ", p.value().sizes());
    auto ps = std::make_unique<torch::optim::AdamWParamState>();
    ps->step(s->second.item<int64_t>());
    ps->exp_avg(a->second.to(p.value().device()).clone());
    ps->exp_avg_sq(b->second.to(p.value().device()).clone());
    st[p.value().unsafeGetTensorImpl()] = std::move(ps);
  }
}

static std::string step_name(int64_t step) {
  char b[32];
  std::snprintf(b, sizeof b, "step_%08lld", static_cast<long long>(step));
  return b;
}

std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& d, int64_t keep_last) {
  fs::ensure_dir(root);
  const std::string name = step_name(step);
  const std::string final_dir = root + "/" + name;
  const std::string tmp = root + "/." + name + ".tmp" + std::to_string(::getpid());
  fs::remove_tree(tmp);
  fs::ensure_dir(tmp);
  st::save(tmp + "/model.safetensors", d.model);
  st::save(tmp + "/optimizer.safetensors", d.optimizer);
  st::save(tmp + "/extra.safetensors", d.extra);
  fs::write_atomic(tmp + "/trainer_state.json", d.state.dump(2) + "\n");
  fs::fsync_path(tmp);
  if (sfs::exists(final_dir)) {
    // Re-saving the same step (e.g. after resume): move the old one aside first.
    const std::string old = root + "/." + name + ".old" + std::to_string(::getpid());
    fs::rename_atomic(final_dir, old);
    fs::rename_atomic(tmp, final_dir);
    fs::remove_tree(old);
  } else {
    fs::rename_atomic(tmp, final_dir);
  }
  fs::write_atomic(root + "/latest", name + "\n");
  // Retention: keep the newest keep_last step_* directories.
  std::vector<std::string> steps;
  for (auto& e : sfs::directory_iterator(root)) {
    auto n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0) steps.push_back(n);
    if (e.is_directory() && n[0] == '.' && n.find(".tmp") != std::string::npos) fs::remove_tree(e.path());  // stale temp dirs
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + keep_last < steps.size(); ++i)
    if (steps[i] != name) fs::remove_tree(root + "/" + steps[i]);
  return final_dir;
}

std::string resolve_checkpoint(const std::string& path) {
  if (path.empty() || !sfs::exists(path)) return "";
  if (sfs::exists(path + "/model.safetensors")) return path;
  for (std::string root : {path + "/checkpoints", path}) {
    if (sfs::exists(root + "/latest")) {
      std::string n = fs::read_file(root + "/latest");
      while (!n.empty() && (n.back() == '\n' || n.back() == ' ')) n.pop_back();
      QF_CHECK_INPUT(sfs::exists(root + "/" + n + "/model.safetensors"), root, "/latest points to '", n,
                     "', which has no model.safetensors");
      return root + "/" + n;
    }
  }
  return "";
}

CheckpointData load_checkpoint(const std::string& dir, bool with_optimizer) {
  CheckpointData d;
  d.model = st::load(dir + "/model.safetensors").tensors;
  if (with_optimizer) {
    d.optimizer = st::load(dir + "/optimizer.safetensors").tensors;
    d.extra = st::load(dir + "/extra.safetensors").tensors;
  }
  std::string js = fs::read_file(dir + "/trainer_state.json");
  try {
    d.state = nlohmann::json::parse(js);
  } catch (const std::exception& e) {
    throw InputError(str(dir, "/trainer_state.json: not valid JSON: ", e.what()));
  }
  return d;
}

}  // namespace qf::trainer
