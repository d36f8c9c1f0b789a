#include "trainer/run_dir.h"

#include <filesystem>

#include "core/fs.h"
#include "core/gguf_file.h"
#include "data/gguf_tokenizer.h"
#include "export/gguf_in.h"
#include "core/json_file.h"
#include "core/log.h"
#include "export/hf_export.h"
#include "models/hf.h"
#include "quant/ggml_more.h"
#include "quant/qat.h"
#include "trainer/trainer.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

std::shared_ptr<models::CausalLM> rebuild_model(const RunConfig& cfg, const CheckpointData& ck,
                                                const std::string& checkpoint_dir) {
  const ModelMeta meta = ModelMeta::read_from(ck.state);
  auto mc = cfg.model;
  if (meta.vocab_size > 0) mc.vocab_size = meta.vocab_size;
  auto model = models::build_model(mc);
  if (meta.format != ModelFormat::Fp) {
    QF_CHECK_INPUT(cfg.quant.enabled, checkpoint_dir, " holds a ", meta.describe(),
                   " model but the run config has no quant rules");
    quant::prepare(*model, cfg.quant);
    if (meta.format == ModelFormat::Converted) quant::convert(*model);
  }
  if (meta.lora) {
    QF_CHECK_INPUT(cfg.peft.enabled, checkpoint_dir, " holds LoRA adapters but the run config has no peft section");
    auto pc = cfg.peft;
    pc.init_adapter.clear();  // the checkpoint holds the adapter weights
    peft::install_saved_bases(*model, pc, ck.model);  // blocks / packed bases: the checkpoint's geometry
    apply_peft(*model, pc, false);
  }
  // GPTQ act-order layers carry their column groups (g_idx) as an extra buffer.
  for (auto& ns : models::linear_slots(*model)) {
    auto ql = std::dynamic_pointer_cast<quant::QuantizedLinear>(ns.slot->get());
    if (!ql) continue;
    for (auto& [name, t] : ck.model)
      if (name == ns.name + ".g_idx") ql->set_g_idx(t);
  }
  load_model_state(*model, ck.model, checkpoint_dir + "/model.safetensors");
  return model;
}

std::string write_run_dir(const std::string& out, bool force, const std::string& config_text, models::CausalLM& model,
                          const ModelMeta& meta, const nlohmann::json& extra_state,
                          const std::vector<std::pair<std::string, std::string>>& files) {
  CheckpointData d;
  d.model = model_state(model);
  d.state = extra_state;
  if (!d.state.contains("step")) d.state["step"] = 0;
  meta.write_to(d.state);
  return exporter::write_staged_dir(out, force, [&](const std::string& tmp) {
    fs::write_atomic(tmp + "/config.yaml", config_text);
    auto ck = save_checkpoint(tmp + "/checkpoints", d.state["step"].get<int64_t>(), d, 1);
    for (const auto& [name, bytes] : files) fs::write_atomic(tmp + "/" + name, bytes);
    return out + ck.substr(tmp.size());
  });
}

LoadedRun load_run(const std::string& path, const std::vector<std::string>& overrides) {
  LoadedRun r;
  std::string run_dir = path;
  if (sfs::exists(path + "/model.safetensors")) {
    // a step dir: <run>/checkpoints/step_N or <run>/converted/step_N
    run_dir = sfs::path(path).parent_path().parent_path().string();
  } else if (sfs::exists(path + "/latest") && sfs::exists(path + "/../config.yaml")) {
    run_dir = sfs::path(path).parent_path().string();  // <run>/checkpoints or <run>/converted
  }
  QF_CHECK_INPUT(sfs::is_directory(run_dir), "'", path, "' is not a run directory (expected config.yaml and checkpoints/) "
                 "nor a Hugging Face checkpoint dir (config.json + safetensors + tokenizer) nor a GGUF file");
  QF_CHECK_INPUT(sfs::exists(run_dir + "/config.yaml"), "'", run_dir, "' has no config.yaml; is it a qforge run directory? "
                 "(a Hugging Face checkpoint dir has a config.json)");
  // The checkpoint provides the weights: the run's own init_from source need not exist any more.
  std::vector<std::string> ov{"run.init_from=", "model.from="};
  ov.insert(ov.end(), overrides.begin(), overrides.end());
  r.cfg = load_run_config(run_dir + "/config.yaml", ov);
  {
    const auto own = cfg::load_yaml(run_dir + "/config.yaml", {});
    auto get = [&](const char* sec, const char* key) {
      if (!own.IsMap()) return std::string();
      const YAML::Node m = own[sec];
      if (!m.IsDefined() || !m.IsMap()) return std::string();
      const YAML::Node n = m[key];
      return n.IsDefined() && n.IsScalar() ? n.Scalar() : std::string();
    };
    r.model_from = get("model", "from");
    r.init_from = get("run", "init_from");
  }
  r.checkpoint = resolve_checkpoint(path);
  QF_CHECK_INPUT(!r.checkpoint.empty(), "'", path, "' holds no checkpoint (checkpoints/latest is missing)");
  r.cfg.tokenizer.train.enabled = false;
  r.tok = data::load_or_train_tokenizer(r.cfg.tokenizer);
  if (r.cfg.model.vocab_size == 0) r.cfg.model.vocab_size = r.tok->vocab_size();
  auto ck = load_checkpoint(r.checkpoint, false);
  r.meta = ModelMeta::read_from(ck.state);
  r.format = r.meta.describe();
  r.model = rebuild_model(r.cfg, ck, r.checkpoint);
  r.cfg.model = r.model->cfg;  // what it was built with: the checkpoint's vocab_size
  r.model->to(pick_device(r.cfg.trainer.device));
  r.model->eval();
  return r;
}

