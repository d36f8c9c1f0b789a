#include "trainer/checkpoint.h"

#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "core/error.h"
#include "core/fault.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "trainer/adamw8bit.h"
#include "trainer/trainer_config.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

NamedTensors optimizer_state(const torch::nn::Module& m, torch::optim::Optimizer& optimizer) {
  if (auto* a8 = dynamic_cast<AdamW8bit*>(&optimizer)) return adamw8bit_state(m, *a8);
  auto* adamw = dynamic_cast<torch::optim::AdamW*>(&optimizer);
  TORCH_INTERNAL_ASSERT(adamw, "optimizer_state: neither AdamW nor AdamW8bit");
  auto& opt = *adamw;
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

void load_optimizer_state(const torch::nn::Module& m, torch::optim::Optimizer& optimizer, const NamedTensors& state,
                          const std::string& origin) {
  // Which optimizer wrote the file (its entry names), against the one this run uses.
  auto* a8 = dynamic_cast<AdamW8bit*>(&optimizer);
  bool file_adamw = false, file_8bit = false;
  for (auto& [k, t] : state) {
    file_adamw = file_adamw || k.rfind("exp_avg/", 0) == 0 || k.rfind("exp_avg_sq/", 0) == 0;
    file_8bit = file_8bit || k.rfind("state1/", 0) == 0 || k.rfind("state2/", 0) == 0 || k.rfind("absmax1/", 0) == 0 ||
                k.rfind("absmax2/", 0) == 0;
  }
  if ((a8 && file_adamw) || (!a8 && file_8bit)) {
    const std::string file = cfg::name_of(optim_names(), a8 ? OptimName::AdamW : OptimName::AdamW8bit);
    const std::string run = cfg::name_of(optim_names(), a8 ? OptimName::AdamW8bit : OptimName::AdamW);
    throw InputError(str(origin, ": holds ", file, " optimizer state (trainer.optim.name: ", file,
                         ") but this run's trainer.optim.name is ", run, ". Set trainer.optim.name: ", file,
                         " to resume with that optimizer, or delete ", origin,
                         " to start ", run, " from zero moments (weights, step and data position still resume)"));
  }
  if (a8) {
    size_t n_params = 0, n_train = 0;
    for (auto& [k, t] : state) n_params += k.rfind("step/", 0) == 0;
    for (auto& p : m.named_parameters()) n_train += p.value().requires_grad();
    load_adamw8bit_state(m, *a8, state, origin,
                         str(" (the file holds 8-bit AdamW state for ", n_params, " parameter", n_params == 1 ? "" : "s",
                             ", the model trains ", n_train, "): it belongs to another model or run. Resume the run it "
                             "belongs to, or delete ", origin, " to restart the optimizer from zero moments with these weights"));
    return;
  }
  auto* adamw = dynamic_cast<torch::optim::AdamW*>(&optimizer);
  TORCH_INTERNAL_ASSERT(adamw, "load_optimizer_state: neither AdamW nor AdamW8bit");
  auto& opt = *adamw;
  std::map<std::string, at::Tensor> by;
  for (auto& [n, t] : state) by[n] = t;
  // The file must be this model's: every entry AdamW state of one of its trainable parameters, in its
  // shape. A parameter may lack state (it never received a gradient), and each ZeRO rank below keeps
  // only its own share; but state for a parameter the model does not train, or in another shape,
  // means the file belongs to another model or run, and silently restarting AdamW would hide that.
  std::map<std::string, at::Tensor> trainable;
  for (auto& p : m.named_parameters())
    if (p.value().requires_grad()) trainable[p.key()] = p.value();
  size_t n_state = 0;
  for (auto& [k, t] : by) n_state += k.rfind("exp_avg/", 0) == 0;
  const std::string advice =
      str(" (the file holds AdamW state for ", n_state, " parameter", n_state == 1 ? "" : "s", ", the model trains ",
          trainable.size(), "): it belongs to another model or run. Resume the run it belongs to, or delete ", origin,
          " to restart the optimizer from zero moments with these weights");
  for (auto& [k, t] : by) {
    const auto slash = k.find('/');
    const std::string kind = k.substr(0, slash), name = slash == std::string::npos ? "" : k.substr(slash + 1);
    QF_CHECK_INPUT(kind == "exp_avg" || kind == "exp_avg_sq" || kind == "step", origin, ": entry '", k,
                   "' is not AdamW state (exp_avg/<parameter>, exp_avg_sq/<parameter> or step/<parameter>)", advice);
    auto p = trainable.find(name);
    QF_CHECK_INPUT(p != trainable.end(), origin, ": holds optimizer state for '", name,
                   "', which is not a trainable parameter of this model", advice);
    if (kind == "step")
      QF_CHECK_INPUT(t.numel() == 1, origin, ": '", k, "' has shape ", t.sizes(), ", expected a scalar step count", advice);
    else
      QF_CHECK_INPUT(t.sizes() == p->second.sizes(), origin, ": optimizer state '", k, "' has shape ", t.sizes(),
                     " but parameter '", name, "' has shape ", p->second.sizes(), advice);
  }
  auto& st = opt.state();
  std::set<const void*> mine;  // under ZeRO an optimizer holds only its rank's share of the parameters
  for (auto& g : opt.param_groups())
    for (auto& p : g.params()) mine.insert(p.unsafeGetTensorImpl());
  for (auto& [name, param] : trainable) {
    auto a = by.find("exp_avg/" + name);
    auto b = by.find("exp_avg_sq/" + name);
    auto s = by.find("step/" + name);
    const bool any = a != by.end() || b != by.end() || s != by.end();
    if (!any) continue;  // parameter never stepped
    QF_CHECK_INPUT(a != by.end() && b != by.end() && s != by.end(), origin, ": incomplete optimizer state for '", name,
                   "' (exp_avg/, exp_avg_sq/ and step/ go together)", advice);
    if (!mine.count(param.unsafeGetTensorImpl())) continue;
    auto ps = std::make_unique<torch::optim::AdamWParamState>();
    ps->step(s->second.item<int64_t>());
    ps->exp_avg(a->second.to(param.device()).clone());
    ps->exp_avg_sq(b->second.to(param.device()).clone());
    st[param.unsafeGetTensorImpl()] = std::move(ps);
  }
}

static std::string step_name(int64_t step) {
  char b[32];
  std::snprintf(b, sizeof b, "step_%08lld", static_cast<long long>(step));
  return b;
}

const cfg::Names<ModelFormat>& model_format_names() {
  static const cfg::Names<ModelFormat> n{
      {"fp", ModelFormat::Fp}, {"fake_quant", ModelFormat::FakeQuant}, {"converted", ModelFormat::Converted}};
  return n;
}

void ModelMeta::write_to(nlohmann::json& state) const {
  state["model_format"] = cfg::name_of(model_format_names(), format);
  state["lora"] = lora;
  if (!family.empty()) state["model_family"] = family;
  if (vocab_size > 0) state["vocab_size"] = vocab_size;
  if (model_bytes >= 0) state["model_bytes"] = model_bytes;
}

ModelMeta ModelMeta::read_from(const nlohmann::json& state) {
  ModelMeta m;
  const std::string f = state.value("model_format", std::string("fp"));
  for (const auto& [n, v] : model_format_names())
    if (n == f) m.format = v;
  m.lora = state.value("lora", false);
  m.family = state.value("model_family", std::string());
  m.vocab_size = state.value("vocab_size", int64_t{0});
  m.model_bytes = state.value("model_bytes", int64_t{-1});
  return m;
}

std::string ModelMeta::describe() const {
  return cfg::name_of(model_format_names(), format) + (lora ? "+lora" : "");
}

namespace {
// trainer_state.json as written by save_checkpoint's callers: each known key, when present, has its
// JSON type (and range), so every reader of CheckpointData::state may use .value() without meeting a
// type error; unknown keys are left alone. Errors: "<path>: '<key>': expected ..., found <value>".
void check_state(const nlohmann::json& s, const std::string& path) {
  QF_CHECK_INPUT(s.is_object(), path, ": expected a JSON object (step, sampler, model_format, ...), found ", s.dump());
  enum Kind { Count, Positive, Number, String, Bool, Object };
  auto check = [&](const nlohmann::json& o, const std::string& prefix, const char* key, Kind kind) {
    if (!o.contains(key)) return;
    const auto& v = o[key];
    const bool integer = v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(INT64_MAX) : v.is_number_integer();
    const int64_t i = integer ? v.get<int64_t>() : 0;
    const char* want = nullptr;
    switch (kind) {
      case Count: want = integer && i >= 0 ? nullptr : "a non-negative integer"; break;
      case Positive: want = integer && i > 0 ? nullptr : "a positive integer"; break;
      case Number: want = v.is_number() ? nullptr : "a number"; break;
      case String: want = v.is_string() ? nullptr : "a string"; break;
      case Bool: want = v.is_boolean() ? nullptr : "true or false"; break;
      case Object: want = v.is_object() ? nullptr : "an object"; break;
    }
    QF_CHECK_INPUT(!want, path, ": '", prefix, key, "': expected ", want, ", found ", v.dump());
  };
  for (const char* k : {"step", "tokens_seen", "model_bytes"}) check(s, "", k, Count);
  check(s, "", "vocab_size", Positive);
  check(s, "", "last_val_loss", Number);
  for (const char* k : {"config_hash", "model_format", "model_family", "ptq"}) check(s, "", k, String);
  check(s, "", "lora", Bool);
  check(s, "", "sampler", Object);
  if (s.contains("sampler"))
    for (const char* k : {"epoch", "cursor"}) check(s["sampler"], "sampler.", k, Count);
  if (s.contains("model_format")) {
    const std::string f = s["model_format"].get<std::string>();
    const auto& all = model_format_names();
    std::string names;  // "fp, fake_quant or converted"
    bool known = false;
    for (size_t i = 0; i < all.size(); ++i) {
      names += (i == 0 ? "" : i + 1 == all.size() ? " or " : ", ") + all[i].first;
      known = known || all[i].first == f;
    }
    QF_CHECK_INPUT(known, path, ": 'model_format': expected ", names, ", found \"", f, "\"");
  }
}

// A fault-injection point (core/fault.h) after each rename/fsync step of a save.
void fault(const char* point) { qf::fault(point); }

std::string read_latest(const std::string& root) {
  if (!sfs::exists(root + "/latest")) return "";
  std::string n = fs::read_file(root + "/latest");
  while (!n.empty() && (n.back() == '\n' || n.back() == ' ')) n.pop_back();
  return n;
}

// `dst` (absent) becomes a complete copy of the flat directory `src`: hard links where the file system
// allows them (no bytes copied), else copies; fsynced before it is renamed into place by the caller.
void link_dir(const std::string& src, const std::string& dst) {
  fs::remove_tree(dst);
  fs::ensure_dir(dst);
  for (auto& e : sfs::directory_iterator(src)) {
    const std::string to = dst + "/" + e.path().filename().string();
    if (::link(e.path().c_str(), to.c_str()) != 0) {
      std::error_code ec;
      sfs::copy_file(e.path(), to, ec);
      QF_CHECK_INPUT(!ec, "checkpoint: cannot copy '", e.path().string(), "' to '", to, "': ", ec.message());
      fs::fsync_path(to);
    }
  }
  fs::fsync_path(dst);
}

// Second half of a re-save. On entry `latest` names the complete .<name>.next; step dir <name> may
// hold the previous save, a finished copy of .next, or nothing. Every step leaves `latest` naming a
// complete directory: <name> is moved aside (latest still names .next), a linked copy of .next is
// built under a temp name and renamed to <name>, latest is repointed to <name>, then the spares go.
void promote_next(const std::string& root, const std::string& name) {
  const std::string pid = std::to_string(::getpid());
  const std::string final_dir = root + "/" + name, next = root + "/." + name + ".next";
  const std::string old = root + "/." + name + ".old" + pid, link = root + "/." + name + ".link" + pid;
  fs::remove_tree(old);  // this process's own, from an earlier failed attempt
  if (sfs::exists(final_dir)) {
    fs::rename_atomic(final_dir, old);
    fault("old_aside");
  }
  link_dir(next, link);
  fault("linked");
  fs::rename_atomic(link, final_dir);
  fault("final_in_place");
  fs::write_atomic(root + "/latest", name + "\n");
  fault("latest_final");
  fs::remove_tree(old);
  fs::remove_tree(next);
}
}  // namespace

void set_checkpoint_fault_hook(std::function<void(const char* point)> hook) { qf::set_fault_hook(std::move(hook)); }

void recover_checkpoints(const std::string& root) {
  if (!sfs::is_directory(root)) return;
  const std::string latest = read_latest(root);
  // An interrupted re-save: latest names .step_N.next (complete); finish moving it to step_N.
  if (latest.size() > 6 && latest[0] == '.' && latest.compare(latest.size() - 5, 5, ".next") == 0 &&
      sfs::exists(root + "/" + latest + "/model.safetensors"))
    promote_next(root, latest.substr(1, latest.size() - 6));
  const std::string now = read_latest(root);
  std::vector<std::string> stale;
  for (auto& e : sfs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n[0] == '.' && n.size() > 5 && n.compare(n.size() - 5, 5, ".next") == 0 && n != now) stale.push_back(e.path());
  }
  for (auto& p : stale) fs::remove_tree(p);
  // Temp / moved-aside / link dirs of saves that were killed (their PID is gone; a live one's are kept).
  fs::remove_dead_temps(root, [](const std::string& base) { return base.rfind(".step_", 0) == 0; });
}

