#include "export/gguf_export.h"

#include <ATen/ATen.h>

#include <map>

#include "core/error.h"
#include "core/log.h"
#include "export/gguf_writer.h"
#include "peft/lora.h"
#include "quant/ggml_blocks.h"
#include "quant/qat.h"

namespace qf::exporter {
namespace {

using gguf::TensorType;
using quant::Rule;

struct QuantChoice {
  TensorType type;
  Rule rule;  // Affine = float
  uint32_t ftype;  // llama.cpp LLAMA_FTYPE_*
};

QuantChoice parse_quant(const std::string& q) {
  static const std::map<std::string, QuantChoice> m = {
      {"f32", {TensorType::F32, Rule::Affine, 0}},     {"f16", {TensorType::F16, Rule::Affine, 1}},
      {"q4_0", {TensorType::Q4_0, Rule::GgmlQ4_0, 2}}, {"q4_1", {TensorType::Q4_1, Rule::GgmlQ4_1, 3}},
      {"q8_0", {TensorType::Q8_0, Rule::GgmlQ8_0, 7}}, {"q4_k", {TensorType::Q4_K, Rule::GgmlQ4_K, 15}},
      {"q6_k", {TensorType::Q6_K, Rule::GgmlQ6_K, 18}}};
  auto it = m.find(q);
  if (it == m.end()) throw InputError("export: --quant '" + q + "' is not one of f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k");
  return it->second;
}

TensorType type_of(Rule r) {
  switch (r) {
    case Rule::GgmlQ8_0: return TensorType::Q8_0;
    case Rule::GgmlQ4_0: return TensorType::Q4_0;
    case Rule::GgmlQ4_1: return TensorType::Q4_1;
    case Rule::GgmlQ4_K: return TensorType::Q4_K;
    case Rule::GgmlQ6_K: return TensorType::Q6_K;
    default: break;
  }
  throw Error("not a llama.cpp block rule");
}

std::string bytes_of(const at::Tensor& t) {
  auto c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

// convert_hf_to_gguf.py's permute: rows [heads, 2, hd/2] -> [heads, hd/2, 2] (rotate-half -> interleaved).
at::Tensor permute_rows(const at::Tensor& rows, int64_t heads) {
  const int64_t n = rows.size(0);
  auto r = rows.reshape({heads, 2, n / heads / 2, -1}).transpose(1, 2).reshape({n, -1});
  return r.contiguous();
}

}  // namespace

GgufExportResult export_gguf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& quant_name, const std::string& name) {
  const auto& c = model.cfg;
  if (c.family != models::Family::Llama || c.qkv_bias)
    throw InputError("export: GGUF export covers the llama architecture (no qkv bias) so far; this model is " +
                     std::string(c.qkv_bias ? "qwen2-style (qkv bias)" : c.family_name()));
  if (c.rope_scaling != models::RopeScaling::None)
    throw InputError("export: GGUF export of rope scaling (linear/llama3) is not implemented yet");
  if (tok.kind() != "sentencepiece")
    throw InputError("export: GGUF's tokenizer block is written for sentencepiece vocabularies so far (this run uses " +
                     tok.kind() + ")");
  const QuantChoice q = parse_quant(quant_name);
  at::NoGradGuard ng;
  const int64_t merged = peft::merge_lora(model);
  if (merged) log::info("export: merged ", merged, " LoRA adapters into their base layers");
  // Fake-quant layers are packed first, exactly as convert does.
  const int64_t converted = quant::convert(model);
  if (converted) log::info("export: converted ", converted, " fake-quant layers to their packed weights");

  // A model with packed linears is exported exactly: what it holds in float stays float. A float
  // model is quantized here (RTN) with --quant, the output layer with Q6_K as llama-quantize does.
  std::map<std::string, models::LinearSlot*> slots;
  bool exact = false;
  for (auto& ns : models::linear_slots(model)) {
    slots[ns.name] = ns.slot;
    exact |= dynamic_cast<quant::QuantizedLinear*>(ns.slot->get().get()) != nullptr;
  }
  if (exact) log::info("export: the model holds packed llama.cpp blocks; they are written as they are (exact)");
  gguf::Writer w;
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", name);
  w.add_u32("general.file_type", q.ftype);
  if (q.rule != Rule::Affine) w.add_u32("general.quantization_version", 2);
  w.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  w.add_u32("llama.context_length", static_cast<uint32_t>(c.max_seq_len));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(c.dim));
  w.add_u32("llama.block_count", static_cast<uint32_t>(c.n_layers));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.ffn()));
  w.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.hdim()));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.n_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.kv_heads()));
  if (c.hdim() * c.n_heads != c.dim) {
    w.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.hdim()));
    w.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.hdim()));
  }
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.norm_eps));
  w.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  // Tokenizer block (sentencepiece -> llama.cpp's "llama" vocabulary).
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  int32_t unk = -1;
  for (int32_t i = 0; i < static_cast<int32_t>(tok.vocab_size()); ++i) {
    auto e = tok.entry(i);
    tokens.push_back(e.piece);
    scores.push_back(e.score);
    types.push_back(e.type);
    if (e.type == 2 && unk < 0) unk = i;
  }
  // The model may have more rows than the tokenizer has pieces: llama.cpp needs one entry per row.
  for (int64_t i = tok.vocab_size(); i < c.vocab_size; ++i) {
    tokens.push_back("<qforge_pad_" + std::to_string(i) + ">");
    scores.push_back(0.f);
    types.push_back(5);
  }
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_strings("tokenizer.ggml.tokens", tokens);
  w.add_f32s("tokenizer.ggml.scores", scores);
  w.add_i32s("tokenizer.ggml.token_type", types);
  if (tok.bos_id() >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(tok.bos_id()));
  if (tok.eos_id() >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tok.eos_id()));
  if (unk >= 0) w.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(unk));
  if (tok.pad_id() >= 0) w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(tok.pad_id()));
  w.add_bool("tokenizer.ggml.add_bos_token", tok.bos_id() >= 0);
  w.add_bool("tokenizer.ggml.add_eos_token", false);

  GgufExportResult res;
  auto add = [&](const std::string& gname, const std::vector<int64_t>& dims, TensorType t, std::string data) {
    res.rows.push_back(str(gname, "  ", gguf::type_name(t), "  [", dims.size() > 1 ? std::to_string(dims[0]) + ", " : "",
                           dims.back(), "]"));
    res.bytes += static_cast<int64_t>(data.size());
    w.add_tensor(gname, dims, t, std::move(data));
  };
  auto floats = [&](const at::Tensor& x) {
    auto f = x.to(at::kFloat).contiguous();
    return q.type == TensorType::F16 ? std::make_pair(TensorType::F16, bytes_of(f.to(at::kHalf)))
                                     : std::make_pair(TensorType::F32, bytes_of(f));
  };
  // A linear under its GGUF name: packed blocks as trained, or the float weight quantized by --quant.
  auto linear = [&](const std::string& hf, const std::string& gname, int64_t permute_heads) {
    auto it = slots.find(hf);
    QF_CHECK(it != slots.end(), "export: no layer ", hf);
    auto& m = *it->second->get();
    std::vector<int64_t> dims{m.out_features, m.in_features};
    if (auto* ql = dynamic_cast<quant::QuantizedLinear*>(&m)) {
      const auto& spec = ql->weight_spec();
      if (!spec.is_ggml())
        throw InputError(str("export: ", hf, " is quantized as ", spec.describe(),
                             ", which GGUF cannot hold; train with a llama.cpp preset (q8_0, q4_0, q4_1, q4_k, q6_k)"));
      auto rows = ql->qweight;
      if (permute_heads) rows = permute_rows(rows, permute_heads);
      add(gname, dims, type_of(spec.rule), bytes_of(rows));
      return;
    }
    auto wt = m.effective_weight().to(at::kFloat);
    if (permute_heads) wt = permute_rows(wt, permute_heads);
    if (q.rule == Rule::Affine || exact) {
      auto [t, b] = floats(wt);
      add(gname, dims, t, std::move(b));
      return;
    }
    Rule rule = q.rule;
    if (gname == "output.weight") rule = m.in_features % 256 == 0 ? Rule::GgmlQ6_K : Rule::GgmlQ8_0;
    if (m.in_features % quant::ggml::block_size(rule) != 0)
      throw InputError(str("export: ", hf, " has width ", m.in_features, ", not a multiple of the ", quant_name,
                           " block (", quant::ggml::block_size(rule), "); choose another --quant"));
    add(gname, dims, type_of(rule), bytes_of(quant::ggml::quantize(wt.contiguous(), rule)));
  };
  std::map<std::string, at::Tensor> params;
  for (auto& p : model.named_parameters()) params[p.key()] = p.value();
  auto param = [&](const std::string& n) {
    auto it = params.find(n);
    QF_CHECK(it != params.end(), "export: no parameter ", n);
    return it->second;
  };
  // token embedding
  auto* emb = model.token_embedding().get().get();
  if (auto* qe = dynamic_cast<quant::QuantizedEmbedding*>(emb); qe && qe->spec().is_ggml()) {
    add("token_embd.weight", {c.vocab_size, c.dim}, type_of(qe->spec().rule), bytes_of(qe->qweight));
  } else {
    auto [t, b] = floats(emb->table());
    add("token_embd.weight", {c.vocab_size, c.dim}, t, std::move(b));
  }
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string hf = "model.layers." + std::to_string(i) + ".", g = "blk." + std::to_string(i) + ".";
    add(g + "attn_norm.weight", {c.dim}, TensorType::F32, bytes_of(param(hf + "input_layernorm.weight").to(at::kFloat)));
    linear(hf + "self_attn.q_proj", g + "attn_q.weight", c.n_heads);
    linear(hf + "self_attn.k_proj", g + "attn_k.weight", c.kv_heads());
    linear(hf + "self_attn.v_proj", g + "attn_v.weight", 0);
    linear(hf + "self_attn.o_proj", g + "attn_output.weight", 0);
    add(g + "ffn_norm.weight", {c.dim}, TensorType::F32,
        bytes_of(param(hf + "post_attention_layernorm.weight").to(at::kFloat)));
    linear(hf + "mlp.gate_proj", g + "ffn_gate.weight", 0);
    linear(hf + "mlp.up_proj", g + "ffn_up.weight", 0);
    linear(hf + "mlp.down_proj", g + "ffn_down.weight", 0);
  }
  add("output_norm.weight", {c.dim}, TensorType::F32, bytes_of(param("model.norm.weight").to(at::kFloat)));
  if (!c.tie_embeddings) linear("lm_head", "output.weight", 0);
  res.n_tensors = static_cast<int64_t>(res.rows.size());
  res.bytes = w.write(out);
  res.path = out;
  return res;
}

}  // namespace qf::exporter
