#include "export/onnx_export.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/strings.h"
#include "export/hf_export.h"
#include "export/layer_view.h"
#include "export/onnx_proto.h"
#include "models/arch.h"
#include "models/hf.h"
#include "peft/lora.h"
#include "quant/qat.h"

namespace qf::exporter {
namespace {

using models::ArchSpec;
using models::ModelConfig;
using models::TensorRole;
using onnx::DataType;
using onnx::Msg;
using quant::QuantSpec;

constexpr int64_t kOpset = 21;           // DequantizeLinear with block_size, Gelu (20)
constexpr size_t kInlineMaxBytes = 1024;  // larger initializers go to the external-data file
const char* kDataFile = "model.onnx_data";
const char* kOtherFormats =
    "--format gguf (llama.cpp blocks, NF4-free), --format hf (float), --format gptq / compressed-tensors / awq "
    "(integer codes), or --format onnx --fallback f32|f16 (those layers dequantized to float)";

const char* kNf4Why = "NF4 (a 16-value code table onnxruntime has no operator for)";

// The ONNX mapping of a converted layer's spec, or why there is none ("" = it maps).
std::string unsupported(const QuantSpec& s, int64_t in) {
  if (s.kind == quant::Kind::Nf4) return kNf4Why;
  if (s.kind != quant::Kind::Int) return "FP8 (onnxruntime's CPU DequantizeLinear has no per-group float8)";
  if (s.is_ggml()) return "llama.cpp blocks (no ONNX operator reads them)";
  if (s.learn != quant::Learn::None) return "LSQ's learned offset (q * s + offset)";
  if (!s.symmetric && !s.int_zero_point())
    return "asymmetric with a float-domain zero point (torchao's -asym presets), which no integer zero point reproduces; "
           "quantize with the -zp presets (e.g. int4-g128-zp), whose integer zero points MatMulNBits and QDQ hold";
  if (s.granularity == quant::Granularity::PerGroup && in % s.block(in) != 0) return "groups that do not divide the width";
  return "";
}

// int4 per-group codes whose group MatMulNBits takes (a power of two >= 16); other codes go QDQ.
bool matmul_nbits(const QuantSpec& s, int64_t in) {
  const int64_t g = s.block(in);
  return s.bits == 4 && s.granularity == quant::Granularity::PerGroup && g >= 16 && (g & (g - 1)) == 0;
}

bool has_activation_quant(quant::QuantizedLinear& ql) {
  for (auto& c : ql.named_children())
    if (c.key() == "activation_fake_quant") return true;
  return false;
}

class Builder {
 public:
  Builder(models::CausalLM& m, const std::string& dir, at::ScalarType wdtype, const std::string& fallback)
      : model_(m), c_(m.cfg), a_(models::arch_spec(m.cfg.family)), data_(dir + "/" + kDataFile, kDataFile),
        wdtype_(wdtype), fallback_(fallback) {
    for (auto& p : m.named_parameters()) params_[p.key()] = p.value().detach();
    for (auto& ns : models::linear_slots(m)) {
      slots_[ns.name] = ns.slot;
      order_.push_back(ns.name);
    }
  }

  // Checks every linear before anything is written; returns the layers kept in float by --fallback.
  void check_all() {
    std::vector<std::string> refused;
    std::string why0;
    for (auto& name : order_) {
      std::string why = refusal(*slots_.at(name)->get());
      if (why.empty()) continue;
      if (refused.empty()) why0 = why;
      refused.push_back(name);
      fallback_layers_.insert(name);
    }
    if (refused.empty() || !fallback_.empty()) return;
    std::string names = refused[0];
    for (size_t i = 1; i < refused.size() && i < 4; ++i) names += ", " + refused[i];
    if (refused.size() > 4) names += str(" and ", refused.size() - 4, " more");
    throw InputError(str("export: ", names, (refused.size() > 1 ? " are " : " is "), why0,
                         "; --format onnx writes float layers (MatMul), int4 per-group codes (MatMulNBits) and integer "
                         "codes with integer zero points (QDQ). Formats that hold it: ", kOtherFormats));
  }

