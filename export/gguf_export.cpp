#include "export/gguf_export.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/safetensors.h"
#include "core/gguf_file.h"
#include "data/gguf_tokenizer.h"
#include "export/gguf_writer.h"
#include "export/hf_export.h"
#include "export/imatrix_file.h"
#include "export/layer_view.h"
#include "models/arch.h"
#include "peft/lora.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_mix.h"
#include "quant/ggml_types.h"
#include "quant/qat.h"

namespace qf::exporter {
namespace {

using gguf::TensorType;
using quant::Rule;
using quant::TensorRole;

TensorType type_of(Rule r) { return static_cast<TensorType>(quant::ggml::traits(r).gguf_id); }

void append(std::string& out, const at::Tensor& t) {
  auto c = t.contiguous();
  out.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
}

// convert_hf_to_gguf.py's permute: rows [heads, 2, hd/2] -> [heads, hd/2, 2] (rotate-half -> interleaved).
at::Tensor permute_rows(const at::Tensor& rows, int64_t heads) {
  const int64_t n = rows.size(0);
  return rows.reshape({heads, 2, n / heads / 2, -1}).transpose(1, 2).reshape({n, -1}).contiguous();
}

// A 2-D weight as GGUF bytes: `rule` blocks (importance-weighted when `imatrix`, float32 [cols], is
// defined), or float (F16 / F32), converted in row chunks of about 4M values so the float32 copy of a
// large tensor never exists at once.
std::string encode(const at::Tensor& w, Rule rule, bool f16, const at::Tensor& imatrix = {}) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, cols));
  std::string out;
  out.reserve(static_cast<size_t>(rule == Rule::Affine ? rows * cols * (f16 ? 2 : 4)
                                                       : rows * cols / quant::ggml::block_size(rule) *
                                                             quant::ggml::type_size(rule)));
  for (int64_t r = 0; r < rows; r += chunk) {
    auto x = w.slice(0, r, std::min(rows, r + chunk)).to(at::kFloat);
    if (rule != Rule::Affine) append(out, quant::ggml::quantize(x, rule, imatrix));
    else append(out, f16 ? x.to(at::kHalf) : x);
  }
  return out;
}

// What llama.cpp's gemma2/gemma3 fix that a checkpoint may set otherwise: the attention scale is
// 1/sqrt(head_dim) (1/sqrt(hidden/heads) for its 27B shapes: 46 gemma2 / 62 gemma3 layers); the
// windowed layers are every other one from layer 0 (gemma2) or five of each six (gemma3); gemma3's
// windowed layers use RoPE base 10000 unscaled and it has no attention soft-capping; the output
// projection is always the token embedding.
void check_gemma(const models::ModelConfig& c, const std::string& ga) {
  const bool g3 = ga == "gemma3";
  const int64_t big = g3 ? 62 : 46;
  const double scalar = c.n_layers == big ? static_cast<double>(c.dim / c.n_heads) : static_cast<double>(c.hdim());
  const double want = c.query_pre_attn_scalar > 0 ? c.query_pre_attn_scalar : static_cast<double>(c.hdim());
  if (want != scalar)
    throw InputError(str("export: query_pre_attn_scalar ", want, " is not what llama.cpp's ", ga, " uses for a ",
                         c.n_layers, "-layer model (", scalar, ": it has no key for it); GGUF export is refused"));
  if (!c.tie_embeddings)
    throw InputError("export: llama.cpp's " + ga + " always uses the token embedding as the output projection; this "
                     "model has its own lm_head, GGUF export is refused");
  const int64_t period = g3 ? 6 : 2;
  if (c.sliding_window > 0)
    for (int64_t i = 0; i < c.n_layers; ++i)
      if ((c.window(i) > 0) != (i % period < period - 1))
        throw InputError(str("export: llama.cpp's ", ga, " puts sliding windows on ", g3 ? "five of each six layers" :
                             "every other layer", " from layer 0; this model's layer ", i, " is ",
                             c.window(i) > 0 ? "windowed" : "global", ", GGUF export is refused"));
  if (g3) {
    // Without a window, qforge's layers are all global while llama.cpp's gemma3 still gives five of
    // each six the local RoPE base.
    if (c.sliding_window <= 0)
      throw InputError("export: llama.cpp's gemma3 expects its local (sliding-window) layers; this model has no "
                       "sliding window, GGUF export is refused");
    const double local = c.rope_local_theta > 0 ? c.rope_local_theta : c.rope_theta;
    if (local != 10000.0)
      throw InputError(str("export: llama.cpp's gemma3 fixes the windowed layers' RoPE base at 10000; this model's "
                           "is ", local, " (rope_local_base_freq), GGUF export is refused"));
    if (c.attn_softcap > 0) throw InputError("export: llama.cpp's gemma3 has no attention logit soft-capping");
    if (c.rope_scaling != models::RopeScaling::None && c.rope_scaling != models::RopeScaling::Linear)
      throw InputError("export: llama.cpp's gemma3 takes linear rope scaling only");
  } else if (c.rope_scaling != models::RopeScaling::None) {
    throw InputError("export: GGUF export of rope scaling for llama.cpp's gemma2 is not written");
  }
}