bool is_hf_dir(const std::string& path) { return sfs::exists(path + "/config.json") || gguf_in::is_gguf_file(path); }

namespace {

// A GGUF file as load_hf_dir's model: dequantized to `dtype` (auto: fp32; a GGUF has no float dtype
// to keep), `info` listing every tensor's stored type and shape and what qforge does with it.
std::shared_ptr<models::CausalLM> load_gguf_file(const std::string& path, const std::string& dtype, nlohmann::json* info,
                                                 const models::LinearStreamer* streamer) {
  const bool bf16 = dtype == "bf16";
  auto ck = exporter::read_gguf(path);
  ck.info.config.dtype = bf16 ? models::DType::BF16 : models::DType::F32;
  auto model = models::build_model(ck.info.config, /*init=*/false);
  exporter::GgufLoadReport rep;
  exporter::load_gguf_weights(*model, ck, !log::quiet(), streamer, &rep);
  if (info) {
    const auto& f = *ck.file;
    nlohmann::json tensors = nlohmann::json::object(), types = nlohmann::json::object();
    for (const auto& t : f.tensors()) {
      const std::string ty = quant::ggml::gguf_type_name(t.type);
      tensors[t.name] = {{"type", ty}, {"shape", t.shape()}, {"bytes", t.nbytes},
                         {"qforge", exporter::gguf_type_support(t.type)}};
      types[ty] = types.value(ty, 0) + 1;
    }
    *info = {{"source", "gguf"}, {"architecture", ck.info.arch}, {"gguf_version", f.version()},
             {"file_type", f.get_int("general.file_type", -1)}, {"tensors", tensors}};
    (*info)["quantization"] = {{"format", "gguf"}, {"types", types}, {"dequantized", true},
                               {"dequantized_to", bf16 ? "bf16" : "fp32"}, {"kept_packed", rep.kept_packed.size()},
                               {"note", "llama.cpp blocks were dequantized to float at load as gguf-py's dequantize "
                                        "computes them: the model trains, re-quantizes and exports like a float "
                                        "checkpoint (a LoRA base of the same llama.cpp type keeps the blocks)"}};
  }
  return model;
}

}  // namespace

std::shared_ptr<models::CausalLM> load_hf_dir(const std::string& dir, const std::string& dtype, nlohmann::json* info,
                                              bool populate, const models::LinearStreamer* streamer) {
  if (gguf_in::is_gguf_file(dir)) return load_gguf_file(dir, dtype, info, streamer);
  auto ck = models::read_hf_checkpoint(dir);
  const bool bf16 = dtype == "bf16" || (dtype == "auto" && ck.torch_dtype == "bfloat16");
  ck.config.dtype = bf16 ? models::DType::BF16 : models::DType::F32;
  auto model = models::build_model(ck.config, /*init=*/false);
  models::HfLoadReport rep;
  models::load_hf_weights(*model, ck, !log::quiet(), populate, streamer, &rep);
  if (info) {
    *info = {{"source", "huggingface"}, {"architecture", ck.architecture}, {"checkpoint_dtype", ck.torch_dtype},
             {"files", ck.files.size()}};
    if (ck.quant.quantized()) {
      nlohmann::json per = nlohmann::json::object();
      for (auto& [lin, fmt] : rep.dequantized) per[lin] = fmt;
      (*info)["quantization"] = {{"format", ck.quant.describe()}, {"dequantized", true},
                                 {"dequantized_to", bf16 ? "bf16" : "fp32"}, {"packed_linears", rep.dequantized.size()},
                                 {"note", "packed linears were dequantized to float at load: the model trains, "
                                          "re-quantizes and exports like a float checkpoint"},
                                 {"linears", per}};
    }
  }
  return model;
}