  void build() {
    inputs();
    auto x = embed();
    for (int64_t i = 0; i < c_.n_layers; ++i) x = layer(i, x);
    x = head_input(x);
    auto logits = lm_head(x);
    g_.node("Identity", {logits}, {"logits"});
    g_.output(onnx::value_info("logits", onnx::kFloat, {-1, -1, c_.vocab_size}, {"batch_size", "sequence_length"}));
    for (auto& p : presents_) g_.output(p);
  }

  OnnxExportResult finish(const std::string& dir) {
    data_.close();
    std::vector<std::pair<std::string, std::string>> meta{{"family", c_.family_name()}};
    const std::string bytes = g_.model("qforge_" + c_.family_name(), kOpset, "1", meta);
    fs::write_atomic(dir + "/model.onnx", bytes);
    res_.n_nodes = g_.n_nodes();
    res_.n_fallback = static_cast<int64_t>(fallback_layers_.size());
    res_.bytes = static_cast<int64_t>(bytes.size() + data_.bytes());
    return res_;
  }

 private:
  // ---- values ----
  std::string fresh(const std::string& hint) { return str(hint, "_", n_vals_++); }
  std::string op(const std::string& type, const std::vector<std::string>& in, const std::vector<Msg>& attrs = {},
                 const std::string& domain = "") {
    auto out = fresh(type);
    g_.node(type, in, {out}, attrs, domain);
    return out;
  }
  // An initializer from a CPU tensor (written as stored: float32, float16, int8, uint8, int64).
  std::string init(const std::string& name, const at::Tensor& t0) {
    auto t = t0.contiguous();
    DataType dt;
    switch (t.scalar_type()) {
      case at::kFloat: dt = onnx::kFloat; break;
      case at::kHalf: dt = onnx::kFloat16; break;
      case at::kChar: dt = onnx::kInt8; break;
      case at::kByte: dt = onnx::kUint8; break;
      case at::kLong: dt = onnx::kInt64; break;
      default: QF_CHECK(false, "export: no ONNX initializer type for ", t.scalar_type());
    }
    std::vector<int64_t> dims(t.sizes().begin(), t.sizes().end());
    const size_t n = static_cast<size_t>(t.nbytes());
    g_.initializer(n > kInlineMaxBytes ? data_.add(name, dt, dims, t.data_ptr(), n)
                                       : onnx::tensor_inline(name, dt, dims, t.data_ptr(), n));
    return name;
  }
  std::string ci64(const std::vector<int64_t>& v) {
    std::string key = "i64";
    for (auto x : v) key += "_" + std::to_string(x);
    auto it = consts_.find(key);
    if (it != consts_.end()) return it->second;
    auto name = init(str("const_", consts_.size()), at::tensor(v, at::kLong));
    return consts_[key] = name;
  }
  std::string cf(float v) {  // fp32 scalar
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const std::string key = str("f32_", bits);
    auto it = consts_.find(key);
    if (it != consts_.end()) return it->second;
    auto name = init(str("const_", consts_.size()), at::scalar_tensor(v, at::kFloat));
    return consts_[key] = name;
  }
  // A float32 tensor (norm weights, biases, tables) by HF parameter name.
  std::string fparam(const std::string& hf_name, const at::Tensor& t) { return init(hf_name, t.to(at::kFloat)); }
  const at::Tensor& param(const std::string& name) const {
    auto it = params_.find(name);
    QF_CHECK(it != params_.end(), "export: the model has no parameter ", name);
    return it->second;
  }
  bool has_param(const std::string& name) const { return params_.count(name) > 0; }
  // A float weight in the graph as float32: stored in `dtype`, with a Cast when that is fp16.
  std::string weight(const std::string& name, const at::Tensor& t, at::ScalarType dtype) {
    if (dtype == at::kHalf) return op("Cast", {init(name, t.to(at::kHalf))}, {onnx::attr_int("to", onnx::kFloat)});
    return init(name, t.to(at::kFloat));
  }

