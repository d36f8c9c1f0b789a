#include "quant/ggml_mix.h"

#include <map>

#include "core/error.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_types.h"

namespace qf::quant {
namespace {

struct Mix {
  Rule base;
  bool f16;
  uint32_t ftype;
};

const std::map<std::string, Mix>& mixes() {
  static const std::map<std::string, Mix> m = {
      {"f32", {Rule::Affine, false, 0}},    {"f16", {Rule::Affine, true, 1}},     {"q4_0", {Rule::GgmlQ4_0, false, 2}},
      {"q4_1", {Rule::GgmlQ4_1, false, 3}}, {"q8_0", {Rule::GgmlQ8_0, false, 7}}, {"q5_0", {Rule::GgmlQ5_0, false, 8}},
      {"q5_1", {Rule::GgmlQ5_1, false, 9}}, {"q4_k", {Rule::GgmlQ4_K, false, 14}}, {"q4_k_m", {Rule::GgmlQ4_K, false, 15}},
      {"q6_k", {Rule::GgmlQ6_K, false, 18}}};
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

}  // namespace

const std::vector<std::string>& mix_names() {
  static const std::vector<std::string> n{"f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q4_k_m", "q6_k"};
  return n;
}
bool is_mix(const std::string& name) { return mixes().count(name) > 0; }
uint32_t mix_file_type(const std::string& mix) { return mix_of(mix).ftype; }

bool use_more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

MixChoice mix_choice(const std::string& name, TensorRole role, int64_t layer, int64_t n_layers, int64_t cols, bool tied,
                     const std::string& fallback) {
  const Mix& m = mix_of(name);
  MixChoice c;
  if (m.base == Rule::Affine) {
    c.f16 = m.f16;
    return c;
  }
  Rule r = m.base;
  const bool output = role == TensorRole::Output || (tied && role == TensorRole::TokenEmbd);
  if (output) {
    // llama-quant.cpp: the output tensor gets Q6_K (Q8_0 when 256 does not divide its width), unless
    // the mixture is q8_0.
    if (cols % 256 != 0) r = Rule::GgmlQ8_0;
    else if (r != Rule::GgmlQ8_0) r = Rule::GgmlQ6_K;
  } else if (name == "q4_k_m" && (role == TensorRole::AttnV || role == TensorRole::FfnDown) &&
             use_more_bits(layer, n_layers)) {
    r = Rule::GgmlQ6_K;
  } else if (name == "q4_k_m" && role == TensorRole::AttnQkv) {
    // llama-quant.cpp stores a fused attn_qkv as Q5_K under Q4_K_M.
    throw InputError("q4_k_m stores a fused attn_qkv tensor as Q5_K, which qforge does not implement yet; use q4_k, "
                     "q6_k, q8_0 or another 32-block type");
  }
  if (cols % ggml::block_size(r) != 0) {
    // tensor_type_fallback: K-quants fall back to a 32-block type, anything that still does not fit to F16.
    Rule fb = r == Rule::GgmlQ4_K ? Rule::GgmlQ5_0 : r == Rule::GgmlQ6_K ? Rule::GgmlQ8_0 : r;
    c.fallback = str("ncols ", cols, " not divisible by ", ggml::block_size(r), " (required for type ", rule_name(r), ")");
    if (!fallback.empty()) {  // the caller's choice instead of llama.cpp's
      const Mix& f = mix_of(fallback);
      if (f.base == Rule::Affine) {
        c.f16 = f.f16;
        c.fallback += str(" -> falling back to ", fallback, " (--fallback)");
        return c;
      }
      if (f.base == Rule::GgmlQ4_K || f.base == Rule::GgmlQ6_K || fallback == "q4_k_m" || cols % ggml::block_size(f.base) != 0)
        throw InputError(str("--fallback ", fallback, ": its block of ", ggml::block_size(f.base), " does not divide the ",
                             cols, " columns either; use q8_0, q5_0, q5_1, q4_0 or q4_1 (32-blocks) when 32 divides ",
                             "them, else f16 or f32"));
      c.fallback += str(" -> falling back to ", fallback, " (--fallback)");
      c.rule = f.base;
      return c;
    }
    if (cols % ggml::block_size(fb) != 0) {
      c.fallback += " -> falling back to f16";
      c.f16 = true;
      return c;
    }
    c.fallback += str(" -> falling back to ", rule_name(fb));
    r = fb;
  }
  c.rule = r;
  return c;
}

}  // namespace qf::quant
