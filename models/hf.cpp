#include "models/hf.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/strings.h"
#include "core/safetensors.h"
#include "models/arch.h"
#include "models/gguf_config.h"
#include "models/hf_config.h"
#include "models/hf_quantized.h"

namespace qf::models {
namespace {

namespace sfs = std::filesystem;
using json = nlohmann::json;

// Tensors a checkpoint may carry that the model has no use for.
bool ignorable(const std::string& name, const ModelConfig& c, const ArchSpec& a) {
  for (auto& s : a.ignored_suffixes)
    if (ends_with(name, s)) return true;
  return c.tie_embeddings && !a.lm_head.empty() && name == a.lm_head + ".weight";  // the tied copy some exporters keep
}

}  // namespace

HfCheckpoint read_hf_checkpoint(const std::string& dir) {
  HfCheckpoint ck;
  ck.dir = dir;
  if (is_gguf_file(dir)) {
    const auto info = gguf_model_info(*gguf_in::File::open(dir));
    ck.architecture = "gguf:" + info.arch;
    ck.torch_dtype = "float32";
    ck.config = info.config;
    ck.notes = info.notes;
    ck.gguf = true;
    return ck;
  }
  const std::string cpath = dir + "/config.json";
  QF_CHECK_INPUT(sfs::is_directory(dir), "'", dir, "' is not a directory (expected a Hugging Face checkpoint)");
  QF_CHECK_INPUT(sfs::exists(cpath), "'", dir, "' has no config.json; is it a Hugging Face checkpoint directory?");
  HfConfig hc = parse_hf_config(fs::read_file(cpath), cpath);
  ck.architecture = std::move(hc.architecture);
  ck.torch_dtype = std::move(hc.torch_dtype);
  ck.config = hc.config;
  ck.notes = std::move(hc.notes);
  ck.quant = std::move(hc.quant);

  const std::string index = dir + "/model.safetensors.index.json";
  if (sfs::exists(index)) {
    const json ij = json_file::read(index);
    QF_CHECK_INPUT(ij.contains("weight_map") && ij["weight_map"].is_object(), index, ": missing the 'weight_map' object");
    std::set<std::string> files;
    for (auto it = ij["weight_map"].begin(); it != ij["weight_map"].end(); ++it) {
      QF_CHECK_INPUT(it->is_string(), index, ": weight_map['", it.key(), "'] is not a file name");
      const std::string f = it->get<std::string>();
      QF_CHECK_INPUT(f.find('/') == std::string::npos && f.find("..") == std::string::npos, index, ": shard name '", f,
                     "' must be a plain file name in the checkpoint directory");
      ck.weight_map[it.key()] = f;
      files.insert(f);
    }
    for (auto& f : files) {
      QF_CHECK_INPUT(sfs::exists(dir + "/" + f), index, ": shard '", f, "' is listed but missing from ", dir);
      ck.files.push_back(f);
    }
  } else {
    QF_CHECK_INPUT(sfs::exists(dir + "/model.safetensors"), "'", dir,
                   "' has neither model.safetensors nor model.safetensors.index.json (only safetensors checkpoints load)");
    ck.files.push_back("model.safetensors");
  }
  return ck;
}

void load_hf_weights(CausalLM& model, const HfCheckpoint& ck, bool progress, bool populate,
                     const LinearStreamer* streamer, HfLoadReport* report) {
  QF_CHECK(!ck.gguf, ck.dir, " is a GGUF file: its weights load through exporter::load_gguf_weights");
  std::map<std::string, at::Tensor> params;
  for (auto& p : model.named_parameters()) params[p.key()] = p.value();
  const ArchSpec& arch = arch_spec(ck.config.family);
  // Pass 1: headers only (no tensor data is read), every check before any copy.
  std::map<std::string, std::string> found;  // param -> file
  std::vector<std::string> problems;
  std::map<std::string, QuantizedParts> qlinears;  // quantized linear -> its packed parts
  std::set<std::string> qnames;                    // the tensors those parts are
  for (auto& f : ck.files) {
    const std::string path = ck.dir + "/" + f;
    for (auto& e : st::read_header(path).entries) {
      const std::string& name = e.name;
      if (!ck.weight_map.empty()) {
        auto w = ck.weight_map.find(name);
        if (w == ck.weight_map.end() || w->second != f) {
          problems.push_back(qf::str(path, ": tensor '", name, "' is not listed for this shard in model.safetensors.index.json"));
          continue;
        }
      }
      if (ck.quant.quantized()) {  // a packed part of a quantized linear: checked per linear below
        std::string lin;
        const std::string part = quantized_part(ck.quant, name, e.dtype, lin);
        if (!part.empty() && params.count(lin + ".weight")) {
          qlinears[lin][part] = QuantizedPart{path, e};
          qnames.insert(name);
          continue;
        }
      }
      auto it = params.find(name);
      if (it == params.end()) {
        if (!ignorable(name, ck.config, arch))
          problems.push_back(qf::str(path, ": unexpected tensor '", name, "' for ", ck.architecture, " (not loaded)"));
        continue;
      }
      auto want = it->second.sizes().vec();
      if (arch.is_conv1d_weight(name)) std::swap(want[0], want[1]);
      if (e.shape != want)
        problems.push_back(qf::str(path, ": tensor '", name, "' has shape ", at::IntArrayRef(e.shape),
                                   " but config.json implies ", at::IntArrayRef(want)));
      if (!at::isFloatingType(st::scalar_type(e.dtype)))
        problems.push_back(qf::str(path, ": tensor '", name, "' has dtype ", st::info(e.dtype).name,
                                   ", expected a float type"));
      found[name] = f;
    }
  }
  for (auto& [lin, parts] : qlinears) {
    const std::string wname = lin + ".weight";
    const auto& w = params.at(wname);
    if (found.count(wname)) {
      problems.push_back(qf::str(found[wname], ": '", wname, "' is stored both in float and packed (", lin, ".",
                                 parts.begin()->first, "); a linear is one or the other"));
      continue;
    }
    if (arch.is_conv1d_weight(wname)) {
      problems.push_back(qf::str(parts.begin()->second.file, ": ", lin, " is a packed Conv1D layer; ", ck.architecture,
                                 " checkpoints are read in float only"));
      continue;
    }
    for (auto& p : check_quantized_linear(ck.quant, lin, w.size(0), w.size(1), parts)) problems.push_back(std::move(p));
    found[wname] = parts.begin()->second.file;
  }
  for (auto& [name, p] : params)
    if (!found.count(name)) problems.push_back(qf::str(ck.dir, ": weight '", name, "' is missing from the checkpoint"));
  if (!problems.empty()) {
    std::string msg = str("cannot load ", ck.dir, " (", problems.size(), " problem", problems.size() > 1 ? "s" : "", "):");
    for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  - " + problems[i];
    if (problems.size() > 20) msg += str("\n  ... and ", problems.size() - 20, " more");
    throw InputError(msg);
  }
  // The packed tensors' data rules (g_idx range, weight_shape), also before anything is copied.
  std::map<std::string, st::File> qfiles;  // quantized parts' files, mapped once (nothing populated)
  auto qtensor = [&](const QuantizedPart& p) {
    auto f = qfiles.find(p.file);
    if (f == qfiles.end()) f = qfiles.emplace(p.file, st::load(p.file, /*populate=*/false)).first;
    return f->second.get(p.entry.name);
  };
  for (auto& [lin, parts] : qlinears) {
    std::map<std::string, at::Tensor> small;
    for (const char* part : {"g_idx", "weight_g_idx", "weight_shape", "weight_format"})
      if (parts.count(part)) small[part] = qtensor(parts.at(part));
    if (ck.quant.method == HfQuantMethod::Bnb4)  // the quant_state JSON, and the others' sizes (mapped, unread)
      for (auto& [part, where] : parts) small[part] = qtensor(where);
    const auto& w = params.at(lin + ".weight");
    check_quantized_data(ck.quant, lin, w.size(0), w.size(1), parts, small);
  }
  // Linears a streamer builds itself: their weights skip the dense parameter (never touched, so its
  // pages are never faulted in) and are read in pass 3.
  std::map<std::string, LinearSlot*> streamed;  // weight name -> slot
  if (streamer)
    for (auto& ns : linear_slots(model))
      if (std::dynamic_pointer_cast<DenseLinear>(ns.slot->get()) && streamer->claims(ns.name))
        streamed[ns.name + ".weight"] = ns.slot;
  // Pass 2, one shard mapped at a time. A tensor whose dtype and layout already match the parameter
  // becomes the parameter's storage (zero-copy: the page cache backs it, copy-on-write); others are
  // converted into the parameter and their source pages are dropped right away, so peak memory
  // stays near one copy of the model.
  at::NoGradGuard ng;
  std::unique_ptr<core::ProgressBar> bar;
  if (progress) bar = std::make_unique<core::ProgressBar>("load", static_cast<int64_t>(params.size()), 0, "tensor");
  int64_t done = 0;
  // A streaming load never populates: MADV_POPULATE_READ would make a whole shard resident at once.
  const bool populate_files = populate && streamed.empty();
  for (auto& f : ck.files) {
    auto file = st::load(ck.dir + "/" + f, populate_files);
    for (auto& [name, t] : file.tensors) {
      auto it = params.find(name);
      if (it == params.end() || streamed.count(name) || qnames.count(name)) continue;
      const bool transpose = arch.is_conv1d_weight(name);
      auto& p = it->second;
      if (!transpose && t.scalar_type() == p.scalar_type() && t.is_contiguous() && t.numel() > 0) {
        p.set_data(t);
      } else {
        p.copy_(transpose ? t.t() : t);
        st::drop_pages(t);
      }
      if (bar) bar->update(++done);
    }
  }
  // Pass 2b: each packed linear dequantized (float32, then the model dtype) into its weight, or
  // handed to the streamer like a dense weight (pass 3's rules), one linear resident at a time.
  int64_t kept = 0;  // linears a streamer kept packed
  for (auto& [lin, parts] : qlinears) {
    const std::string wname = lin + ".weight";
    std::map<std::string, at::Tensor> ts;
    for (auto& [part, where] : parts) ts[part] = qtensor(where);
    auto& p = params.at(wname);
    auto s = streamed.find(wname);
    // A streamer that keeps this linear packed (bitsandbytes NF4 as its bytes; GPTQ / AWQ /
    // compressed-tensors parts as they are) installs its module instead of the dequantized weight.
    std::shared_ptr<LinearBase> keep;
    if (s != streamed.end()) {
      const auto& bias = static_cast<DenseLinear&>(*s->second->get()).bias;
      PackedNf4 pk;
      if (streamer->build_nf4 && bnb_packed_nf4(ck.quant, lin, p.size(0), p.size(1), parts, ts, p.scalar_type(), pk))
        keep = streamer->build_nf4(lin, pk, bias);
      else if (streamer->build_packed && ck.quant.method != HfQuantMethod::Bnb4)
        keep = streamer->build_packed(lin, ck.quant, ts, p.size(0), p.size(1), bias);
    }
    if (keep) {
      TORCH_INTERNAL_ASSERT(keep->in_features == p.size(1) && keep->out_features == p.size(0),
                            "LinearStreamer built a module of the wrong shape for ", lin);
      for (auto& [part, t] : ts) st::drop_pages(t);
      if (report) report->kept_packed.push_back(lin);
      ++kept;
      s->second->replace(std::move(keep));
      params.erase(wname);
      streamed.erase(s);
      if (bar) bar->update(++done);
      continue;
    }
    at::Tensor w = dequantize_linear(ck.quant, lin, p.size(0), p.size(1), parts, ts);
    for (auto& [part, t] : ts) st::drop_pages(t);
    if (report) report->dequantized.emplace_back(lin, describe_quantized_linear(ck.quant, lin, parts));
    if (s == streamed.end()) {
      p.copy_(w);
    } else {
      LinearSlot& slot = *s->second;
      auto& dense = static_cast<DenseLinear&>(*slot.get());
      if (!streamer->mapped) w = w.to(dense.weight.scalar_type()).contiguous();
      auto m = streamer->build(lin, w, dense.bias);
      TORCH_INTERNAL_ASSERT(m && m->in_features == dense.in_features && m->out_features == dense.out_features,
                            "LinearStreamer built a module of the wrong shape for ", lin);
      slot.replace(std::move(m));
      params.erase(wname);
      streamed.erase(s);
    }
    if (bar) bar->update(++done);
  }
  qfiles.clear();
  if (!qlinears.empty())
    log::info(ck.dir, ": ", qlinears.size(), " packed linears (", ck.quant.describe(), "): ",
              static_cast<int64_t>(qlinears.size()) - kept, " dequantized to ", (model.cfg.dtype == DType::BF16 ? "bf16" : "fp32"),
              kept ? str(", ", kept, " kept packed as ", ck.quant.method == HfQuantMethod::Bnb4 ? "NF4" : ck.quant.method == HfQuantMethod::Bnb8 ? "LLM.int8" : "int",
                         " frozen bases") : std::string());
  // Pass 3 (streamer only): each claimed linear is built from its weight as the dense layer would
  // have held it (converted to the model dtype / transposed like p.copy_ above, else the mapped tensor
  // itself), installed, and the weight's pages are dropped before the next is read.
  for (auto& f : streamed.empty() ? std::vector<std::string>{} : ck.files) {
    auto file = st::load(ck.dir + "/" + f, /*populate=*/false);
    for (auto& [name, t] : file.tensors) {
      auto s = streamed.find(name);
      if (s == streamed.end() || qnames.count(name)) continue;
      LinearSlot& slot = *s->second;
      const std::string lin = name.substr(0, name.size() - 7);  // minus ".weight"
      auto& dense = static_cast<DenseLinear&>(*slot.get());
      const bool transpose = arch.is_conv1d_weight(name);
      // Widening bf16/fp16 to an fp32 model is exact: the builder reads the file's values directly
      // rather than through a full-precision copy (which would also fragment the heap, tensor after tensor).
      const auto pd = dense.weight.scalar_type();
      const bool widen = pd == at::kFloat && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf);
      at::Tensor w = transpose ? t.t() : t;
      const auto want = widen ? t.scalar_type() : pd;
      if (!streamer->mapped && (w.scalar_type() != want || !w.is_contiguous())) w = w.to(want).contiguous();
      auto m = streamer->build(lin, w, dense.bias);
      TORCH_INTERNAL_ASSERT(m && m->in_features == dense.in_features && m->out_features == dense.out_features,
                            "LinearStreamer built a module of the wrong shape for ", lin);
      bool keeps_file = false;  // a module adopting the mapped tensor (bf16 into bf16) keeps its pages
      for (auto& b : m->buffers()) keeps_file |= b.defined() && b.numel() > 0 && b.is_alias_of(t);
      for (auto& b : m->parameters()) keeps_file |= b.defined() && b.numel() > 0 && b.is_alias_of(t);
      slot.replace(std::move(m));
      params.erase(name);  // the dense weight (never faulted in) goes with the dense layer
      w = at::Tensor();
      if (!keeps_file && !streamer->mapped) st::drop_pages(t);
      if (bar) bar->update(++done);
    }
  }
  if (bar) bar->finish();
  for (auto& n : ck.notes) log::warn(ck.dir, ": ", n);
}