  // ---- inputs ----
  void inputs() {
    g_.input(onnx::value_info("input_ids", onnx::kInt64, {-1, -1}, {"batch_size", "sequence_length"}));
    g_.input(onnx::value_info("attention_mask", onnx::kInt64, {-1, -1}, {"batch_size", "total_sequence_length"}));
    if (c_.family != models::Family::Opt)
      g_.input(onnx::value_info("position_ids", onnx::kInt64, {-1, -1}, {"batch_size", "sequence_length"}));
    for (int64_t i = 0; i < c_.n_layers; ++i)
      for (const char* kv : {"key", "value"}) {
        g_.input(onnx::value_info(str("past_key_values.", i, ".", kv), onnx::kFloat, {-1, c_.kv_heads(), -1, c_.hdim()},
                                  {"batch_size", "", "past_sequence_length"}));
        presents_.push_back(onnx::value_info(str("present.", i, ".", kv), onnx::kFloat, {-1, c_.kv_heads(), -1, c_.hdim()},
                                   {"batch_size", "", "total_sequence_length"}));
      }
    // Lengths: S new tokens, K = past + S keys, P = past.
    q_len_ = op("Shape", {"input_ids"}, {onnx::attr_int("start", 1), onnx::attr_int("end", 2)});
    kv_len_ = op("Shape", {"attention_mask"}, {onnx::attr_int("start", 1), onnx::attr_int("end", 2)});
    past_len_ = op("Sub", {kv_len_, q_len_});
  }

  // Query i (absolute past + i) may see key j when j <= past + i, j > past + i - window (window > 0)
  // and attention_mask[b, j] = 1: bool [B, 1, S, K], built once per window.
  std::string allowed(int64_t window) {
    auto it = masks_.find(window);
    if (it != masks_.end()) return it->second;
    auto zero = ci64({0}), one = ci64({1});
    auto sq = [&](const std::string& v) { return op("Squeeze", {v, ci64({0})}); };
    auto kj = op("Range", {sq(zero), sq(kv_len_), sq(one)});                              // [K]
    auto qi = op("Unsqueeze", {op("Range", {sq(past_len_), sq(kv_len_), sq(one)}), ci64({1})});  // [S, 1]
    auto ok = op("LessOrEqual", {kj, qi});                                                  // [S, K]
    if (window > 0) ok = op("And", {ok, op("Greater", {kj, op("Sub", {qi, ci64({window})})})});
    auto am = op("Unsqueeze", {op("Cast", {"attention_mask"}, {onnx::attr_int("to", onnx::kBool)}), ci64({1, 2})});
    return masks_[window] = op("And", {ok, am});                                            // [B, 1, S, K]
  }

  // cos, sin [B, 1, S, R] for the positions, from inverse frequencies as models/transformer.cpp's
  // rope_cos_sin computes them (fp32 outer product, halves repeated, times the attention factor).
  std::pair<std::string, std::string> rope(bool local) {
    auto key = local ? 1 : 0;
    auto it = ropes_.find(key);
    if (it != ropes_.end()) return it->second;
    ModelConfig rc = c_;
    if (local) {
      rc.rope_theta = c_.rope_local_theta;
      rc.rope_scaling = models::RopeScaling::None;
    }
    auto pos = op("Unsqueeze", {op("Cast", {"position_ids"}, {onnx::attr_int("to", onnx::kFloat)}), ci64({2})});  // [B,S,1]
    std::string inv;
    if (rc.rope_scaling == models::RopeScaling::LongRope) {
      // transformers' Phi-3 LongRoPE: long factors once the sequence (max position + 1) exceeds the
      // original context; qforge's rope_inv_freq(c, seq_len) makes the same choice.
      auto short_inv = init("rope_inv_freq_short", models::rope_inv_freq(rc, 0).to(at::kFloat));
      auto long_inv = init("rope_inv_freq_long", models::rope_inv_freq(rc, rc.rope_original_max_seq_len + 1).to(at::kFloat));
      auto seq = op("Add", {op("ReduceMax", {"position_ids"}, {onnx::attr_int("keepdims", 0)}), ci64({1})});
      auto use_long = op("Greater", {seq, ci64({rc.rope_original_max_seq_len})});
      inv = op("Where", {use_long, long_inv, short_inv});
    } else {
      inv = init(str(local ? "rope_inv_freq_local" : "rope_inv_freq"), models::rope_inv_freq(rc, 0).to(at::kFloat));
    }
    auto freqs = op("Mul", {pos, inv});                                    // [B, S, R/2]
    auto emb = op("Concat", {freqs, freqs}, {onnx::attr_int("axis", -1)});  // [B, S, R]
    std::string cs = op("Cos", {emb}), sn = op("Sin", {emb});
    const double s = models::rope_attention_scale(rc);
    if (s != 1.0) {
      cs = op("Mul", {cs, cf(static_cast<float>(s))});
      sn = op("Mul", {sn, cf(static_cast<float>(s))});
    }
    return ropes_[key] = {op("Unsqueeze", {cs, ci64({1})}), op("Unsqueeze", {sn, ci64({1})})};
  }
  // x [B, H, S, D]: the first R dims rotate (rotate-half), the rest pass.
  std::string apply_rope(const std::string& x, const std::pair<std::string, std::string>& cs) {
    const int64_t D = c_.hdim(), R = c_.rotary_dim(), h = R / 2;
    auto slice = [&](const std::string& v, int64_t a, int64_t b) { return op("Slice", {v, ci64({a}), ci64({b}), ci64({3})}); };
    auto xr = R < D ? slice(x, 0, R) : x;
    auto rot = op("Concat", {op("Neg", {slice(xr, h, R)}), slice(xr, 0, h)}, {onnx::attr_int("axis", 3)});
    auto y = op("Add", {op("Mul", {xr, cs.first}), op("Mul", {rot, cs.second})});
    if (R < D) y = op("Concat", {y, slice(x, R, D)}, {onnx::attr_int("axis", 3)});
    return y;
  }