// llama.cpp's architecture for this model, or an InputError naming what llama.cpp cannot represent.
// Q/K rows are permuted (rotate-half -> interleaved) only for "llama"; the others use NEOX RoPE.
std::string gguf_arch_of(const models::ModelConfig& c, const models::ArchSpec& arch, const data::Tokenizer& tok) {
  if (arch.gguf_arch.empty())
    throw InputError("export: GGUF export of a " + std::string(c.family_name()) + " model is refused: " +
                     arch.gguf_missing);
  std::string ga = arch.gguf_arch;
  if (ga == "llama" && c.qkv_bias) ga = "qwen2";  // the llama family with q/k/v biases is Qwen2's layout
  const bool windowed = c.sliding_window > 0 && c.sliding_window < c.max_seq_len;
  if (windowed && (ga == "llama" || ga == "qwen2" || ga == "qwen3" || ga == "phi3"))
    throw InputError("export: this model attends within a sliding window of " + std::to_string(c.sliding_window) +
                     " tokens, and llama.cpp's " + ga + " architecture ignores sliding windows (it would attend to "
                     "the whole context); GGUF export is refused");
  if (ga == "gemma2" || ga == "gemma3") check_gemma(c, ga);
  else if (ga == "phi3" && c.rope_scaling == models::RopeScaling::LongRope) {
    // llama.cpp's phi3 takes LongRoPE's factors as rope_factors_long/short tensors
  } else if (ga == "llama" && c.rope_scaling == models::RopeScaling::Llama3) {
    // llama.cpp's llama takes Llama 3's per-frequency divisors as a rope_freqs tensor
  } else if (c.rope_scaling != models::RopeScaling::None)
    throw InputError("export: GGUF export of rope scaling (linear/llama3/longrope) for llama.cpp's " + ga +
                     " architecture is not written yet");
  if (c.attn_softcap > 0 && ga != "gemma2")
    throw InputError("export: attention logit soft-capping is not part of llama.cpp's " + ga + " architecture");
  if (c.final_softcap > 0 && ga != "gemma2" && ga != "gemma3")
    throw InputError("export: final logit soft-capping is not part of llama.cpp's " + ga + " architecture");
  if (c.qk_norm && ga != "qwen3" && ga != "gemma3")
    throw InputError("export: per-head q/k norms are not part of llama.cpp's " + ga + " architecture");
  if (c.partial_rotary != 1.0 && ga != "phi3")
    throw InputError("export: partial rotary embeddings are not written for llama.cpp's " + ga + " architecture yet");
  if (tok.kind() != "sentencepiece" && tok.kind() != "huggingface-bpe")
    throw InputError("export: GGUF's tokenizer block is written for sentencepiece and byte-level BPE tokenizer.json "
                     "vocabularies (this model's tokenizer is " + tok.kind() + ")");
  return ga;
}

// general.* and the architecture's hyper-parameters (<arch>.*).
void write_metadata(gguf::Writer& w, const models::ModelConfig& c, const std::string& ga, const std::string& name,
                    uint32_t file_type) {
  w.add_string("general.architecture", ga);
  w.add_string("general.name", name);
  w.add_u32("general.file_type", file_type);
  w.add_u32("general.quantization_version", 2);
  w.add_u32(ga + ".vocab_size", static_cast<uint32_t>(c.vocab_size));
  w.add_u32(ga + ".context_length", static_cast<uint32_t>(c.max_seq_len));
  w.add_u32(ga + ".embedding_length", static_cast<uint32_t>(c.dim));
  w.add_u32(ga + ".block_count", static_cast<uint32_t>(c.n_layers));
  w.add_u32(ga + ".feed_forward_length", static_cast<uint32_t>(c.ffn()));
  if (ga == "gpt2") {  // learned positions, LayerNorm
    w.add_u32(ga + ".attention.head_count", static_cast<uint32_t>(c.n_heads));
    w.add_f32(ga + ".attention.layer_norm_epsilon", static_cast<float>(c.norm_eps));
    return;
  }
  w.add_u32(ga + ".rope.dimension_count", static_cast<uint32_t>(c.rotary_dim()));
  w.add_u32(ga + ".attention.head_count", static_cast<uint32_t>(c.n_heads));
  w.add_u32(ga + ".attention.head_count_kv", static_cast<uint32_t>(c.kv_heads()));
  if (c.hdim() * c.n_heads != c.dim) {
    w.add_u32(ga + ".attention.key_length", static_cast<uint32_t>(c.hdim()));
    w.add_u32(ga + ".attention.value_length", static_cast<uint32_t>(c.hdim()));
  }
  w.add_f32(ga + ".attention.layer_norm_rms_epsilon", static_cast<float>(c.norm_eps));
  w.add_f32(ga + ".rope.freq_base", static_cast<float>(c.rope_theta));
  if (ga == "gemma2" || ga == "gemma3") {
    // A window of the whole context is no window: llama.cpp's gemma loaders want the key.
    w.add_u32(ga + ".attention.sliding_window",
              static_cast<uint32_t>(c.sliding_window > 0 ? c.sliding_window : c.max_seq_len));
    if (c.rope_scaling == models::RopeScaling::Linear) {
      w.add_string(ga + ".rope.scaling.type", "linear");
      w.add_f32(ga + ".rope.scaling.factor", static_cast<float>(c.rope_factor));
    }
  }
  if (c.rope_scaling == models::RopeScaling::LongRope) {
    // llama.cpp picks the long factors when its context exceeds the original one, and scales
    // cos/sin by attn_factor: transformers' attention_factor, by default sqrt(1 + ln(s) / ln(orig))
    // for s = context / original context (1 when s <= 1).
    const double s = static_cast<double>(c.max_seq_len) / static_cast<double>(c.rope_original_max_seq_len);
    const double attn = c.rope_attention_factor > 0 ? c.rope_attention_factor
                        : s > 1.0 ? std::sqrt(1.0 + std::log(s) / std::log(static_cast<double>(c.rope_original_max_seq_len)))
                                  : 1.0;
    w.add_u32(ga + ".rope.scaling.original_context_length", static_cast<uint32_t>(c.rope_original_max_seq_len));
    w.add_f32(ga + ".rope.scaling.attn_factor", static_cast<float>(attn));
  }
  if (ga == "gemma2") {
    // llama.cpp's gemma2 always soft-caps (50 / 30 when the keys are absent); a cap of 1e6 leaves
    // scores and logits of any realistic size unchanged in float32 (tanh(x/1e6)*1e6 - x ~ x^3/3e12).
    w.add_f32(ga + ".attn_logit_softcapping", static_cast<float>(c.attn_softcap > 0 ? c.attn_softcap : 1e6));
    w.add_f32(ga + ".final_logit_softcapping", static_cast<float>(c.final_softcap > 0 ? c.final_softcap : 1e6));
  } else if (c.final_softcap > 0) {
    w.add_f32(ga + ".final_logit_softcapping", static_cast<float>(c.final_softcap));
  }
}

