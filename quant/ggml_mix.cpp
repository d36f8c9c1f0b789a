#include "quant/ggml_mix.h"

#include <map>

#include "core/error.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_types.h"

namespace qf::quant {
namespace {

// LLAMA_FTYPE_* (llama.h) of the mixtures whose per-tensor rules llama_choice() follows.
enum Ftype : uint32_t {
  kQ4_0 = 2, kQ8_0 = 7, kQ5_0 = 8, kQ2_K = 10, kQ3_K_S = 11, kQ3_K_M = 12, kQ3_K_L = 13, kQ4_K_S = 14, kQ4_K_M = 15,
  kQ5_K_S = 16, kQ5_K_M = 17, kQ2_K_S = 21, kIQ4_NL = 25, kIQ4_XS = 30, kTQ1_0 = 36, kTQ2_0 = 37, kQ2_0 = 41,
};

struct Mix {
  Rule base;
  bool f16;
  uint32_t ftype;      // general.file_type (LLAMA_FTYPE_*)
  bool plain = false;  // qforge's q3_k/q4_k/q5_k: the base type everywhere but the output, no per-tensor rules
};

const std::map<std::string, Mix>& mixes() {
  static const std::map<std::string, Mix> m = {
      {"f32", {Rule::Affine, false, 0}},
      {"f16", {Rule::Affine, true, 1}},
      {"q4_0", {Rule::GgmlQ4_0, false, kQ4_0}},
      {"q4_1", {Rule::GgmlQ4_1, false, 3}},
      {"q8_0", {Rule::GgmlQ8_0, false, kQ8_0}},
      {"q5_0", {Rule::GgmlQ5_0, false, kQ5_0}},
      {"q5_1", {Rule::GgmlQ5_1, false, 9}},
      {"q2_k", {Rule::GgmlQ2_K, false, kQ2_K}},
      {"q2_k_s", {Rule::GgmlQ2_K, false, kQ2_K_S}},
      {"q3_k", {Rule::GgmlQ3_K, false, kQ3_K_S, true}},
      {"q3_k_s", {Rule::GgmlQ3_K, false, kQ3_K_S}},
      {"q3_k_m", {Rule::GgmlQ3_K, false, kQ3_K_M}},
      {"q3_k_l", {Rule::GgmlQ3_K, false, kQ3_K_L}},
      {"q4_k", {Rule::GgmlQ4_K, false, kQ4_K_S, true}},
      {"q4_k_s", {Rule::GgmlQ4_K, false, kQ4_K_S}},
      {"q4_k_m", {Rule::GgmlQ4_K, false, kQ4_K_M}},
      {"q5_k", {Rule::GgmlQ5_K, false, kQ5_K_S, true}},
      {"q5_k_s", {Rule::GgmlQ5_K, false, kQ5_K_S}},
      {"q5_k_m", {Rule::GgmlQ5_K, false, kQ5_K_M}},
      {"q6_k", {Rule::GgmlQ6_K, false, 18}},
      {"iq4_nl", {Rule::GgmlIQ4_NL, false, kIQ4_NL}},
      {"iq4_xs", {Rule::GgmlIQ4_XS, false, kIQ4_XS}},
      {"tq1_0", {Rule::GgmlTQ1_0, false, kTQ1_0}},
      {"tq2_0", {Rule::GgmlTQ2_0, false, kTQ2_0}},
      {"q1_0", {Rule::GgmlQ1_0, false, 40}},
      {"q2_0", {Rule::GgmlQ2_0, false, kQ2_0}}};
  return m;
}

const Mix& mix_of(const std::string& name) {
  auto it = mixes().find(name);
  if (it == mixes().end()) {
    std::string all;
    for (auto& n : mix_names()) all += (all.empty() ? "" : ", ") + n;
    throw InputError(str("llama.cpp type mixture '", name, "' is not one of ", all));
  }
  return it->second;
}

// ggml_type_name(), as llama-quantize's messages spell the type.
const char* rule_name(Rule r) { return r == Rule::Affine ? "f32" : ggml::traits(r).ggml_name; }

// llama_tensor_get_type_impl (src/llama-quant.cpp at 0c1e570) for a dense model (n_expert <= 1:
// its MoE rules never fire) that is not Falcon (qforge exports none): the type before the shape
// fallback. llama.cpp counts attn_v-like tensors (attn_v, attn_qkv) and ffn_down tensors in file
// order; with one of each per layer that count is the layer index.
Rule llama_choice(const Mix& m, TensorRole role, int64_t i, int64_t n, int64_t cols, bool tied, int64_t n_gqa,
                  bool has_imatrix, bool is_70b) {
  const uint32_t f = m.ftype;
  const Rule base = m.base;
  if (role == TensorRole::Output || (tied && role == TensorRole::TokenEmbd)) {
    // Q8_0 when the mixture's block does not divide the width (tensor_type_fallback then takes it
    // further if 32 does not either); else Q6_K unless the mixture is q8_0.
    if (cols % ggml::block_size(base) != 0) return Rule::GgmlQ8_0;
    return base == Rule::GgmlQ8_0 ? Rule::GgmlQ8_0 : Rule::GgmlQ6_K;
  }
  if (m.plain) return base;
  if (role == TensorRole::TokenEmbd)  // the ternary / 2-bit mixtures keep the embeddings at Q4_K
    return f == kTQ1_0 || f == kTQ2_0 || f == kQ2_0 ? Rule::GgmlQ4_K : base;
  if (role == TensorRole::AttnV || role == TensorRole::AttnQkv) {  // category_is_attn_v
    Rule r = base;
    if (f == kQ2_K) r = n_gqa >= 4 ? Rule::GgmlQ4_K : Rule::GgmlQ3_K;
    else if (f == kQ2_K_S && n_gqa >= 4) r = Rule::GgmlQ4_K;
    else if (f == kQ3_K_M) r = i < 2 ? Rule::GgmlQ5_K : Rule::GgmlQ4_K;
    else if (f == kQ3_K_L) r = Rule::GgmlQ5_K;
    else if ((f == kIQ4_NL || f == kIQ4_XS) && n_gqa >= 4) r = Rule::GgmlQ5_K;
    else if ((f == kQ4_K_M || f == kQ5_K_M) && use_more_bits(i, n)) r = Rule::GgmlQ6_K;
    else if (f == kQ4_K_S && i < 4) r = Rule::GgmlQ5_K;
    // LLM_TYPE_70B: 8 heads share each attn_v, so more bits cost little there.
    if (is_70b && (r == Rule::GgmlQ3_K || r == Rule::GgmlQ4_K)) r = Rule::GgmlQ5_K;
    return r;
  }
  if (role == TensorRole::FfnDown) {
    if (f == kQ2_K) return Rule::GgmlQ3_K;
    if (f == kQ2_K_S) return i < n / 8 ? Rule::GgmlQ4_K : base;
    if (f == kQ3_K_M) return i < n / 16 ? Rule::GgmlQ5_K : Rule::GgmlQ4_K;
    if (f == kQ3_K_L) return Rule::GgmlQ5_K;
    if (f == kQ4_K_M) return use_more_bits(i, n) ? Rule::GgmlQ6_K : base;
    if (i < n / 8 && (f == kIQ4_NL || f == kIQ4_XS) && !has_imatrix) return Rule::GgmlQ5_K;
    if (f == kQ5_K_M && use_more_bits(i, n)) return Rule::GgmlQ6_K;
    if (f == kQ4_K_S && i < n / 8) return Rule::GgmlQ5_K;
    // "Guard against craziness in the first few ffn_down layers that can happen even with imatrix".
    if ((f == kQ4_0 || f == kQ5_0) && has_imatrix && i < n / 8) return f == kQ4_0 ? Rule::GgmlQ4_1 : Rule::GgmlQ5_1;
    return base;
  }
  if (role == TensorRole::AttnOutput) {
    if (f == kQ2_K) return Rule::GgmlQ3_K;
    if (f == kQ3_K_M) return Rule::GgmlQ4_K;
    if (f == kQ3_K_L) return Rule::GgmlQ5_K;
  }
  return base;
}

}  // namespace

bool is_70b(const std::string& gguf_arch, int64_t n_layers, int64_t n_heads, int64_t n_kv_heads) {
  // llama-model.cpp's load_hparams: llama with 80 layers is 70B under GQA (65B without), qwen2 with 80 is 70B.
  return n_layers == 80 && ((gguf_arch == "llama" && n_heads != n_kv_heads) || gguf_arch == "qwen2");
}

const std::vector<std::string>& mix_names() {
  static const std::vector<std::string> n{"f32",    "f16",    "q8_0",   "q4_0",   "q4_1",   "q5_0",  "q5_1",
                                          "q2_k",   "q2_k_s", "q3_k",   "q3_k_s", "q3_k_m", "q3_k_l", "q4_k",
                                          "q4_k_s", "q4_k_m", "q5_k",   "q5_k_s", "q5_k_m", "q6_k",  "iq4_nl",
                                          "iq4_xs", "tq1_0",  "tq2_0",  "q1_0",   "q2_0"};
  return n;
}
bool is_mix(const std::string& name) { return mixes().count(name) > 0; }
uint32_t mix_file_type(const std::string& mix) { return mix_of(mix).ftype; }

bool use_more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

MixChoice mix_choice(const std::string& name, TensorRole role, int64_t layer, int64_t n_layers, int64_t cols, bool tied,
                     const std::string& fallback, int64_t n_gqa, bool has_imatrix, bool is_70b) {
  const Mix& m = mix_of(name);
  MixChoice c;
  if (m.base == Rule::Affine) {
    c.f16 = m.f16;
    return c;
  }
  Rule r = llama_choice(m, role, layer, n_layers, cols, tied, n_gqa, has_imatrix, is_70b);
  if (cols % ggml::block_size(r) != 0) {
    // tensor_type_fallback: 256-block types fall back to a 32-block type, anything that still does not
    // fit to F16; a 128-block Q1_0 has no fallback in llama.cpp (it throws).
    Rule fb = r;
    switch (r) {
      case Rule::GgmlQ2_K:
      case Rule::GgmlQ3_K: fb = Rule::GgmlQ4_0; break;
      case Rule::GgmlQ4_K: fb = Rule::GgmlQ5_0; break;
      case Rule::GgmlQ5_K: fb = Rule::GgmlQ5_1; break;
      case Rule::GgmlQ6_K: fb = Rule::GgmlQ8_0; break;
      case Rule::GgmlIQ4_XS: fb = Rule::GgmlIQ4_NL; break;
      case Rule::GgmlTQ1_0:
      case Rule::GgmlTQ2_0:
      case Rule::GgmlQ2_0: fb = Rule::GgmlQ4_0; break;
      default: break;
    }
    c.fallback = str("ncols ", cols, " not divisible by ", ggml::block_size(r), " (required for type ", rule_name(r), ")");
    if (!fallback.empty()) {  // the caller's choice instead of llama.cpp's
      const Mix& f = mix_of(fallback);
      if (f.base == Rule::Affine) {
        c.f16 = f.f16;
        c.fallback += str(" -> falling back to ", fallback, " (--fallback)");
        return c;
      }
      if (ggml::block_size(f.base) > 32 || cols % ggml::block_size(f.base) != 0)
        throw InputError(str("--fallback ", fallback, ": its block of ", ggml::block_size(f.base), " does not divide the ",
                             cols, " columns either; use q8_0, q5_0, q5_1, q4_0, q4_1 or iq4_nl (32-blocks) when 32 ",
                             "divides them, else f16 or f32"));
      c.fallback += str(" -> falling back to ", fallback, " (--fallback)");
      c.rule = f.base;
      return c;
    }
    if (ggml::block_size(fb) > 32 && cols % ggml::block_size(fb) != 0)
      throw InputError(str(c.fallback, ": llama.cpp defines no fallback type for ", rule_name(r),
                           " (llama-quantize stops here); give --fallback q8_0|q5_0|q5_1|q4_0|q4_1|iq4_nl|f16|f32"));
    if (cols % ggml::block_size(fb) != 0) {
      c.fallback += " -> falling back to f16";
      c.f16 = true;
      return c;
    }
    c.fallback += str(" -> falling back to ", rule_name(fb));
    r = fb;
  }
  // tensor_requires_imatrix: llama-quantize refuses a Q2_K_S file's Q2_K tensors without one.
  if (m.ftype == kQ2_K_S && r == Rule::GgmlQ2_K && !has_imatrix && role != TensorRole::TokenEmbd &&
      role != TensorRole::Output)
    throw InputError("q2_k_s needs an importance matrix for its Q2_K tensors, as llama-quantize does (\"this "
                     "quantization requires an imatrix!\"); give --imatrix FILE or use q2_k");
  c.rule = r;
  return c;
}

}  // namespace qf::quant