  // ---- norms ----
  std::string rms_norm(const std::string& x, const std::string& wname) {
    auto ms = op("ReduceMean", {op("Mul", {x, x}), ci64({-1})}, {onnx::attr_int("keepdims", 1)});
    auto y = op("Mul", {x, op("Reciprocal", {op("Sqrt", {op("Add", {ms, cf(static_cast<float>(c_.norm_eps))})})})});
    const at::Tensor& w = param(wname);
    if (a_.gemma_norms) return op("Mul", {y, init(wname + ".plus_one", 1.0 + w.to(at::kFloat))});
    return op("Mul", {fparam(wname, w), y});
  }
  std::string layer_norm(const std::string& x, const std::string& module) {
    return op("LayerNormalization", {x, fparam(module + ".weight", param(module + ".weight")), fparam(module + ".bias", param(module + ".bias"))},
              {onnx::attr_int("axis", -1), onnx::attr_float("epsilon", static_cast<float>(c_.norm_eps))});
  }
  std::string norm(const std::string& x, const std::string& module) {
    return a_.positions.empty() ? rms_norm(x, module + ".weight") : layer_norm(x, module);
  }

  // ---- linears ----
  // Why `m` (as convert would leave it) has no ONNX mapping; "" when it has one. Reads the spec
  // without packing anything.
  std::string refusal(models::LinearBase& m) {
    models::LinearBase* base = &m;
    if (auto* l = dynamic_cast<peft::LoraLinear*>(&m)) base = l->base.get();
    const QuantSpec* s = converted_spec(m);
    if (!s) {  // float after convert: dense, half-precision, or LoRA merged into a non-fake-quant base
      if (base != &m || dynamic_cast<models::DenseLinear*>(&m) || dynamic_cast<models::HalfLinear*>(&m)) return "";
      return kNf4Why;
    }
    std::string why = unsupported(*s, m.in_features);
    if (!why.empty()) return str(s->describe(), ": ", why);
    bool act = false;
    if (auto* ql = dynamic_cast<quant::QuantizedLinear*>(base)) {
      if (ql->g_idx.defined()) return "GPTQ with act-order (a per-column group map); quantize with --static-groups";
      act = has_activation_quant(*ql);
    } else if (auto* fq = dynamic_cast<quant::FakeQuantLinear*>(base)) {
      act = fq->act_fq != nullptr;
    }
    if (act)
      return str(s->describe(), " with dynamic activation quantization (8da4w-style), which the graph does not "
                 "reproduce; export weight-only schemes");
    return "";
  }

