#include "export/hf_export.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/gguf_file.h"
#include "data/gguf_tokenizer.h"
#include "core/log.h"
#include "export/layer_view.h"
#include "models/hf.h"
#include "peft/lora.h"

namespace qf::exporter {
namespace {
namespace sfs = std::filesystem;

// The model's weights as its forward pass uses them once LoRA is merged, under the dense model's HF
// names: each linear's merged weight is computed into the dense copy one layer at a time
// (export/layer_view.h), so `model` itself is not changed.
std::vector<std::pair<std::string, at::Tensor>> dense_weights(models::CausalLM& model) {
  at::NoGradGuard ng;
  auto dense = models::build_model(model.cfg, /*init=*/false);
  std::map<std::string, models::LinearSlot*> src;
  for (auto& ns : models::linear_slots(model)) src[ns.name] = ns.slot;
  for (auto& ns : models::linear_slots(*dense)) {
    auto it = src.find(ns.name);
    QF_CHECK(it != src.end(), "export: the model has no layer ", ns.name);
    auto* d = static_cast<models::DenseLinear*>(ns.slot->get().get());
    d->weight.copy_(merged_weight(*it->second->get()).to(at::kFloat));
    if (d->bias.defined()) d->bias.copy_(it->second->get()->bias_or_undefined().to(at::kFloat));
  }
  static_cast<models::DenseEmbedding*>(dense->token_embedding().get().get())
      ->weight.copy_(model.token_embedding().get()->table().to(at::kFloat));
  // Everything else (norms, learned positions) by name.
  std::map<std::string, at::Tensor> theirs;
  for (auto& p : model.named_parameters()) theirs[p.key()] = p.value();
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::set<std::string> linear_or_embed;
  for (auto& ns : models::linear_slots(*dense)) {
    linear_or_embed.insert(ns.name + ".weight");
    linear_or_embed.insert(ns.name + ".bias");
  }
  linear_or_embed.insert(dense->token_embedding_name() + ".weight");
  for (auto& p : dense->named_parameters()) {
    if (!linear_or_embed.count(p.key())) {
      auto it = theirs.find(p.key());
      QF_CHECK(it != theirs.end(), "export: the model has no parameter ", p.key());
      p.value().copy_(it->second.to(at::kFloat));
    }
    out.emplace_back(p.key(), p.value().detach());
  }
  return out;
}

}  // namespace

void copy_tokenizer(const data::Tokenizer& tok, const std::string& dir) {
  const std::string p = tok.path();
  nlohmann::json tc = {{"model_max_length", 1000000000}, {"clean_up_tokenization_spaces", false}};
  auto name = [&](int32_t id) -> nlohmann::json {
    if (id < 0) return nullptr;
    return tok.token(id);
  };
  if (gguf_in::is_gguf_file(p)) {  // a GGUF's vocabulary, written as the tokenizer file it was rebuilt as
    const bool spm = tok.kind() == "sentencepiece";
    if (spm) fs::write_atomic(dir + "/tokenizer.model", data::gguf_sentencepiece_model(p));
    else fs::write_atomic(dir + "/tokenizer.json", data::gguf_bpe_tokenizer_json(p).dump());
    tc["tokenizer_class"] = spm ? "LlamaTokenizer" : "PreTrainedTokenizerFast";
    tc["add_bos_token"] = data::gguf_adds_bos(p);
    if (spm) {
      tc["add_eos_token"] = false;
      tc["legacy"] = true;
    }
  } else if (p.size() > 6 && p.compare(p.size() - 6, 6, ".model") == 0) {
    sfs::copy_file(p, dir + "/tokenizer.model");
    tc["tokenizer_class"] = "LlamaTokenizer";
    tc["add_bos_token"] = true;
    tc["add_eos_token"] = false;
    tc["legacy"] = true;
  } else {
    sfs::copy_file(p, dir + "/tokenizer.json");
    tc["tokenizer_class"] = "PreTrainedTokenizerFast";
  }
  tc["bos_token"] = name(tok.bos_id());
  tc["eos_token"] = name(tok.eos_id());
  if (tok.pad_id() >= 0) tc["pad_token"] = name(tok.pad_id());
  fs::write_atomic(dir + "/tokenizer_config.json", tc.dump(2) + "\n");
}

namespace {
// The path as it will be reached (symlinks of the existing part resolved).
sfs::path real(const std::string& p) {
  std::error_code ec;
  auto r = sfs::weakly_canonical(sfs::absolute(p), ec);
  return ec ? sfs::absolute(p).lexically_normal() : r;
}
bool inside(const sfs::path& p, const sfs::path& dir) {  // p == dir or below it
  auto rel = p.lexically_relative(dir);
  return !rel.empty() && *rel.begin() != "..";
}
bool is_run_dir(const sfs::path& d) {
  return sfs::exists(d / "config.yaml") && (sfs::exists(d / "checkpoints") || sfs::exists(d / "adapter"));
}
}  // namespace

void check_out(const std::string& out, const std::string& source, bool force) {
  QF_CHECK_INPUT(!out.empty(), "--out is empty");
  const sfs::path o = real(out);
  // Never inside a checkpoint directory (<run>/checkpoints/, converted/, merged/: they hold `latest`).
  for (sfs::path p = o; !p.empty(); p = p.parent_path()) {
    if (sfs::exists(p / "latest") && sfs::is_directory(p))
      throw InputError(str("--out '", out, "' is inside the checkpoint directory '", p.string(),
                           "' (it holds `latest`); writing there would destroy checkpoints, so it is refused even "
                           "with --force; choose a path outside the run's checkpoints"));
    if (p == p.parent_path()) break;
  }
  if (!source.empty() && sfs::exists(source)) {
    const sfs::path src = real(source);
    QF_CHECK_INPUT(!inside(src, o), "--out '", out, "' is or contains the source '", source,
                   "' being exported; refused even with --force; choose another --out");
    if (inside(o, src) && sfs::exists(o)) {
      const std::string top = (*o.lexically_relative(src).begin()).string();
      static const std::set<std::string> run_files = {"config.yaml", "checkpoints", "metrics.jsonl", "tb",
                                                      "train_summary.json", "adapter", "merged", "converted",
                                                      "ptq_summary.json"};
      QF_CHECK_INPUT(!(is_run_dir(src) ? run_files.count(top) > 0 : true), "--out '", out,
                     "' is one of the source's own files ('", top, "' of ", source,
                     "); refused even with --force; choose another --out");
    }
  }
  // Temp siblings of killed exports (their PID is gone); a live export's are left alone. A --force
  // replacement killed between its two renames left the old output as <out>.old<PID>: put it back.
  const auto parent = o.parent_path().string(), base = o.filename().string();
  if (!sfs::exists(o) && sfs::is_directory(parent)) {
    for (auto& e : sfs::directory_iterator(parent)) {
      const auto n = e.path().filename().string();
      const auto pre = base + ".old";
      if (n.size() > pre.size() && n.compare(0, pre.size(), pre) == 0 &&
          n.size() - pre.size() <= 9 && n.find_first_not_of("0123456789", pre.size()) == std::string::npos &&
          !fs::pid_alive(std::stol(n.substr(pre.size())))) {
        fs::rename_atomic(e.path().string(), o.string());
        break;
      }
    }
  }
  fs::remove_dead_temps(parent, [&](const std::string& b) { return b == base; });
  if (sfs::exists(out) && !(sfs::is_directory(out) && sfs::is_empty(out)) && !force)
    throw InputError(str("'", out, "' already exists; remove it, choose another --out, or pass --force to replace it"));
  fs::check_writable_dir(parent);
}

void check_out_dir(const std::string& out, bool force) {
  check_out(out, "", force);
  QF_CHECK_INPUT(!sfs::exists(out) || sfs::is_directory(out), "--out '", out,
                 "' is a file; this format writes a directory");
}

std::string stage_dir(const std::string& out, bool force) {
  check_out_dir(out, force);
  const std::string tmp = out + ".tmp" + std::to_string(::getpid());
  fs::remove_tree(tmp);
  fs::ensure_dir(tmp);
  return tmp;
}

void commit_dir(const std::string& tmp, const std::string& out) {
  if (sfs::exists(out) && sfs::is_directory(out) && sfs::is_empty(out)) {
    sfs::remove(out);
  } else if (sfs::exists(out)) {
    // --force: the old output goes aside only now that the new one is complete; a kill between the two
    // renames leaves <out>.old<PID> (and the new one in <out>.tmp<PID>).
    const std::string old = out + ".old" + std::to_string(::getpid());
    fs::remove_tree(old);
    fs::rename_atomic(out, old);
    fault("export_old_aside", out);
    fs::rename_atomic(tmp, out);
    fs::remove_tree(old);
    return;
  }
  fs::rename_atomic(tmp, out);
}

nlohmann::json hf_special_token_ids(const data::Tokenizer& tok) {
  auto id = [](int64_t i) { return i >= 0 ? nlohmann::json(i) : nlohmann::json(nullptr); };
  return {{"bos_token_id", id(tok.bos_id())}, {"eos_token_id", id(tok.eos_id())}, {"pad_token_id", id(tok.pad_id())}};
}

HfExportResult export_hf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                         at::ScalarType dtype, int64_t max_shard_bytes, bool force) {
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    const auto n_lora = peft::lora_layers(model).size();
    if (n_lora > 0) log::info("export: writing ", n_lora, " LoRA adapters merged into their base layers");
    auto weights = dense_weights(model);
    models::write_hf_weights(model.cfg, weights, tmp, dtype, max_shard_bytes, hf_special_token_ids(tok));
    copy_tokenizer(tok, tmp);
    // Re-read what was written and compare with what was meant, before reporting success.
    auto ck = models::read_hf_checkpoint(tmp);
    auto back = models::build_model(ck.config, /*init=*/false);
    models::load_hf_weights(*back, ck, false);
    std::map<std::string, at::Tensor> got;
    for (auto& p : back->named_parameters()) got[p.key()] = p.value();
    for (auto& [name, w] : weights) {
      auto it = got.find(name);
      QF_CHECK(it != got.end() && at::equal(it->second, w.to(dtype).to(at::kFloat)), "export: re-reading ", tmp,
               " gave a different '", name, "' than was written");
    }
    HfExportResult r;
    r.n_tensors = static_cast<int64_t>(weights.size());
    r.n_shards = static_cast<int64_t>(ck.files.size());
    for (auto& [n, w] : weights) r.bytes += w.numel() * at::elementSize(dtype);
    r.dir = out;
    return r;
  });
}

}  // namespace qf::exporter