// The tokenizer block: a sentencepiece vocabulary as llama.cpp's "llama" vocabulary, one entry per
// embedding row (`rows` may exceed the tokenizer's pieces: padded with unused entries).
void write_sp_tokenizer(gguf::Writer& w, const data::Tokenizer& tok, int64_t rows) {
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
  for (int64_t i = tok.vocab_size(); i < rows; ++i) {
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
  // llama.cpp's "llama" vocabulary tokenizes the raw text: it prepends a space when
  // add_space_prefix (sentencepiece's add_dummy_prefix) and normalizes nothing else.
  const auto norm = tok.normalization();
  w.add_bool("tokenizer.ggml.add_space_prefix", norm.add_dummy_prefix);
  if (norm.rule != "identity" || norm.remove_extra_whitespaces)
    log::warn("export: tokenizer '", tok.path(), "' normalizes text (", norm.rule,
              norm.remove_extra_whitespaces ? ", extra whitespace removed" : "",
              ") and llama.cpp does not: its ids will differ from qforge's wherever that normalization changes the "
              "text (newlines, runs of spaces, NFKC forms)");
}

// ---- byte-level BPE (a Hugging Face tokenizer.json) as llama.cpp's "gpt2" vocabulary ----

[[noreturn]] void bad_tok(const std::string& file, const std::string& key, const std::string& why) {
  throw InputError("export: " + file + ": " + key + " " + why);
}

using data::kLlama3Split;  // the pre-tokenizer regexes llama.cpp names (data/gguf_tokenizer.h)
using data::kQwen2Split;

// tokenizer.ggml.pre for a tokenizer.json pre_tokenizer: ByteLevel with its own (GPT-2) regex is
// "gpt-2"; Split(Llama 3 / Qwen2 regex) then ByteLevel without regex is "llama-bpe" / "qwen2".
// Anything else would split text differently in llama.cpp: refused, naming it.
std::string bpe_pre(const nlohmann::json& pre, const std::string& file) {
  auto byte_level = [&](const nlohmann::json& p, bool regex) {
    if (!p.is_object() || p.value("type", "") != "ByteLevel") return false;
    if (p.value("add_prefix_space", false))
      bad_tok(file, "pre_tokenizer.add_prefix_space", "is true; llama.cpp's gpt2 vocabulary adds no prefix space");
    return p.value("use_regex", true) == regex;
  };
  if (byte_level(pre, true)) return "gpt-2";
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") &&
      pre["pretokenizers"].is_array() && pre["pretokenizers"].size() == 2) {
    const auto& split = pre["pretokenizers"][0];
    if (split.value("type", "") == "Split" && split.contains("pattern") && split["pattern"].is_object() &&
        split["pattern"].contains("Regex") && byte_level(pre["pretokenizers"][1], false)) {
      const std::string re = split["pattern"]["Regex"].get<std::string>();
      if (re == kLlama3Split) return "llama-bpe";
      if (re == kQwen2Split) return "qwen2";
      bad_tok(file, "pre_tokenizer.pretokenizers[0].pattern.Regex",
              "is '" + re + "', a split llama.cpp has no pre-tokenizer for (it knows Llama 3's and Qwen2's)");
    }
  }
  bad_tok(file, "pre_tokenizer", "is " + pre.dump() + "; llama.cpp's byte-level BPE pre-tokenizers are ByteLevel "
          "(gpt-2) and Split(Llama 3 / Qwen2 regex) + ByteLevel");
}

// True when the post-processor puts a special token before the text (Llama 3's <|begin_of_text|>).
bool bpe_adds_bos(const nlohmann::json& post) {
  if (!post.is_object()) return false;
  if (post.value("type", "") == "Sequence" && post.contains("processors"))
    for (auto& p : post["processors"])
      if (bpe_adds_bos(p)) return true;
  if (post.value("type", "") != "TemplateProcessing" || !post.contains("single") || post["single"].empty()) return false;
  return post["single"][0].contains("SpecialToken");
}