  std::string linear(const std::string& x, const std::string& name) {
    auto it = slots_.find(name);
    QF_CHECK(it != slots_.end(), "export: the model has no linear ", name);
    auto mod = converted_linear(it->second->get());
    std::string y;
    auto* ql = dynamic_cast<quant::QuantizedLinear*>(mod.get());
    if (ql && !fallback_layers_.count(name)) {
      y = packed_linear(x, name, *ql);
    } else {
      const auto dtype = fallback_layers_.count(name) ? (fallback_ == "f16" ? at::kHalf : at::kFloat) : wdtype_;
      y = op("MatMul", {x, weight(name + ".weight", mod->effective_weight().to(at::kFloat).t(), dtype)});
      ++res_.n_float;
    }
    if (auto b = mod->bias_or_undefined(); b.defined()) y = op("Add", {y, fparam(name + ".bias", b)});
    return y;
  }

  std::string packed_linear(const std::string& x, const std::string& name, quant::QuantizedLinear& ql) {
    const QuantSpec& s = ql.weight_spec();
    const int64_t K = ql.in_features, N = ql.out_features, g = s.block(K);
    auto codes = ql.int_codes().to(at::kLong);  // [N, K] in [qmin, qmax]
    auto scales = ql.scales.to(at::kFloat);
    if (scales.numel() == 1) scales = scales.reshape({1, 1}).expand({N, 1});
    scales = scales.reshape({N, -1}).contiguous();  // [N, K / g]
    const int64_t groups = scales.size(1);
    // Integer zero points (-zp presets): z in [0, 2^b - 1] per group, weight (q - z) * s.
    at::Tensor zeros;
    if (s.int_zero_point()) {
      zeros = ql.zeros.to(at::kFloat).reshape({N, groups});
      QF_CHECK(at::equal(zeros, zeros.round()), "export: ", name, ": zero points are not integers (", s.describe(), ")");
      zeros = zeros.to(at::kLong);
    }
    // What the runtime computes must be the layer's own dequantized weight, bit for bit.
    auto q0 = zeros.defined() ? codes - zeros.repeat_interleave(K / groups, 1) : codes;
    auto w = q0.to(at::kFloat) * scales.repeat_interleave(K / groups, 1);
    QF_CHECK(at::equal(w, ql.effective_weight().to(at::kFloat)), "export: ", name,
             ": codes * scales differ from the layer's dequantized weight (", s.describe(), ")");
    if (matmul_nbits(s, K)) {
      // B uint8 [N, K/g, g/2]: unsigned codes, two per byte along K, low nibble first; symmetric codes
      // as q + 8 with MatMulNBits' default zero point 8, -zp codes as they are with their zero points
      // (uint8 [N, ceil(groups / 2)], two per byte, low nibble first).
      auto u = (zeros.defined() ? codes : codes + 8).to(at::kByte).reshape({N, K / g, g / 2, 2});
      auto packed = u.select(3, 0).bitwise_or(u.select(3, 1).__lshift__(4)).contiguous();
      std::vector<std::string> ins{x, init(name + ".qweight", packed), init(name + ".scales", scales.reshape({N * groups}))};
      if (zeros.defined()) {
        auto z = zeros.to(at::kByte);
        if (groups % 2) z = at::cat({z, at::zeros({N, 1}, z.options())}, 1);
        z = z.reshape({N, -1, 2});
        ins.push_back(init(name + ".qzeros", z.select(2, 0).bitwise_or(z.select(2, 1).__lshift__(4)).reshape({-1}).contiguous()));
      }
      ++res_.n_matmul_nbits;
      return op("MatMulNBits", ins,
                {onnx::attr_int("K", K), onnx::attr_int("N", N), onnx::attr_int("bits", 4), onnx::attr_int("block_size", g)},
                "com.microsoft");
    }
    // QDQ: codes [K, N] (int8; uint8 with integer zero points), scales (and zero points) per output
    // column (axis 1), blocked along K when per group.
    const bool per_col = groups == 1;
    auto q = init(name + ".qweight", codes.t().contiguous().to(zeros.defined() ? at::kByte : at::kChar));
    std::vector<Msg> attrs{onnx::attr_int("axis", per_col ? 1 : 0)};
    if (!per_col) attrs.push_back(onnx::attr_int("block_size", g));
    auto layout = [&](const at::Tensor& t) { return per_col ? t.reshape({N}) : t.t().contiguous(); };  // [N] or [K/g, N]
    std::vector<std::string> ins{q, init(name + ".scales", layout(scales))};
    if (zeros.defined()) ins.push_back(init(name + ".qzeros", layout(zeros).to(at::kByte)));
    ++res_.n_qdq;
    return op("MatMul", {x, op("DequantizeLinear", ins, attrs)});
  }