namespace {

HfTokenizerFile hf_tokenizer_or_throw(const std::string& dir) {
  auto f = hf_dir_tokenizer(dir);
  QF_CHECK_INPUT(!f.path.empty(), "'", dir, "' has config.json but neither tokenizer.model (sentencepiece) nor "
                 "tokenizer.json; a Hugging Face dir used as a model needs its tokenizer next to the weights");
  return f;
}

// Whether transformers' tokenizer for `dir` starts a text with BOS: tokenizer_config.json's
// add_bos_token, else LlamaTokenizer's default (true) for tokenizer.model, else whether
// tokenizer.json's post-processor template begins with a special token.
bool hf_adds_bos(const std::string& dir, const HfTokenizerFile& f) {
  if (f.type == "gguf") return data::gguf_adds_bos(dir);
  const std::string tc = dir + "/tokenizer_config.json";
  if (sfs::exists(tc)) {
    const auto c = json_file::read(tc);
    if (c.is_object() && c.contains("add_bos_token") && !c["add_bos_token"].is_null()) {
      QF_CHECK_INPUT(c["add_bos_token"].is_boolean(), tc, ": 'add_bos_token': expected true or false, found ",
                     c["add_bos_token"].dump());
      return c["add_bos_token"].get<bool>();
    }
  }
  if (f.type == "sentencepiece") return true;
  const auto j = json_file::read(f.path);
  // A "type" that is not a string: "<tokenizer.json>: 'post_processor.type': expected a string, found a number".
  return json_file::interpret(f.path, [&] {
    if (!j.is_object() || !j.contains("post_processor") || !j["post_processor"].is_object()) return false;
    const nlohmann::json* pp = &j["post_processor"];
    if (pp->value("type", "") == "Sequence" && pp->contains("processors") && (*pp)["processors"].is_array())
      for (auto& x : (*pp)["processors"])
        if (x.is_object() && x.value("type", "") == "TemplateProcessing") pp = &x;
    if (pp->value("type", "") != "TemplateProcessing" || !pp->contains("single") || !(*pp)["single"].is_array() ||
        (*pp)["single"].empty())
      return false;
    return (*pp)["single"][0].is_object() && (*pp)["single"][0].contains("SpecialToken");
  });
}

}  // namespace

std::vector<std::string> hf_dir_overrides(const std::string& dir) {
  const auto f = hf_tokenizer_or_throw(dir);
  return {"model.from=" + dir, "run.init_from=", "tokenizer.train.enabled=false", "tokenizer.type=" + f.type,
          "tokenizer.path=" + f.path};
}

LoadedRun load_model(const std::string& path, const std::vector<std::string>& overrides) {
  if (!is_hf_dir(path)) return load_run(path, overrides);
  QF_CHECK_INPUT(overrides.empty(), "key=value overrides apply to qforge runs, not to the Hugging Face dir ", path);
  const auto f = hf_tokenizer_or_throw(path);
  LoadedRun r;
  r.hf_dir = true;
  r.checkpoint = path;
  r.format = r.meta.describe();
  r.model_from = sfs::absolute(path).lexically_normal().string();
  const bool gguf = f.type == "gguf";
  r.cfg.source = gguf ? path : path + "/config.json";
  r.cfg.run.name = sfs::path(path).lexically_normal().filename().string();
  r.cfg.tokenizer.type = gguf                       ? data::TokenizerConfig::Type::Gguf
                         : f.type == "sentencepiece" ? data::TokenizerConfig::Type::SentencePiece
                                                     : data::TokenizerConfig::Type::HuggingFace;
  r.cfg.tokenizer.path = f.path;
  r.tok = data::load_or_train_tokenizer(r.cfg.tokenizer);
  r.cfg.data.add_bos = r.tok->bos_id() >= 0 && hf_adds_bos(path, f);
  r.model = load_hf_dir(path, "fp32");
  r.cfg.model = r.model->cfg;
  r.cfg.model.from = path;
  r.model->to(pick_device(r.cfg.trainer.device));
  r.model->eval();
  return r;
}

std::string adapter_base_name(const std::string& model_from, const std::string& init_from, const std::string& run_name) {
  if (!model_from.empty()) return sfs::absolute(model_from).lexically_normal().string();
  if (!init_from.empty()) return init_from;
  return "qforge:" + run_name;
}

}  // namespace qf::trainer