void write_bpe_tokenizer(gguf::Writer& w, const data::Tokenizer& tok, int64_t rows) {
  std::filesystem::path file = tok.path();
  if (std::filesystem::is_directory(file)) file /= "tokenizer.json";
  const std::string f = file.string();
  nlohmann::json j;
  if (gguf_in::is_gguf_file(f)) {  // a GGUF's own vocabulary, as data/gguf_tokenizer rebuilt it
    j = data::gguf_bpe_tokenizer_json(f);
  } else {
    std::ifstream in(file);
    if (!in) throw InputError("export: cannot read " + f + " for GGUF's tokenizer block");
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw InputError("export: " + f + " is not valid JSON: " + e.what());
    }
  }
  if (!j.contains("model") || !j["model"].is_object()) bad_tok(f, "model", "is missing");
  const auto& m = j["model"];
  if (m.value("type", "BPE") != "BPE") bad_tok(f, "model.type", "is '" + m.value("type", "") + "', not BPE");
  if (!m.contains("vocab") || !m["vocab"].is_object()) bad_tok(f, "model.vocab", "is missing or not an object");
  if (m.value("byte_fallback", false))
    bad_tok(f, "model.byte_fallback", "is true: a sentencepiece-style BPE, not byte-level (llama.cpp's gpt2)");
  const std::string pre = bpe_pre(j.value("pre_tokenizer", nlohmann::json()), f);
  std::vector<std::string> tokens(static_cast<size_t>(rows));
  std::vector<int32_t> types(static_cast<size_t>(rows), 0);
  auto put = [&](int64_t id, const std::string& piece, int32_t type, const char* key) {
    if (id < 0 || id >= rows)
      bad_tok(f, key, "has id " + std::to_string(id) + " for '" + piece + "', outside the model's " +
                          std::to_string(rows) + " embedding rows");
    tokens[id] = piece;
    types[id] = type;
  };
  for (auto& [piece, id] : m["vocab"].items()) put(id.get<int64_t>(), piece, 1, "model.vocab");
  // Added tokens: special ones are control tokens (matched only when parsing specials), others user-defined.
  if (j.contains("added_tokens"))
    for (auto& a : j["added_tokens"])
      put(a.at("id").get<int64_t>(), a.at("content").get<std::string>(), a.value("special", false) ? 3 : 4,
          "added_tokens");
  for (int64_t i = 0; i < rows; ++i)
    if (!types[i]) {  // an embedding row no token uses
      tokens[i] = "[PAD" + std::to_string(i) + "]";
      types[i] = 5;
    }
  std::vector<std::string> merges;
  if (m.contains("merges"))
    for (auto& mg : m["merges"]) {
      if (mg.is_string()) merges.push_back(mg.get<std::string>());
      else if (mg.is_array() && mg.size() == 2) merges.push_back(mg[0].get<std::string>() + " " + mg[1].get<std::string>());
      else bad_tok(f, "model.merges", "holds " + mg.dump() + ", neither \"a b\" nor [a, b]");
    }
  if (j.contains("normalizer") && !j["normalizer"].is_null())
    log::warn("export: ", f, " normalizes text (", j["normalizer"].value("type", "?"),
              ") and llama.cpp's gpt2 vocabulary does not: ids differ wherever that changes the text");
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", pre);
  w.add_strings("tokenizer.ggml.tokens", tokens);
  w.add_i32s("tokenizer.ggml.token_type", types);
  w.add_strings("tokenizer.ggml.merges", merges);
  if (tok.bos_id() >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(tok.bos_id()));
  if (tok.eos_id() >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tok.eos_id()));
  if (tok.pad_id() >= 0) w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(tok.pad_id()));
  w.add_bool("tokenizer.ggml.add_bos_token", gguf_in::is_gguf_file(f) ? data::gguf_adds_bos(f)
                                                                        : bpe_adds_bos(j.value("post_processor", nlohmann::json())));
  w.add_bool("tokenizer.ggml.add_eos_token", false);
}

void write_tokenizer(gguf::Writer& w, const data::Tokenizer& tok, int64_t rows) {
  if (tok.kind() == "sentencepiece") write_sp_tokenizer(w, tok, rows);
  else write_bpe_tokenizer(w, tok, rows);
}

// Llama 3's rope scaling as the divisor of each RoPE frequency (llama.cpp's rope_freqs): frequencies
// whose wavelength is under original_context / high_freq_factor are kept (1), those over
// original_context / low_freq_factor are divided by `factor`, and the band between is interpolated
// between the two (transformers' rope_type "llama3").
at::Tensor llama3_divisors(const models::ModelConfig& c) {
  const int64_t rd = c.rotary_dim();
  const double orig = static_cast<double>(c.rope_original_max_seq_len);
  const double low_wavelen = orig / c.rope_low_freq_factor, high_wavelen = orig / c.rope_high_freq_factor;
  std::vector<float> d;
  for (int64_t i = 0; i < rd / 2; ++i) {
    const double freq = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
    const double wavelen = 2.0 * M_PI / freq;
    double scaled = freq;
    if (wavelen > low_wavelen) {
      scaled = freq / c.rope_factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (orig / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor);
      scaled = (1.0 - smooth) * freq / c.rope_factor + smooth * freq;
    }
    d.push_back(static_cast<float>(freq / scaled));
  }
  return at::tensor(d);
}

