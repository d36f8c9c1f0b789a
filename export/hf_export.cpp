#include "export/hf_export.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "models/hf.h"
#include "peft/lora.h"

namespace qf::exporter {
namespace {
namespace sfs = std::filesystem;

// The model's weights as its forward pass uses them, under the dense model's HF names.
std::vector<std::pair<std::string, at::Tensor>> dense_weights(models::CausalLM& model) {
  at::NoGradGuard ng;
  auto dense = models::build_model(model.cfg, /*init=*/false);
  std::map<std::string, models::LinearSlot*> src;
  for (auto& ns : models::linear_slots(model)) src[ns.name] = ns.slot;
  for (auto& ns : models::linear_slots(*dense)) {
    auto it = src.find(ns.name);
    QF_CHECK(it != src.end(), "export: the model has no layer ", ns.name);
    auto* d = static_cast<models::DenseLinear*>(ns.slot->get().get());
    d->weight.copy_(it->second->get()->effective_weight().to(at::kFloat));
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
  if (p.size() > 6 && p.compare(p.size() - 6, 6, ".model") == 0) {
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

void check_out_dir(const std::string& out) {
  if (sfs::exists(out) && !(sfs::is_directory(out) && sfs::is_empty(out)))
    throw InputError(str("export: '", out, "' already exists; remove it or choose another --out"));
  const auto parent = sfs::path(out).has_parent_path() ? sfs::path(out).parent_path().string() : std::string(".");
  fs::check_writable_dir(parent);
}

std::string stage_dir(const std::string& out) {
  check_out_dir(out);
  const std::string tmp = out + ".tmp" + std::to_string(::getpid());
  fs::remove_tree(tmp);
  fs::ensure_dir(tmp);
  return tmp;
}

void commit_dir(const std::string& tmp, const std::string& out) {
  if (sfs::exists(out)) sfs::remove(out);  // an empty directory
  fs::rename_atomic(tmp, out);
}

HfExportResult export_hf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                         at::ScalarType dtype, int64_t max_shard_bytes) {
  return write_staged_dir(out, [&](const std::string& tmp) {
    const int64_t merged = peft::merge_lora(model);
    if (merged > 0) log::info("export: merged ", merged, " LoRA adapters into their base layers");
    auto weights = dense_weights(model);
    models::write_hf_weights(model.cfg, weights, tmp, dtype, max_shard_bytes);
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