nlohmann::json hf_config_json(const ModelConfig& c, const std::string& torch_dtype) {
  const ArchSpec& a = arch_spec(c.family);
  json j = {{"vocab_size", c.vocab_size},
            {a.hf_keys.hidden, c.dim},
            {a.hf_keys.layers, c.n_layers},
            {a.hf_keys.heads, c.n_heads},
            {a.hf_keys.ffn, c.ffn()},
            {a.hf_keys.max_positions, c.max_seq_len},
            {a.hf_keys.norm_eps, c.norm_eps},
            {"tie_word_embeddings", c.tie_embeddings},
            {"torch_dtype", torch_dtype},
            // Families' config classes default these to their own vocabularies' ids (Phi-3: 32000),
            // which may not exist here; the exporter fills them from the tokenizer.
            {"bos_token_id", nullptr},
            {"eos_token_id", nullptr},
            {"pad_token_id", nullptr}};
  a.write_hf(c, j);
  return j;
}

void write_hf_weights(const ModelConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& weights,
                      const std::string& dir, at::ScalarType dtype, int64_t max_shard_bytes,
                      const nlohmann::json& config_extra) {
  const std::string tname = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
  json config = hf_config_json(c, tname);
  config.update(config_extra);
  fs::write_atomic(dir + "/config.json", config.dump(2) + "\n");
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> shards(1);
  int64_t bytes = 0, total = 0;
  for (auto& [name, t] : weights) {
    auto w = (arch_spec(c.family).is_conv1d_weight(name) ? t.t() : t).to(dtype).contiguous();
    const int64_t nb = w.numel() * w.element_size();
    if (bytes > 0 && bytes + nb > max_shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    shards.back().emplace_back(name, w);
    bytes += nb;
    total += nb;
  }
  const st::Metadata meta{{"format", "pt"}};
  if (shards.size() == 1) {
    st::save(dir + "/model.safetensors", shards[0], meta);
    return;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    st::save(dir + "/" + name, shards[i], meta);
    for (auto& [n, t] : shards[i]) index["weight_map"][n] = name;
  }
  fs::write_atomic(dir + "/model.safetensors.index.json", index.dump(2) + "\n");
}

std::shared_ptr<CausalLM> load_hf_model(const std::string& dir, bool progress) {
  auto ck = read_hf_checkpoint(dir);
  auto m = build_model(ck.config, /*init=*/false);
  load_hf_weights(*m, ck, progress);
  return m;
}

}  // namespace qf::models