// The tensor plan: every tensor is added to the writer with its type decided now and a producer
// that makes its bytes when the writer reaches it. Linears and the embedding are read through
// export/layer_view.h, so a LoRA / fake-quant layer is merged + converted inside its producer and
// dropped once written.
class TensorPlan {
 public:
  TensorPlan(gguf::Writer& w, models::CausalLM& model, const std::string& quant, const std::string& fallback,
             GgufExportResult& res, const std::string& gguf_arch, const Imatrix* imatrix, const std::string& imatrix_path)
      : w_(w), model_(model), c_(model.cfg), quant_(quant), fallback_(fallback), f16_(quant == "f16"), res_(res),
        ga_(gguf_arch), permute_(gguf_arch == "llama"), norm_plus_one_(models::arch_spec(model.cfg.family).gemma_norms),
        imatrix_(imatrix), imatrix_path_(imatrix_path) {
    for (auto& ns : models::linear_slots(model)) slots_[ns.name] = ns.slot;
    for (auto& p : model.named_parameters()) params_[p.key()] = p.value();
  }
  void add_embedding();
  void add_positions(const models::ArchSpec& arch);  // a learned position table (GPT-2), F32
  // Per layer, the spec's tensors in its order: 1-D tensors (norms) as F32, linears as linear(),
  // each followed by its bias (F32) where it has one.
  void add_layers(const models::ArchSpec& arch);
  void add_output(const models::ArchSpec& arch);

 private:
  void add(const std::string& gname, const std::vector<int64_t>& dims, TensorType t, gguf::Writer::Producer make);
  void add_float_2d(const std::string& gname, int64_t rows, int64_t cols, std::function<at::Tensor()> get,
                    TensorRole role, int64_t layer, int64_t permute_heads);
  // A norm's weight or a bias as F32; Gemma's norms as 1 + w (llama.cpp's gemma norms multiply by w).
  void add_1d(const std::string& gname, const at::Tensor& p, bool norm = false);
  void linear(const std::string& hf, const std::string& gname, TensorRole role, int64_t layer, int64_t permute_heads);
  const at::Tensor& param(const std::string& n) const;
  // llama-quantize's type for a tensor of this role, layer and width under --quant (quant/ggml_mix).
  quant::MixChoice mix_choice(TensorRole role, int64_t layer, int64_t cols) const;
  // --float-tensors mixture: counts (and warns once about) a packed tensor of another type than the mixture's.
  void note_packed(const std::string& gname, Rule rule, TensorRole role, int64_t layer, int64_t cols);

  gguf::Writer& w_;
  models::CausalLM& model_;
  const models::ModelConfig& c_;
  const std::string quant_, fallback_;
  const bool f16_;
  GgufExportResult& res_;
  const std::string ga_;      // llama.cpp's architecture
  const bool permute_;        // "llama" only: Q/K rows to llama.cpp's interleaved RoPE layout
  const bool norm_plus_one_;  // Gemma: norm weights written as 1 + w
  std::map<std::string, models::LinearSlot*> slots_;
  std::map<std::string, at::Tensor> params_;
  const Imatrix* imatrix_;  // llama-quantize --imatrix: weights per GGUF tensor name (nullptr: none)
  const std::string imatrix_path_;
};

void TensorPlan::add(const std::string& gname, const std::vector<int64_t>& dims, TensorType t,
                     gguf::Writer::Producer make) {
  res_.rows.push_back(str(gname, "  ", gguf::type_name(t), "  [", dims.size() > 1 ? std::to_string(dims[0]) + ", " : "",
                          dims.back(), "]"));
  w_.add_tensor(gname, dims, t, std::move(make));
}

// A float 2-D weight [rows, cols], materialised by `get` only when written (an NF4 or bf16 base
// dequantizes one layer at a time): the mixture's type (float model) or float (exact export).
void TensorPlan::add_float_2d(const std::string& gname, int64_t rows, int64_t cols, std::function<at::Tensor()> get,
                              TensorRole role, int64_t layer, int64_t permute_heads) {
  quant::MixChoice ch;
  ch.f16 = f16_;
  if (!res_.exact || res_.float_mixture) {
    try {
      ch = mix_choice(role, layer, cols);
    } catch (const InputError& e) {
      throw InputError(str("export: ", gname, ": ", e.what()));
    }
  }
  if (!ch.fallback.empty()) {
    ++res_.n_fallback;
    log::warn("export: ", gname, " - ", ch.fallback);
  }
  const TensorType t = ch.rule != Rule::Affine ? type_of(ch.rule) : ch.f16 ? TensorType::F16 : TensorType::F32;
  // The tensor's importance weights, when the imatrix has them (llama-quantize: not for token_embd /
  // output, which llama-imatrix does not collect); its per-column values survive the row permutation.
  at::Tensor qw;
  if (imatrix_ && ch.rule != Rule::Affine) {
    auto v = imatrix_->weights(gname, cols, imatrix_path_);
    if (!v.empty()) {
      qw = at::tensor(v);
      ++res_.n_imatrix;
    }
  }
  add(gname, {rows, cols}, t, [get = std::move(get), ch, permute_heads, qw, &res = res_] {
    auto wt = get();
    res.input_bytes += wt.numel() * wt.element_size();
    auto bytes = encode(permute_heads ? permute_rows(wt, permute_heads) : wt, ch.rule, ch.f16, qw);
    st::drop_pages(wt);  // a mapped checkpoint's pages are not needed again
    return bytes;
  });
}