  // ---- model ----
  std::string embed() {
    auto table = converted_embedding(model_.token_embedding().get())->table().to(at::kFloat);
    table_ = weight(model_.token_embedding_name() + ".weight", table, wdtype_);
    auto x = op("Gather", {table_, "input_ids"}, {onnx::attr_int("axis", 0)});
    if (a_.scale_embeddings) {
      // transformers' normalizer: sqrt(hidden) rounded to the model dtype.
      const auto mdt = c_.dtype == models::DType::BF16 ? at::kBFloat16 : at::kFloat;
      x = op("Mul", {x, cf(at::scalar_tensor(std::sqrt(static_cast<double>(c_.dim)), mdt).item<float>())});
    }
    if (c_.family == models::Family::Opt) {
      if (c_.embed_width() != c_.dim) x = op("MatMul", {x, weight(a_.optional_modules.at(0) + ".weight", param(a_.optional_modules.at(0) + ".weight").to(at::kFloat).t(), wdtype_)});
      // transformers' OPTLearnedPositionalEmbedding: cumsum(mask) * mask - 1 over all K keys, the
      // last S of them, plus the table's offset of 2.
      auto cs = op("CumSum", {"attention_mask", ci64({1})});
      auto p = op("Sub", {op("Mul", {cs, "attention_mask"}), ci64({1})});
      p = op("Slice", {p, past_len_, ci64({std::numeric_limits<int64_t>::max()}), ci64({1})});
      p = op("Add", {p, ci64({2})});
      auto pe = fparam(a_.positions + ".weight", param(a_.positions + ".weight"));
      x = op("Add", {x, op("Gather", {pe, p}, {onnx::attr_int("axis", 0)})});
    } else if (!a_.positions.empty()) {
      auto pe = fparam(a_.positions + ".weight", param(a_.positions + ".weight"));
      x = op("Add", {x, op("Gather", {pe, "position_ids"}, {onnx::attr_int("axis", 0)})});
    }
    return x;
  }

  // [B, S, n*D] -> [B, n, S, D]
  std::string heads(const std::string& x, int64_t n, bool transpose = true) {
    auto y = op("Reshape", {x, ci64({0, 0, n, c_.hdim()})});
    return transpose ? op("Transpose", {y}, {onnx::attr_ints("perm", {0, 2, 1, 3})}) : y;
  }