std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& d, int64_t keep_last) {
  fs::ensure_dir(root);
  recover_checkpoints(root);
  const std::string name = step_name(step);
  const std::string final_dir = root + "/" + name;
  const std::string tmp = root + "/." + name + ".tmp" + std::to_string(::getpid());
  fs::remove_tree(tmp);
  fs::ensure_dir(tmp);
  try {
    st::save(tmp + "/model.safetensors", d.model);
    st::save(tmp + "/optimizer.safetensors", d.optimizer);
    st::save(tmp + "/extra.safetensors", d.extra);
    fs::write_atomic(tmp + "/trainer_state.json", d.state.dump(2) + "\n");
    fs::fsync_path(tmp);
  } catch (...) {
    fs::remove_tree(tmp);  // a full disk: nothing partial stays behind
    throw;
  }
  fault("written");
  if (!sfs::exists(final_dir)) {
    fs::rename_atomic(tmp, final_dir);
    fault("renamed");
    fs::write_atomic(root + "/latest", name + "\n");
    fault("latest");
  } else {
    // Re-saving a step (e.g. after a resume): `latest` always names a complete directory. The new
    // save becomes .<name>.next, latest is pointed at it, and only then is <name> replaced.
    const std::string next = root + "/." + name + ".next";
    fs::remove_tree(next);  // recover_checkpoints left none that latest names
    fs::rename_atomic(tmp, next);
    fault("next");
    fs::write_atomic(root + "/latest", "." + name + ".next\n");
    fault("latest_next");
    promote_next(root, name);
  }
  // Retention: keep the newest keep_last step_* directories.
  std::vector<std::string> steps;
  for (auto& e : sfs::directory_iterator(root)) {
    auto n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0) steps.push_back(n);
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
      const std::string n = read_latest(root);
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
    // Deleted on purpose (the way out of a foreign one): AdamW restarts, everything else resumes.
    if (sfs::exists(dir + "/optimizer.safetensors"))
      d.optimizer = st::load(dir + "/optimizer.safetensors").tensors;
    else
      log::warn(dir, " has no optimizer.safetensors: AdamW restarts from zero moments (weights, step and data "
                     "position resume)");
    d.extra = st::load(dir + "/extra.safetensors").tensors;
  }
  const std::string state_path = dir + "/trainer_state.json";
  d.state = json_file::read(state_path);
  check_state(d.state, state_path);
  return d;
}

}  // namespace qf::trainer
