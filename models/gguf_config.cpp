#include "models/gguf_config.h"

#include <array>
#include <cmath>

#include "core/error.h"
#include "core/strings.h"

namespace qf::models {
namespace {

// Llama 3's divisors (export/gguf_export.cpp llama3_divisors, transformers' rope_type llama3) for one
// candidate (factor, low, high, original context), compared with the file's as float32 values.
bool llama3_matches(const ModelConfig& c, const std::vector<double>& d, double factor, double lf, double hf,
                    double orig) {
  const int64_t rd = c.rotary_dim();
  for (int64_t i = 0; i < rd / 2; ++i) {
    const double freq = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
    const double wavelen = 2.0 * M_PI / freq;
    double scaled = freq;
    if (wavelen > orig / lf) {
      scaled = freq / factor;
    } else if (wavelen >= orig / hf) {
      const double smooth = (orig / wavelen - lf) / (hf - lf);
      scaled = (1.0 - smooth) * freq / factor + smooth * freq;
    }
    const float want = static_cast<float>(freq / scaled), got = static_cast<float>(d[static_cast<size_t>(i)]);
    if (std::fabs(want - got) > 4e-7f * std::fabs(want)) return false;
  }
  return true;
}

// rope_freqs.weight back to Llama 3's scaling parameters. The divisors depend on (low, high, original)
// only through the band's straight line smooth = A / wavelength - B, so two band points fix it; without
// two, transformers' defaults (low 1, high 4) are tried over original contexts. Every candidate is
// checked against every divisor.
void read_llama3(const gguf_in::File& f, const std::string& arch, ModelConfig& c) {
  const auto d = f.f32_values("rope_freqs.weight");
  const int64_t rd = c.rotary_dim();
  QF_CHECK_INPUT(static_cast<int64_t>(d.size()) == rd / 2, f.origin(), ": tensor 'rope_freqs.weight' has ", d.size(),
                 " values, expected rotary dims / 2 = ", rd / 2);
  double factor = 1.0;
  for (double x : d) factor = std::max(factor, x);
  if (factor == 1.0) return;  // no scaling
  const double orig_meta = f.get_float(arch + ".rope.scaling.original_context_length", 8192.0);
  std::vector<std::pair<double, double>> band;  // (1 / wavelength, smooth)
  for (int64_t i = 0; i < rd / 2; ++i) {
    const double x = d[static_cast<size_t>(i)];
    if (x > 1.0 * (1 + 1e-6) && x < factor * (1 - 1e-6)) {
      const double freq = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
      band.emplace_back(freq / (2.0 * M_PI), (1.0 / x - 1.0 / factor) / (1.0 - 1.0 / factor));
    }
  }
  std::vector<std::array<double, 3>> cands;  // (low, high, original)
  if (band.size() >= 2) {
    const auto& [x0, s0] = band.front();
    const auto& [x1, s1] = band.back();
    const double A = (s1 - s0) / (x1 - x0), B = A * x0 - s0;
    const double orig = orig_meta;
    cands.push_back({B * orig / A, B * orig / A + orig / A, orig});
  }
  cands.push_back({1.0, 4.0, orig_meta});
  for (int p = 4; p <= 20; ++p) cands.push_back({1.0, 4.0, std::ldexp(1.0, p)});
  for (auto& [lf, hf, orig] : cands)
    if (lf > 0 && hf > lf && llama3_matches(c, d, factor, lf, hf, orig)) {
      c.rope_scaling = RopeScaling::Llama3;
      c.rope_factor = factor;
      c.rope_low_freq_factor = lf;
      c.rope_high_freq_factor = hf;
      c.rope_original_max_seq_len = static_cast<int64_t>(std::llround(orig));
      return;
    }
  throw InputError(str(f.origin(), ": tensor 'rope_freqs.weight' is not Llama 3's rope scaling of any factor, "
                       "low/high frequency factor and original context qforge could find; it is not read"));
}

void read_rope_tables(const gguf_in::File& f, GgufModelInfo& g) {
  ModelConfig& c = g.config;
  const std::string& a = g.arch;
  if (f.tensor("rope_freqs.weight")) {
    QF_CHECK_INPUT(a == "llama", f.origin(), ": tensor 'rope_freqs.weight' (Llama 3 rope scaling) is read for "
                   "general.architecture llama only, not ", a);
    QF_CHECK_INPUT(c.rope_scaling == RopeScaling::None, f.origin(), ": both ", a,
                   ".rope.scaling.type and rope_freqs.weight are set");
    read_llama3(f, a, c);
  }
  const bool lng = f.tensor("rope_factors_long.weight"), shrt = f.tensor("rope_factors_short.weight");
  if (lng || shrt) {
    QF_CHECK_INPUT(a == "phi3" && lng && shrt, f.origin(), ": rope_factors_long/short.weight (LongRoPE) are read for "
                   "phi3 as a pair only");
    c.rope_scaling = RopeScaling::LongRope;
    c.rope_long_factor = f.f32_values("rope_factors_long.weight");
    c.rope_short_factor = f.f32_values("rope_factors_short.weight");
    QF_CHECK_INPUT(static_cast<int64_t>(c.rope_long_factor.size()) == c.rotary_dim() / 2 &&
                       c.rope_short_factor.size() == c.rope_long_factor.size(),
                   f.origin(), ": rope_factors_long/short.weight must each hold rotary dims / 2 = ", c.rotary_dim() / 2,
                   " values");
    c.rope_original_max_seq_len = f.get_int(a + ".rope.scaling.original_context_length");
    c.rope_attention_factor = f.get_float(a + ".rope.scaling.attn_factor", 0.0);
  }
}

}  // namespace

const char* gguf_architectures() { return "llama, qwen2, qwen3, gemma2, gemma3, phi3, gpt2"; }

GgufModelInfo gguf_model_info(const gguf_in::File& f) {
  GgufModelInfo g;
  const std::string& o = f.origin();
  g.arch = f.get_string("general.architecture");
  const std::string& a = g.arch;
  ModelConfig& c = g.config;
  if (a == "llama" || a == "qwen2") c.family = Family::Llama;
  else if (a == "qwen3") c.family = Family::Qwen3;
  else if (a == "gemma2") c.family = Family::Gemma2;
  else if (a == "gemma3") c.family = Family::Gemma3;
  else if (a == "phi3") c.family = Family::Phi3;
  else if (a == "gpt2") c.family = Family::Gpt2;
  else
    throw InputError(str(o, ": general.architecture '", a, "' is not one qforge reads (it reads ", gguf_architectures(),
                         ")"));
  g.permuted_qk = a == "llama";
  g.norm_plus_one = a == "gemma2" || a == "gemma3";
  auto u = [&](const std::string& k) {
    const int64_t v = f.get_int(a + "." + k);
    QF_CHECK_INPUT(v > 0, o, ": metadata key '", a, ".", k, "' is ", v, " (expected a positive count)");
    return v;
  };
  c.dim = u("embedding_length");
  c.n_layers = u("block_count");
  c.n_heads = u("attention.head_count");
  c.max_seq_len = u("context_length");
  c.ffn_dim = u("feed_forward_length");
  const gguf_in::TensorInfo* emb = f.tensor("token_embd.weight");
  QF_CHECK_INPUT(emb && emb->ne.size() == 2, o, ": tensor 'token_embd.weight' is missing or not 2-D");
  c.vocab_size = emb->ne[1];
  QF_CHECK_INPUT(c.vocab_size > 0 && emb->ne[0] == c.dim, o, ": tensor 'token_embd.weight' is [", emb->ne[1], ", ",
                 emb->ne[0], "], expected [vocabulary > 0, ", a, ".embedding_length ", c.dim, "]");
  if (const auto* v = f.find(a + ".vocab_size"))
    QF_CHECK_INPUT(f.get_int(a + ".vocab_size") == c.vocab_size, o, ": metadata key '", a, ".vocab_size' is ", v->i,
                   " but token_embd.weight has ", c.vocab_size, " rows");
  c.tie_embeddings = f.tensor("output.weight") == nullptr;
  if (a == "gpt2") {
    QF_CHECK_INPUT(c.dim % c.n_heads == 0, o, ": gpt2.embedding_length ", c.dim, " is not a multiple of head_count ",
                   c.n_heads);
    c.norm_eps = f.get_float(a + ".attention.layer_norm_epsilon");
    return g;
  }
  c.n_kv_heads = f.get_int(a + ".attention.head_count_kv", c.n_heads);
  QF_CHECK_INPUT(c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0, o, ": ", a, ".attention.head_count_kv ",
                 c.n_kv_heads, " does not divide head_count ", c.n_heads);
  const int64_t hd = f.get_int(a + ".attention.key_length", c.dim / c.n_heads);
  QF_CHECK_INPUT(f.get_int(a + ".attention.value_length", hd) == hd, o, ": ", a,
                 ".attention.value_length differs from key_length (qforge's attention has one head width)");
  QF_CHECK_INPUT(hd > 0 && hd % 2 == 0, o, ": the head width ", hd, " must be even (RoPE rotates pairs)");
  if (hd * c.n_heads != c.dim || f.find(a + ".attention.key_length")) c.head_dim = hd;
  c.norm_eps = f.get_float(a + ".attention.layer_norm_rms_epsilon");
  c.rope_theta = f.get_float(a + ".rope.freq_base", 10000.0);
  const int64_t rd = f.get_int(a + ".rope.dimension_count", hd);
  if (rd != hd) {
    QF_CHECK_INPUT(a == "phi3" && rd > 0 && rd < hd && rd % 2 == 0, o, ": ", a, ".rope.dimension_count ", rd,
                   " is not the head width ", hd, " (partial rotary embeddings are read for phi3 only)");
    c.partial_rotary = static_cast<double>(rd) / static_cast<double>(hd);
  }
  c.qkv_bias = a == "qwen2";
  c.qk_norm = a == "qwen3" || a == "gemma3";
  const std::string stype = f.get_string(a + ".rope.scaling.type", "none");
  if (stype == "linear") {
    c.rope_scaling = RopeScaling::Linear;
    c.rope_factor = f.get_float(a + ".rope.scaling.factor");
  } else if (stype == "yarn" || (stype != "none" && !stype.empty())) {
    throw InputError(str(o, ": ", a, ".rope.scaling.type '", stype, "' is not read by qforge (it reads none and linear; "
                         "Llama 3's scaling comes as the rope_freqs tensor)"));
  }
  const int64_t window = f.get_int(a + ".attention.sliding_window", 0);
  if (a == "gemma2" || a == "gemma3") {
    const bool g3 = a == "gemma3";
    if (window > 0 && window < c.max_seq_len) {
      c.sliding_window = window;
      const int64_t period = g3 ? 6 : 2;
      for (int64_t i = 0; i < c.n_layers; ++i)
        if (i % period < period - 1) c.sliding_layers.push_back(i);
    } else {
      QF_CHECK_INPUT(!g3, o, ": gemma3.attention.sliding_window is ", window, "; llama.cpp's gemma3 needs its windowed layers");
    }
    // llama.cpp fixes what a checkpoint may set otherwise (export/gguf_export.cpp check_gemma).
    const int64_t big = g3 ? 62 : 46;
    c.query_pre_attn_scalar = static_cast<double>(c.n_layers == big ? c.dim / c.n_heads : hd);
    c.tie_embeddings = true;
    if (f.tensor("output.weight"))
      g.notes.push_back("output.weight is ignored: llama.cpp's " + a + " uses the token embedding as the output projection");
    if (g3) {
      c.rope_local_theta = 10000.0;
      const double fc = f.get_float(a + ".final_logit_softcapping", 0.0);
      c.final_softcap = fc >= 1e6 ? 0.0 : fc;
    } else {
      // llama.cpp's defaults when the keys are absent; qforge's exporter writes 1e6 for "none".
      const double ac = f.get_float(a + ".attn_logit_softcapping", 50.0), fc = f.get_float(a + ".final_logit_softcapping", 30.0);
      c.attn_softcap = ac >= 1e6 ? 0.0 : ac;
      c.final_softcap = fc >= 1e6 ? 0.0 : fc;
    }
  } else if (window > 0 && window < c.max_seq_len) {
    if (a == "phi3") {
      c.sliding_window = window;
    } else {
      g.notes.push_back(str(a, ".attention.sliding_window ", window, " is ignored, as llama.cpp's ", a, " does"));
    }
  }
  read_rope_tables(f, g);
  return g;
}

std::string gguf_param(const ArchSpec& a, const ModelConfig& c, const std::string& n) {
  if (n == "token_embd.weight") return a.embed + ".weight";
  if (n == "position_embd.weight") return a.positions.empty() ? "" : a.positions + ".weight";
  if (n == "output_norm.weight" || n == "output_norm.bias") return a.final_norm + n.substr(11);
  if (n == "output.weight") return c.tie_embeddings || a.lm_head.empty() ? "" : a.lm_head + ".weight";
  if (n.rfind("blk.", 0) != 0) return "";
  const size_t dot = n.find('.', 4);
  if (dot == std::string::npos || dot == 4) return "";
  int64_t layer = 0;
  for (size_t i = 4; i < dot; ++i) {
    if (n[i] < '0' || n[i] > '9' || layer > c.n_layers) return "";
    layer = layer * 10 + (n[i] - '0');
  }
  if (layer >= c.n_layers || (dot > 5 && n[4] == '0')) return "";
  const std::string rest = n.substr(dot + 1), pre = a.layer_prefix(layer) + ".";
  for (auto& t : a.layer_tensors)
    if (t.gguf == rest) return pre + t.name;
  for (auto& l : a.linears) {
    if (l.gguf.empty()) continue;
    if (rest == l.gguf + ".weight") return pre + l.name + ".weight";
    if (rest == l.gguf + ".bias") return pre + l.name + ".bias";
  }
  return "";
}

}  // namespace qf::models