  std::string attention(int64_t i, const std::string& x) {
    const std::string pre = a_.layer_prefix(i) + ".";
    const int64_t H = c_.n_heads, Hkv = c_.kv_heads(), D = c_.hdim();
    std::string q, k, v;
    if (a_.fused_qkv || c_.family == models::Family::Gpt2) {
      auto qkv = linear(x, pre + a_.linear(TensorRole::AttnQkv).name);
      q = fresh("q"), k = fresh("k"), v = fresh("v");
      g_.node("Split", {qkv, ci64({H * D, Hkv * D, Hkv * D})}, {q, k, v}, {onnx::attr_int("axis", -1)});
    } else {
      q = linear(x, pre + a_.linear(TensorRole::AttnQ).name);
      k = linear(x, pre + a_.linear(TensorRole::AttnK).name);
      v = linear(x, pre + a_.linear(TensorRole::AttnV).name);
    }
    const bool rotary = a_.positions.empty();
    if (c_.qk_norm) {  // RMSNorm over each head's D before RoPE
      auto perm = onnx::attr_ints("perm", {0, 2, 1, 3});
      q = op("Transpose", {rms_norm(heads(q, H, false), pre + a_.layer_module("attn_q_norm.weight") + ".weight")}, {perm});
      k = op("Transpose", {rms_norm(heads(k, Hkv, false), pre + a_.layer_module("attn_k_norm.weight") + ".weight")}, {perm});
    } else {
      q = heads(q, H);
      k = heads(k, Hkv);
    }
    v = heads(v, Hkv);
    const int64_t window = c_.window(i);
    if (rotary) {
      auto cs = rope(c_.rope_local_theta > 0 && window > 0);
      q = apply_rope(q, cs);
      k = apply_rope(k, cs);
    }
    const std::string pk = str("present.", i, ".key"), pv = str("present.", i, ".value");
    g_.node("Concat", {str("past_key_values.", i, ".key"), k}, {pk}, {onnx::attr_int("axis", 2)});
    g_.node("Concat", {str("past_key_values.", i, ".value"), v}, {pv}, {onnx::attr_int("axis", 2)});
    k = pk, v = pv;
    if (H != Hkv) {  // GQA: each kv head serves H / Hkv query heads (repeat_interleave on dim 1)
      auto rep = [&](const std::string& t) {
        auto e = op("Expand", {op("Unsqueeze", {t, ci64({2})}), ci64({1, 1, H / Hkv, 1, 1})});
        return op("Reshape", {e, ci64({0, H, -1, D})});
      };
      k = rep(k), v = rep(v);
    }
    const double scale = c_.query_pre_attn_scalar > 0 ? 1.0 / std::sqrt(c_.query_pre_attn_scalar) : 1.0 / std::sqrt(double(D));
    auto s = op("Mul", {op("MatMul", {q, op("Transpose", {k}, {onnx::attr_ints("perm", {0, 1, 3, 2})})}), cf(static_cast<float>(scale))});
    if (c_.attn_softcap > 0) {
      const float cap = static_cast<float>(c_.attn_softcap);
      s = op("Mul", {op("Tanh", {op("Div", {s, cf(cap)})}), cf(cap)});
    }
    // The lowest float rather than -inf: a row with no visible key (left padding) stays finite.
    s = op("Where", {allowed(window), s, cf(std::numeric_limits<float>::lowest())});
    auto y = op("MatMul", {op("Softmax", {s}, {onnx::attr_int("axis", -1)}), v});
    y = op("Reshape", {op("Transpose", {y}, {onnx::attr_ints("perm", {0, 2, 1, 3})}), ci64({0, 0, H * D})});
    return linear(y, pre + a_.linear(TensorRole::AttnOutput).name);
  }

  std::string act(const std::string& x) {
    switch (a_.mlp_act) {
      case models::Activation::Silu: return op("Mul", {x, op("Sigmoid", {x})});
      case models::Activation::GeluTanh: return op("Gelu", {x}, {onnx::attr_string("approximate", "tanh")});
      case models::Activation::Relu: return op("Relu", {x});
    }
    return x;
  }

  std::string mlp(int64_t i, const std::string& x) {
    const std::string pre = a_.layer_prefix(i) + ".";
    const std::string down = pre + a_.linear(TensorRole::FfnDown).name, up = pre + a_.linear(TensorRole::FfnUp).name;
    if (c_.family == models::Family::Gpt2 || c_.family == models::Family::Opt) return linear(act(linear(x, up)), down);
    std::string g, u;
    if (a_.fused_gate_up) {
      g = fresh("gate"), u = fresh("up");
      g_.node("Split", {linear(x, up), ci64({c_.ffn(), c_.ffn()})}, {g, u}, {onnx::attr_int("axis", -1)});
    } else {
      g = linear(x, pre + a_.linear(TensorRole::FfnGate).name);
      u = linear(x, up);
    }
    return linear(op("Mul", {act(g), u}), down);
  }

  std::string layer(int64_t i, std::string x) {
    const std::string pre = a_.layer_prefix(i) + ".";
    auto mod = [&](const char* gguf) { return pre + a_.layer_module(gguf); };
    if (c_.post_norm) {  // OPT with do_layer_norm_before = false
      x = norm(op("Add", {x, attention(i, x)}), mod("attn_norm.weight"));
      return norm(op("Add", {x, mlp(i, x)}), mod("ffn_norm.weight"));
    }
    auto h = attention(i, norm(x, mod("attn_norm.weight")));
    if (a_.sandwich_norms) h = norm(h, mod("post_attention_norm.weight"));
    x = op("Add", {x, h});
    h = mlp(i, norm(x, mod("ffn_norm.weight")));
    if (a_.sandwich_norms) h = norm(h, mod("post_ffw_norm.weight"));
    return op("Add", {x, h});
  }