quant::MixChoice TensorPlan::mix_choice(TensorRole role, int64_t layer, int64_t cols) const {
  return quant::mix_choice(quant_, role, layer, c_.n_layers, cols, c_.tie_embeddings, fallback_,
                           c_.n_heads / std::max<int64_t>(1, c_.kv_heads()), imatrix_ != nullptr,
                           quant::is_70b(ga_, c_.n_layers, c_.n_heads, c_.kv_heads()));
}

void TensorPlan::note_packed(const std::string& gname, Rule rule, TensorRole role, int64_t layer, int64_t cols) {
  if (!res_.float_mixture) return;
  Rule want = rule;
  try {
    const auto ch = mix_choice(role, layer, cols);
    if (ch.rule == Rule::Affine) return;  // f16 / f32 mixtures have no block type to compare with
    want = ch.rule;
  } catch (const InputError&) {
    return;  // the mixture has no type for this shape (a packed tensor needs none)
  }
  if (want == rule) return;
  if (res_.n_off_mixture++ == 0)
    log::warn("export: ", gname, " holds ", quant::ggml::traits(rule).ggml_name, " blocks where llama-quantize's ",
              quant_, " puts ", quant::ggml::traits(want).ggml_name, "; packed tensors are written as they are, so "
              "the file is not exactly that mixture (the count follows)");
}

void TensorPlan::add_1d(const std::string& gname, const at::Tensor& p, bool norm) {
  res_.input_bytes += p.numel() * p.element_size();
  add(gname, {p.numel()}, TensorType::F32, [p, plus_one = norm && norm_plus_one_] {
    std::string s;
    append(s, plus_one ? p.to(at::kFloat) + 1.0f : p.to(at::kFloat));
    return s;
  });
}

// A linear that converts to llama.cpp blocks (fake quant or QAT + LoRA with a llama.cpp preset, or
// already packed) is written with those blocks; any other as a float weight (add_float_2d).
void TensorPlan::linear(const std::string& hf, const std::string& gname, TensorRole role, int64_t layer,
                        int64_t permute_heads) {
  auto it = slots_.find(hf);
  QF_CHECK(it != slots_.end(), "export: no layer ", hf);
  auto mod = it->second->get();
  if (const quant::QuantSpec* spec = converted_spec(*mod)) {
    if (!spec->is_ggml()) {
      std::string presets;
      for (const auto& t : quant::ggml::type_table())
        if (t.rule != Rule::Affine) presets += (presets.empty() ? "" : ", ") + std::string(t.name);
      throw InputError(str("export: ", hf, " is quantized as ", spec->describe(),
                           ", which GGUF cannot hold; train with a llama.cpp preset (", presets,
                           ") or export with --format gptq / compressed-tensors"));
    }
    note_packed(gname, spec->rule, role, layer, mod->in_features);
    add(gname, {mod->out_features, mod->in_features}, type_of(spec->rule), [mod, permute_heads, &res = res_] {
      auto ql = std::static_pointer_cast<quant::QuantizedLinear>(converted_linear(mod));
      res.input_bytes += ql->qweight.numel();
      std::string s;
      append(s, permute_heads ? permute_rows(ql->qweight, permute_heads) : ql->qweight);
      return s;
    });
    return;
  }
  add_float_2d(gname, mod->out_features, mod->in_features, [mod] { return merged_weight(*mod); }, role, layer,
               permute_heads);
}

const at::Tensor& TensorPlan::param(const std::string& n) const {
  auto it = params_.find(n);
  QF_CHECK(it != params_.end(), "export: no parameter ", n);
  return it->second;
}

void TensorPlan::add_embedding() {
  auto emb = model_.token_embedding().get();
  const quant::QuantSpec* spec = nullptr;
  if (auto* f = dynamic_cast<quant::FakeQuantEmbedding*>(emb.get())) spec = &f->weight_fq->spec();
  if (auto* q = dynamic_cast<quant::QuantizedEmbedding*>(emb.get())) spec = &q->spec();
  if (spec && spec->is_ggml()) {
    note_packed("token_embd.weight", spec->rule, TensorRole::TokenEmbd, 0, c_.dim);
    add("token_embd.weight", {c_.vocab_size, c_.dim}, type_of(spec->rule), [emb, &res = res_] {
      auto q = std::static_pointer_cast<quant::QuantizedEmbedding>(converted_embedding(emb))->qweight;
      res.input_bytes += q.numel();
      std::string s;
      append(s, q);
      return s;
    });
  } else {
    add_float_2d("token_embd.weight", c_.vocab_size, c_.dim, [emb] { return converted_embedding(emb)->table(); },
                 TensorRole::TokenEmbd, 0, 0);
  }
}

void TensorPlan::add_positions(const models::ArchSpec& arch) {
  if (arch.positions.empty()) return;
  const at::Tensor& p = param(arch.positions + ".weight");
  res_.input_bytes += p.numel() * p.element_size();
  add("position_embd.weight", {p.size(0), p.size(1)}, TensorType::F32, [p] {
    std::string s;
    append(s, p.to(at::kFloat));
    return s;
  });
}

