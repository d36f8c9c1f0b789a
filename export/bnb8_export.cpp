// bitsandbytes 8-bit (LLM.int8) Hugging Face dirs out. See bnb8_export.h.
#include "export/bnb8_export.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "core/strings.h"
#include "export/hf_export.h"
#include "export/layer_view.h"
#include "models/arch.h"
#include "models/hf.h"
#include "peft/lora.h"
#include "quant/int8_lt.h"

namespace qf::exporter {

namespace {

const char* dtype_name(at::ScalarType t) { return t == at::kHalf ? "float16" : t == at::kBFloat16 ? "bfloat16" : "float32"; }

// transformers 4.57's BitsAndBytesConfig(load_in_8bit=True).to_dict(), with our threshold and dtype.
nlohmann::json quantization_config(double threshold, at::ScalarType dtype) {
  return {{"quant_method", "bitsandbytes"},
          {"load_in_8bit", true},
          {"load_in_4bit", false},
          {"_load_in_8bit", true},
          {"_load_in_4bit", false},
          {"llm_int8_threshold", threshold},
          {"llm_int8_skip_modules", nullptr},
          {"llm_int8_enable_fp32_cpu_offload", false},
          {"llm_int8_has_fp16_weight", false},
          {"bnb_4bit_quant_type", "fp4"},
          {"bnb_4bit_use_double_quant", false},
          {"bnb_4bit_compute_dtype", dtype_name(dtype)},
          {"bnb_4bit_quant_storage", "uint8"}};
}

}  // namespace

Bnb8ExportResult export_bnb8(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             at::ScalarType dtype, double threshold, bool force) {
  const auto& c = model.cfg;
  if (models::arch_spec(c.family).has_conv1d())
    throw InputError(str("export: --format bnb-int8 covers families with nn.Linear layers (Llama, Qwen2, Mistral, ...); ",
                         c.family_name(), " stores Conv1D weights, which transformers does not load as Linear8bitLt "
                         "layers from this layout; use --format hf"));
  QF_CHECK_INPUT(threshold >= 0, "export: llm_int8_threshold must be >= 0, got ", threshold);
  at::NoGradGuard ng;
  const auto n_lora = peft::lora_layers(model).size();
  if (n_lora) log::info("export: merging ", n_lora, " LoRA adapters into their base layers, then quantizing as Int8Params");
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    Bnb8ExportResult r;
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::map<std::string, at::Tensor> meant;  // linear -> int8_dequantize(CB, SCB), for the re-read check
    for (auto& ns : models::linear_slots(model)) {
      auto& m = *ns.slot->get();
      auto bias = m.bias_or_undefined();
      if (bias.defined()) tensors.emplace_back(ns.name + ".bias", bias.detach().to(at::kCPU, dtype).contiguous());
      if (ns.name == "lm_head") {  // transformers keeps the output layer in float
        tensors.emplace_back(ns.name + ".weight", merged_weight(m).to(at::kCPU, dtype).contiguous());
        continue;
      }
      quant::Int8Weight w;
      if (auto* q = dynamic_cast<quant::Int8LtLinear*>(&m)) {
        w = {q->weight.to(at::kCPU), q->scb.to(at::kCPU)};
        ++r.n_kept;
      } else {
        w = quant::int8_quantize(merged_weight(m).to(at::kCPU));
      }
      meant[ns.name] = quant::int8_dequantize(w.cb, w.scb);
      tensors.emplace_back(ns.name + ".weight", w.cb.contiguous());
      tensors.emplace_back(ns.name + ".SCB", w.scb.contiguous());
      tensors.emplace_back(ns.name + ".weight_format", at::zeros({}, at::kByte));
      ++r.n_int8;
    }
    QF_CHECK(r.n_int8 > 0, "export: the model has no decoder linear to store as int8");
    for (auto& t : non_linear_tensors(model, dtype)) tensors.emplace_back(t.first, t.second.to(at::kCPU));
    auto cfg = models::hf_config_json(c, dtype_name(dtype));
    cfg.update(hf_special_token_ids(tok));
    cfg["quantization_config"] = quantization_config(threshold, dtype);
    fs::write_atomic(tmp + "/config.json", cfg.dump(2) + "\n");
    st::save(tmp + "/model.safetensors", tensors, {{"format", "pt"}});
    copy_tokenizer(tok, tmp);
    // Re-read through qforge's own bitsandbytes 8-bit reader: every linear dequantizes to what was meant.
    auto ck = models::read_hf_checkpoint(tmp);
    ck.config.dtype = models::DType::F32;
    auto back = models::build_model(ck.config, /*init=*/false);
    models::load_hf_weights(*back, ck, false);
    for (auto& ns : models::linear_slots(*back)) {
      auto it = meant.find(ns.name);
      if (it == meant.end()) continue;
      QF_CHECK(at::equal(ns.slot->get()->effective_weight().to(at::kFloat), it->second), "export: re-reading ", tmp,
               " decodes '", ns.name, "' differently from the int8 weight meant");
    }
    r.bytes = static_cast<int64_t>(std::filesystem::file_size(tmp + "/model.safetensors"));
    r.dir = out;
    return r;
  });
}

}  // namespace qf::exporter