  std::string head_input(std::string x) {
    if (has_param(a_.final_norm + ".weight")) x = norm(x, a_.final_norm);
    if (c_.family == models::Family::Opt && c_.embed_width() != c_.dim)
      x = op("MatMul", {x, weight(a_.optional_modules.at(1) + ".weight", param(a_.optional_modules.at(1) + ".weight").to(at::kFloat).t(), wdtype_)});
    return x;
  }

  std::string lm_head(const std::string& x) {
    std::string y;
    if (slots_.count("lm_head")) {
      y = linear(x, "lm_head");
    } else {  // tied: logits = h @ table^T, as Gemm over the flattened rows (no transposed copy)
      auto rows = op("Reshape", {x, ci64({-1, c_.embed_width()})});
      auto flat = op("Gemm", {rows, table_}, {onnx::attr_int("transB", 1)});
      auto shape = op("Concat", {op("Shape", {x}, {onnx::attr_int("start", 0), onnx::attr_int("end", 2)}), ci64({c_.vocab_size})},
                      {onnx::attr_int("axis", 0)});
      y = op("Reshape", {flat, shape});
    }
    if (c_.final_softcap > 0) {
      const float cap = static_cast<float>(c_.final_softcap);
      y = op("Mul", {op("Tanh", {op("Div", {y, cf(cap)})}), cf(cap)});
    }
    return y;
  }

  models::CausalLM& model_;
  const ModelConfig& c_;
  const ArchSpec& a_;
  onnx::Graph g_;
  onnx::ExternalData data_;
  at::ScalarType wdtype_;
  std::string fallback_;
  std::map<std::string, at::Tensor> params_;
  std::map<std::string, models::LinearSlot*> slots_;
  std::vector<std::string> order_;  // the linears in forward order
  std::set<std::string> fallback_layers_;
  std::map<std::string, std::string> consts_;
  std::map<int64_t, std::string> masks_;
  std::map<int, std::pair<std::string, std::string>> ropes_;
  std::vector<Msg> presents_;
  std::string q_len_, kv_len_, past_len_, table_;
  int64_t n_vals_ = 0;
  OnnxExportResult res_;
};

}  // namespace

OnnxExportResult export_onnx(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& dtype, const std::string& fallback, bool force) {
  QF_CHECK_INPUT(dtype == "fp32" || dtype == "fp16", "export: --format onnx --dtype ", dtype,
                 ": the graph computes in fp32 (onnxruntime's CPU kernels); float weights are stored as fp32 or fp16 "
                 "(use --dtype fp32 or --dtype fp16)");
  QF_CHECK_INPUT(fallback.empty() || fallback == "f32" || fallback == "f16", "export: --format onnx --fallback ", fallback,
                 ": layers ONNX has no operator for are written dequantized to float: use --fallback f32 or f16");
  at::NoGradGuard ng;
  const auto n_lora = peft::lora_layers(model).size();
  if (n_lora) log::info("export: merging ", n_lora, " LoRA adapters into their base layers as they are written");
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    Builder b(model, tmp, dtype == "fp16" ? at::kHalf : at::kFloat, fallback);
    b.check_all();
    b.build();
    auto r = b.finish(tmp);
    auto cfg = models::hf_config_json(model.cfg, "float32");
    cfg.update(hf_special_token_ids(tok));
    cfg["use_cache"] = true;
    fs::write_atomic(tmp + "/config.json", cfg.dump(2) + "\n");
    nlohmann::json gen = {{"_from_model_config", true}};
    for (const char* k : {"bos_token_id", "eos_token_id", "pad_token_id"})
      if (cfg.contains(k) && !cfg[k].is_null()) gen[k] = cfg[k];
    fs::write_atomic(tmp + "/generation_config.json", gen.dump(2) + "\n");
    copy_tokenizer(tok, tmp);
    r.dir = out;
    return r;
  });
}

}  // namespace qf::exporter