void TensorPlan::add_layers(const models::ArchSpec& arch) {
  for (int64_t i = 0; i < c_.n_layers; ++i) {
    const std::string hf = arch.layer_prefix(i) + ".", g = "blk." + std::to_string(i) + ".";
    for (auto& t : arch.layer_tensors) add_1d(g + t.gguf, param(hf + t.name), true);
    for (auto& l : arch.linears) {
      const int64_t heads = !permute_                                   ? 0
                            : l.rope_rows == models::RopeRows::QueryHeads ? c_.n_heads
                            : l.rope_rows == models::RopeRows::KvHeads    ? c_.kv_heads()
                                                                          : 0;
      linear(hf + l.name, g + l.gguf + ".weight", l.role, i, heads);
      auto it = slots_.find(hf + l.name);
      if (it == slots_.end()) continue;  // linear() has thrown
      if (at::Tensor b = it->second->get()->bias_or_undefined(); b.defined()) {
        QF_CHECK(!heads, "export: a Q/K bias would need the RoPE row permutation");
        if (ga_ == "qwen2" && l.role == TensorRole::AttnOutput)
          throw InputError("export: " + hf + l.name + " has a bias, which llama.cpp's qwen2 architecture does not "
                           "load; GGUF export is refused");
        add_1d(g + l.gguf + ".bias", b);
      }
    }
  }
}

void TensorPlan::add_output(const models::ArchSpec& arch) {
  add_1d("output_norm.weight", param(arch.final_norm + ".weight"), true);
  if (params_.count(arch.final_norm + ".bias")) add_1d("output_norm.bias", param(arch.final_norm + ".bias"));
  if (!c_.tie_embeddings) linear(arch.lm_head, "output.weight", TensorRole::Output, 0, 0);
  if (c_.rope_scaling == models::RopeScaling::Llama3) add_1d("rope_freqs.weight", llama3_divisors(c_));
  if (c_.rope_scaling == models::RopeScaling::LongRope) {
    for (auto [gname, f] : {std::pair{"rope_factors_long.weight", &c_.rope_long_factor},
                            std::pair{"rope_factors_short.weight", &c_.rope_short_factor}}) {
      std::vector<float> v(f->begin(), f->end());
      add_1d(gname, at::tensor(v));
    }
  }
}

}  // namespace

FloatTensors parse_float_tensors(const std::string& s) {
  if (s == "exact") return FloatTensors::Exact;
  if (s == "mixture") return FloatTensors::Mixture;
  throw InputError("export: --float-tensors '" + s + "' is not one of exact, mixture");
}

const char* to_string(FloatTensors f) { return f == FloatTensors::Mixture ? "mixture" : "exact"; }

GgufExportResult export_gguf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& quant_name, const std::string& name, bool progress,
                             const std::string& fallback, bool force, const std::string& imatrix_path,
                             FloatTensors float_tensors) {
  check_out(out, "", force);
  QF_CHECK_INPUT(!std::filesystem::is_directory(out), "--out '", out,
                 "' is a directory; GGUF export writes one file (e.g. --out model.gguf)");
  const auto& c = model.cfg;
  const models::ArchSpec& arch = models::arch_spec(c.family);
  const std::string ga = gguf_arch_of(c, arch, tok);
  const uint32_t file_type = quant::mix_file_type(quant_name);  // throws listing the mixtures
  if (!fallback.empty()) quant::mix_file_type(fallback);      // --fallback is a mixture name too
  at::NoGradGuard ng;
  const int64_t n_lora = static_cast<int64_t>(peft::lora_layers(model).size());
  if (n_lora) log::info("export: merging ", n_lora, " LoRA adapters into their base layers as they are written");
  // A model with packed (or fake-quant) linears is exported exactly: what it holds in float stays
  // float, unless FloatTensors::Mixture gives those tensors the mixture's types. A float model gets
  // llama-quantize's types for --quant.
  GgufExportResult res;
  for (auto& ns : models::linear_slots(model)) res.exact |= converted_spec(*ns.slot->get()) != nullptr;
  res.float_mixture = res.exact && float_tensors == FloatTensors::Mixture;
  if (res.float_mixture)
    log::info("export: the model holds packed llama.cpp blocks; they are written as they are and its float tensors "
              "get llama-quantize's ", quant_name, " types (--float-tensors mixture)");
  else if (res.exact)
    log::info("export: the model holds packed llama.cpp blocks; they are written as they are and float tensors stay ",
              quant_name == "f16" ? "F16" : "F32", " (exact; --float-tensors mixture quantizes them as --quant)");
  std::optional<Imatrix> imatrix;
  if (!imatrix_path.empty()) {
    QF_CHECK_INPUT(!res.exact || res.float_mixture, "export: --imatrix ", imatrix_path, " weights the quantization of "
                   "float weights, but this model already holds packed blocks and --float-tensors exact keeps its float "
                   "tensors float; add --float-tensors mixture to quantize them with it (or quantize the float model "
                   "with `qforge quantize --imatrix`)");
    QF_CHECK_INPUT(file_type > 1, "export: --imatrix ", imatrix_path, " needs a quantized --quant mixture, not ", quant_name);
    imatrix = read_imatrix(imatrix_path);
  }
  gguf::Writer w;
  write_metadata(w, c, ga, name, file_type);
  if (imatrix) {  // what llama-quantize records (its kv overrides)
    w.add_string("quantize.imatrix.file", imatrix_path);
    w.add_i32("quantize.imatrix.entries_count", static_cast<int32_t>(imatrix->entries.size()));
  }
  write_tokenizer(w, tok, c.vocab_size);
  TensorPlan plan(w, model, quant_name, fallback, res, ga, imatrix ? &*imatrix : nullptr, imatrix_path);
  plan.add_embedding();
  plan.add_positions(arch);
  plan.add_layers(arch);
  plan.add_output(arch);
  if (res.n_fallback)
    log::warn("export: ", res.n_fallback, " of ", w.n_tensors(), " tensor(s) required fallback quantization");
  if (res.n_off_mixture)
    log::warn("export: ", res.n_off_mixture, " packed tensor(s) hold another type than llama-quantize's ", quant_name,
              " picks for them (written as they are)");
  res.n_tensors = static_cast<int64_t>(w.n_tensors());
  std::unique_ptr<core::ProgressBar> bar;
  if (progress) bar = std::make_unique<core::ProgressBar>("export", res.n_tensors, 0, "tensor");
  res.bytes = w.write(out, [&](size_t i, const std::string&) {
    if (bar) bar->update(static_cast<int64_t>(i));
  });
  if (bar) bar->finish();
  res.path = out;
  return res;
}

GgufLoraResult export_gguf_lora(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                                const std::string& quant, const std::string& name, bool progress, bool force) {
  const auto& c = model.cfg;
  const models::ArchSpec& arch = models::arch_spec(c.family);
  const std::string ga = gguf_arch_of(c, arch, tok);
  const auto layers = peft::lora_layers(model);
  QF_CHECK_INPUT(!layers.empty(), "export --format gguf-lora: the model has no LoRA adapters (a LoRA run is needed)");
  std::map<std::string, std::shared_ptr<peft::LoraLinear>> by_name(layers.begin(), layers.end());
  for (auto& [n, l] : layers) {
    QF_CHECK_INPUT(!l->exact, "export --format gguf-lora: ", n, " trained in exact-merge mode (its model is fq(W + s*BA), "
                   "not base + adapter); export the merged model with --format gguf");
    QF_CHECK_INPUT(n != arch.lm_head, "export --format gguf-lora: ", n, " (the output layer) has an adapter; llama.cpp "
                   "adapters are written for decoder linears only here");
  }
  GgufLoraResult res;
  res.alpha = layers[0].second->scaling * static_cast<double>(layers[0].second->r);
  res.dir = exporter::write_staged_dir(out, force, [&](const std::string& tmp) {
    {  // base.gguf: each LoRA slot holds its base while the file is written (restored even on error)
      std::vector<std::pair<models::LinearSlot*, std::shared_ptr<models::LinearBase>>> swapped;
      struct Restore {
        decltype(swapped)& s;
        ~Restore() {
          for (auto& [slot, m] : s) slot->replace(m);
        }
      } restore{swapped};
      for (auto& ns : models::linear_slots(model))
        if (auto it = by_name.find(ns.name); it != by_name.end()) {
          swapped.emplace_back(ns.slot, ns.slot->get());
          ns.slot->replace(it->second->base);
        }
      res.base = export_gguf(model, tok, tmp + "/base.gguf", quant, name, progress);
    }
    gguf::Writer w;
    w.add_string("general.architecture", ga);
    w.add_string("general.type", "adapter");
    w.add_string("general.name", name);
    w.add_string("adapter.type", "lora");
    w.add_f32("adapter.lora.alpha", static_cast<float>(res.alpha));
    at::NoGradGuard ng;
    for (int64_t i = 0; i < c.n_layers; ++i)
      for (auto& lin : arch.linears) {
        auto it = by_name.find(arch.layer_prefix(i) + "." + lin.name);
        if (it == by_name.end()) continue;
        const auto& l = *it->second;
        QF_CHECK_INPUT(std::abs(l.scaling * l.r - res.alpha) <= 1e-6 * res.alpha, "export --format gguf-lora: ",
                       it->first, " has another LoRA scaling than the first layer; one adapter.lora.alpha holds one");
        const int64_t heads = ga != "llama"                                    ? 0
                              : lin.rope_rows == models::RopeRows::QueryHeads ? c.n_heads
                              : lin.rope_rows == models::RopeRows::KvHeads    ? c.kv_heads()
                                                                              : 0;
        const std::string g = "blk." + std::to_string(i) + "." + lin.gguf + ".weight";
        auto a = l.lora_A->weight.detach().to(at::kCPU, at::kFloat).contiguous();
        auto b = l.lora_B->weight.detach().to(at::kCPU, at::kFloat);
        b = heads ? permute_rows(b, heads) : b.contiguous();
        std::string ab, bb;
        append(ab, a);
        append(bb, b);
        w.add_tensor(g + ".lora_a", {l.r, l.in_features}, TensorType::F32, std::move(ab));
        w.add_tensor(g + ".lora_b", {l.out_features, l.r}, TensorType::F32, std::move(bb));
        ++res.n_adapters;
      }
    QF_CHECK_INPUT(res.n_adapters == static_cast<int64_t>(layers.size()), "export --format gguf-lora: ",
                   layers.size() - res.n_adapters, " LoRA layer(s) are not decoder linears llama.cpp names");
    res.adapter_bytes = w.write(tmp + "/adapter.gguf");
    return out;
  });
  return res;
}

}  // namespace qf::exporter
