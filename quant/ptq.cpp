#include "quant/ptq.h"

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "models/arch.h"
#include "quant/fake_quant.h"
#include "quant/ggml_blocks.h"

namespace qf::quant {

const std::vector<std::pair<std::string, PtqMethod>>& method_names() {
  static const std::vector<std::pair<std::string, PtqMethod>> n{
      {"none", PtqMethod::None}, {"rtn", PtqMethod::Rtn}, {"gptq", PtqMethod::Gptq}, {"awq", PtqMethod::Awq}};
  return n;
}

const char* method_name(PtqMethod m) {
  for (auto& [name, v] : method_names())
    if (v == m) return name.c_str();
  return "?";
}

PtqMethod parse_method(const std::string& s) {
  for (auto& [name, v] : method_names())
    if (name == s) return v;
  throw ConfigError({"unknown PTQ method '" + s + "'; expected rtn|gptq|awq"});
}

AwqConfig AwqConfig::from_config(cfg::Reader& r) {
  AwqConfig c;
  c.grid = r.i64("grid", c.grid, 1, 1000);
  c.duo_scaling = r.boolean("duo_scaling", c.duo_scaling);
  c.clip = r.boolean("clip", c.clip);
  c.max_shrink = r.f64("max_shrink", c.max_shrink, 0.0, 0.99);
  c.tokens = r.i64("tokens", c.tokens, 16, 1LL << 30);
  c.clip_tokens = r.i64("clip_tokens", c.clip_tokens, 16, 1LL << 30);
  r.finish();
  return c;
}

CalibConfig CalibConfig::from_config(cfg::Reader& r) {
  CalibConfig c;
  c.samples = r.i64("samples", c.samples, 1, 1 << 24);
  c.batch_size = r.i64("batch_size", c.batch_size, 1, 1 << 16);
  c.data = r.path("data", "", true);
  r.finish();
  return c;
}

YAML::Node AwqConfig::to_yaml() const {
  YAML::Node n;
  n["grid"] = grid;
  n["duo_scaling"] = duo_scaling;
  n["clip"] = clip;
  n["max_shrink"] = max_shrink;
  n["tokens"] = tokens;
  n["clip_tokens"] = clip_tokens;
  return n;
}

YAML::Node CalibConfig::to_yaml() const {
  YAML::Node n;
  n["samples"] = samples;
  n["batch_size"] = batch_size;
  if (!data.empty()) n["data"] = data;
  return n;
}

double PtqResult::mean_err_rtn() const {
  double s = 0;
  for (auto& l : linears) s += l.err_rtn;
  return linears.empty() ? 0 : s / static_cast<double>(linears.size());
}
double PtqResult::mean_err() const {
  double s = 0;
  for (auto& l : linears) s += l.err;
  return linears.empty() ? 0 : s / static_cast<double>(linears.size());
}

namespace {

using models::TensorRole;

// A forward hook: stands in a LinearSlot, accumulates sum x^T x (and optionally keeps the inputs),
// and runs the wrapped linear. With squares_only it accumulates only each input column's sum of
// squares (the diagonal, in float64) and the number of token rows: llama.cpp's imatrix statistics.
class CaptureLinear : public models::LinearBase {
 public:
  CaptureLinear(std::shared_ptr<models::LinearBase> inner, bool keep, bool squares_only = false)
      : LinearBase(inner->in_features, inner->out_features), inner_(std::move(inner)), keep_(keep),
        squares_only_(squares_only) {}
  at::Tensor forward(const at::Tensor& x) override {
    auto x2 = x.detach().reshape({-1, in_features}).to(at::kFloat);
    if (squares_only_) {
      auto s = x2.to(at::kDouble).square().sum(0);
      sq_ = sq_.defined() ? sq_.add_(s) : s;
      rows_ += x2.size(0);
      return inner_->forward(x);
    }
    if (!xtx_.defined()) xtx_ = at::zeros({in_features, in_features}, x2.options());
    xtx_.addmm_(x2.t(), x2);
    samples_ += x.dim() >= 3 ? x.size(0) : 1;
    if (keep_) inputs_.push_back(x2.cpu());
    return inner_->forward(x);
  }
  at::Tensor effective_weight() override { return inner_->effective_weight(); }
  // GPTQ's H = 2/n sum x x^T, n counting sequences (as the reference's add_batch does).
  at::Tensor hessian() const { return (xtx_ * (2.0 / static_cast<double>(std::max<int64_t>(1, samples_)))).cpu(); }
  at::Tensor inputs() const { return at::cat(inputs_, 0); }
  InputSquares squares() const { return {sq_.defined() ? sq_.cpu() : at::zeros({in_features}, at::kDouble), rows_}; }
  const std::shared_ptr<models::LinearBase>& inner() const { return inner_; }

 private:
  std::shared_ptr<models::LinearBase> inner_;
  bool keep_, squares_only_;
  at::Tensor xtx_, sq_;
  int64_t samples_ = 0, rows_ = 0;
  std::vector<at::Tensor> inputs_;
};

struct LayerLinear {
  std::string rel, full;
  models::LinearSlot* slot;
  const QuantRule* rule;
  models::DenseLinear* dense;
};

std::vector<LayerLinear> layer_linears(models::CausalLM& model, int64_t i, const QatConfig& q) {
  std::vector<LayerLinear> out;
  const auto prefix = model.layer_prefix(i) + ".";
  for (auto& ns : models::linear_slots(model.layer(i))) {
    LayerLinear l{ns.name, prefix + ns.name, ns.slot, rule_for(q, prefix + ns.name), nullptr};
    l.dense = dynamic_cast<models::DenseLinear*>(ns.slot->get().get());
    out.push_back(l);
  }
  return out;
}

LayerLinear* find(std::vector<LayerLinear>& ls, const std::string& rel) {
  for (auto& l : ls)
    if (l.rel == rel) return &l;
  return nullptr;
}

// Evenly strided rows (deterministic subsample) of x [n, d], at most `k`.
at::Tensor strided_rows(const at::Tensor& x, int64_t k) {
  if (x.size(0) <= k) return x;
  const int64_t step = (x.size(0) + k - 1) / k;
  return x.slice(0, 0, x.size(0), step);
}

// What the scale search compares: the output of the block the scaled linears feed, as a function
// of their weights (AutoAWQ's module2inspect). Default: the linears' own outputs, concatenated.
using Inspect = std::function<at::Tensor(const at::Tensor& X, const std::vector<at::Tensor>& Ws)>;
at::Tensor linear_outputs(const at::Tensor& X, const std::vector<at::Tensor>& Ws) {
  std::vector<at::Tensor> outs;
  for (auto& W : Ws) outs.push_back(at::matmul(X, W.t()));
  return at::cat(outs, -1);
}

// The MLP's output as a function of its input linears' weights (gate and up, a fused [gate; up],
// or the single up), the down projection fixed.
Inspect mlp_output(const models::ArchSpec& arch, models::DenseLinear& first, models::DenseLinear& down) {
  auto cpu = [](const at::Tensor& t) { return t.defined() ? t.detach().to(at::kCPU, at::kFloat) : at::Tensor(); };
  auto Wd = cpu(down.weight), bd = cpu(down.bias), b0 = cpu(first.bias);
  const bool gated = arch.gated_mlp, fused = arch.fused_gate_up;
  const auto act = arch.mlp_act;
  return [=](const at::Tensor& x, const std::vector<at::Tensor>& w) {
    auto a = at::linear(x, w[0], b0);
    at::Tensor up;
    if (gated && fused) {
      auto gu = a.chunk(2, -1);
      a = gu[0], up = gu[1];
    } else if (gated) {
      up = at::matmul(x, w[1].t());
    }
    a = act == models::Activation::Silu ? at::silu(a) : act == models::Activation::Relu ? at::relu(a) : at::gelu(a, "tanh");
    return at::linear(up.defined() ? a * up : a, Wd, bd);
  };
}

// AutoAWQ does not clip the query/key projections (their errors are scaled by the softmax).
bool skips_clip(const models::ArchSpec& arch, const std::string& rel) {
  const auto* l = arch.linear(rel);
  return l && (l->role == TensorRole::AttnQ || l->role == TensorRole::AttnK || l->role == TensorRole::AttnQkv);
}

// AWQ scale search for linears sharing input X [n, in]: minimises mean((inspect(X, Wq) - inspect(X, W))^2)
// with Wq_k = fq(W_k * s) / s over s = x_mean^r / w_mean^(1-r), r on the grid (r = 0: s = 1, RTN).
at::Tensor awq_scale(const at::Tensor& X, const std::vector<at::Tensor>& Ws, const std::vector<QuantSpec>& specs,
                     const AwqConfig& c, const Inspect& inspect) {
  auto x_mean = X.abs().mean(0);
  at::Tensor w_mean;
  if (c.duo_scaling) {
    auto w = at::cat(Ws, 0);
    const int64_t gs = specs[0].block(w.size(1));
    auto wg = w.abs().reshape({-1, gs});
    w_mean = (wg / (wg.amax(1, true) + 1e-6)).reshape(w.sizes()).mean(0);
  }
  const auto ref = inspect(X, Ws);
  double best = std::numeric_limits<double>::infinity();
  at::Tensor best_s = at::ones_like(x_mean);
  for (int64_t g = 0; g < c.grid; ++g) {
    const double r = static_cast<double>(g) / static_cast<double>(c.grid);
    auto s = c.duo_scaling ? (x_mean.pow(r) / (w_mean.pow(1.0 - r) + 1e-4)).clamp_min(1e-4) : x_mean.pow(r).clamp_min(1e-4);
    s = s / (s.max() * s.min()).sqrt();
    std::vector<at::Tensor> wq;
    for (size_t k = 0; k < Ws.size(); ++k) wq.push_back(fake_quant_values(Ws[k] * s.unsqueeze(0), specs[k]) / s.unsqueeze(0));
    const double err = (inspect(X, wq) - ref).pow(2).mean().item<double>();
    if (err < best) best = err, best_s = s;
  }
  return best_s;
}

// AWQ clipping search: per (row, group) the range max|w| * (1 - i/grid) whose quantized group
// output on X [n, in] is closest to the float one; W is clamped in place.
void awq_clip(at::Tensor& W, const at::Tensor& X, const QuantSpec& spec, const AwqConfig& c) {
  const int64_t rows = W.size(0), in = W.size(1);
  const int64_t gs = spec.block(in), ng = in / gs, n = X.size(0);  // ggml presets: their block size
  auto Xg = X.reshape({n, ng, gs});
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, n * ng));
  const int64_t steps = static_cast<int64_t>(c.max_shrink * static_cast<double>(c.grid));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk), R = r1 - r0;
    auto Wg = W.slice(0, r0, r1).reshape({R, ng, gs});
    auto org = at::einsum("rgk,ngk->rng", {Wg, Xg});
    auto org_max = Wg.abs().amax(-1, true);
    auto best_err = at::full({R, ng}, std::numeric_limits<float>::infinity());
    auto best_max = org_max.clone();
    for (int64_t i = 0; i < std::max<int64_t>(1, steps); ++i) {
      auto mx = org_max * (1.0 - static_cast<double>(i) / static_cast<double>(c.grid));
      auto cur = at::max(at::min(Wg, mx), -mx);
      auto q = fake_quant_values(cur.reshape({R, in}), spec).reshape({R, ng, gs});
      auto err = (at::einsum("rgk,ngk->rng", {q, Xg}) - org).pow(2).mean(1);
      auto better = err < best_err;
      best_err = at::where(better, err, best_err);
      best_max = at::where(better.unsqueeze(-1), mx, best_max);
    }
    W.slice(0, r0, r1).copy_(at::max(at::min(Wg, best_max), -best_max).reshape({R, in}));
  }
}

// The layer-by-layer calibration driver every method shares: the calibration set's hidden states
// entering the current layer (one layer's activations alive at a time), capture hooks swapped
// into that layer's linears, and the step to the next layer.
class LayerDriver {
 public:
  LayerDriver(models::CausalLM& model, const at::Tensor& tokens, int64_t batch_size) : model_(model) {
    const auto dev = model.parameters().front().device();
    for (auto& chunk : tokens.split(batch_size)) hs_.push_back(model.embed(chunk.to(dev)));
  }
  // Swaps capture hooks into `ls`, runs layer i over the hidden states, restores the linears.
  std::vector<std::shared_ptr<CaptureLinear>> capture(int64_t i, const std::vector<LayerLinear*>& ls, bool keep,
                                                      bool squares_only = false) {
    std::vector<std::shared_ptr<CaptureLinear>> caps;
    for (auto* l : ls) {
      caps.push_back(std::make_shared<CaptureLinear>(l->slot->get(), keep, squares_only));
      l->slot->replace(caps.back());
    }
    for (auto& h : hs_) model_.layer_forward(i, h);
    for (size_t k = 0; k < ls.size(); ++k) ls[k]->slot->replace(caps[k]->inner());
    return caps;
  }
  // Layer i's outputs, with its new weights, become the next layer's inputs.
  void advance(int64_t i) {
    for (auto& h : hs_) h = model_.layer_forward(i, h);
  }

 private:
  models::CausalLM& model_;
  std::vector<at::Tensor> hs_;
};

// One PTQ method, applied by run_ptq to one decoder layer at a time.
class LayerMethod {
 public:
  virtual ~LayerMethod() = default;
  // Rewrites layer i's selected linears (`lls`, rule set), capturing their inputs through `d`, and
  // reports each one into `res`.
  virtual void quantize_layer(LayerDriver& d, int64_t i, std::vector<LayerLinear>& lls, PtqResult& res) = 0;
  // After the driver has advanced past the layer.
  virtual void after_layer() {}
};

// What one capture pass over a layer's selected linears gives RTN and AWQ, by relative name: the
// Hessian, the original weight and (AWQ) the inputs.
struct LayerCalib {
  std::vector<LayerLinear*> sel;
  std::map<std::string, at::Tensor> H, X, W0;
};

// keep_inputs (AWQ, which rewrites the weights next): the inputs, and W0 as a copy; without it W0 is
// the weight itself (RTN leaves it as it is), one float layer less at the peak.
LayerCalib calibrate(LayerDriver& d, int64_t i, std::vector<LayerLinear>& lls, bool keep_inputs) {
  LayerCalib c;
  for (auto& l : lls)
    if (l.rule) c.sel.push_back(&l);
  auto caps = d.capture(i, c.sel, keep_inputs);
  for (size_t k = 0; k < c.sel.size(); ++k) {
    const auto& rel = c.sel[k]->rel;
    c.H[rel] = caps[k]->hessian();
    auto w = c.sel[k]->dense->weight.detach().to(at::kCPU, at::kFloat);
    c.W0[rel] = keep_inputs && w.is_alias_of(c.sel[k]->dense->weight) ? w.clone() : w;
    if (keep_inputs) c.X[rel] = caps[k]->inputs();
  }
  return c;
}

// rtn: the weights are left for convert to round; each layer's RTN error is reported. With importance
// weights (llama-quantize --imatrix) a llama.cpp-typed linear is quantized with them here and its
// blocks kept for apply_packed.
class RtnMethod : public LayerMethod {
 public:
  explicit RtnMethod(const std::map<std::string, at::Tensor>* importance) : importance_(importance) {}
  void quantize_layer(LayerDriver& d, int64_t i, std::vector<LayerLinear>& lls, PtqResult& res) override {
    auto c = calibrate(d, i, lls, false);
    for (auto* l : c.sel) {
      const auto& spec = l->rule->weight;
      const auto& w0 = c.W0[l->rel];
      const double rtn = output_error(w0, fake_quant_values(w0, spec), c.H[l->rel]);
      const at::Tensor* qw = nullptr;
      if (importance_ && spec.is_ggml())
        if (auto it = importance_->find(l->full); it != importance_->end()) qw = &it->second;
      if (qw) {
        auto blocks = ggml::quantize(w0, spec.rule, *qw);
        const double err = output_error(w0, ggml::dequantize(blocks, spec.rule, w0.size(1)), c.H[l->rel]);
        res.packed[l->full] = PackedStorage{blocks, {}, {}, {}};
        res.linears.push_back({l->full, spec.describe() + " + imatrix", rtn, err, 0.0});
      } else {
        res.linears.push_back({l->full, spec.describe(), rtn, rtn, 0.0});
      }
    }
  }

 private:
  const std::map<std::string, at::Tensor>* importance_;
};

// gptq: per sequential group (the spec's ptq_groups with true_sequential, else all at once), the
// group's inputs are captured with the earlier groups already quantized, then each linear is
// quantized by gptq_quantize; its weight becomes GPTQ's dequantized values for the rest of the
// layer's pass and the packed codes are kept. After the pass the float weights become latent
// weights inside GPTQ's bins (what QAT starts from; convert + apply_packed restore the exact codes).
class GptqMethod : public LayerMethod {
 public:
  GptqMethod(const models::ArchSpec& arch, const GptqConfig& cfg) : arch_(arch), cfg_(cfg) {}
  void quantize_layer(LayerDriver& d, int64_t i, std::vector<LayerLinear>& lls, PtqResult& res) override {
    for (auto& gl : groups(lls)) {
      auto caps = d.capture(i, gl, false);
      for (size_t k = 0; k < gl.size(); ++k) quantize_one(*gl[k], caps[k]->hessian(), res);
    }
  }
  void after_layer() override {
    for (auto& [dense, w] : latent_) dense->weight.copy_(w.to(dense->weight.options()));
    latent_.clear();
  }

 private:
  std::vector<std::vector<LayerLinear*>> groups(std::vector<LayerLinear>& lls) const {
    std::vector<std::vector<LayerLinear*>> out;
    if (cfg_.true_sequential) {
      for (auto& g : arch_.ptq_groups) {
        std::vector<LayerLinear*> gl;
        for (auto& rel : g)
          if (auto* l = find(lls, rel); l && l->rule) gl.push_back(l);
        if (!gl.empty()) out.push_back(gl);
      }
    } else {
      out.emplace_back();
      for (auto& l : lls)
        if (l.rule) out.back().push_back(&l);
    }
    return out;
  }
  void quantize_one(LayerLinear& l, const at::Tensor& H, PtqResult& res) {
    auto W = l.dense->weight.detach().to(at::kCPU, at::kFloat);
    auto qw = gptq_quantize(W, H, l.rule->weight, cfg_, l.full);
    res.linears.push_back({l.full, l.rule->weight.describe(), output_error(W, fake_quant_values(W, l.rule->weight), H),
                           output_error(W, qw.weight, H), qw.damp});
    l.dense->weight.copy_(qw.weight.to(l.dense->weight.options()));
    res.packed[l.full] = qw.packed;
    latent_.emplace_back(l.dense, qw.latent);
  }
  const models::ArchSpec& arch_;
  const GptqConfig& cfg_;
  std::vector<std::pair<models::DenseLinear*, at::Tensor>> latent_;  // weights after the layer's pass
};

// awq: per scaling pair of the spec (a norm or linear -> the linears it feeds), scales s searched
// on the linears' inputs and folded (prev's output channels / s, the linears' input columns * s:
// the float model is unchanged); then the per-group clipping search; weights stay float for
// convert's RTN. The error is reported in the original input and output spaces.
class AwqMethod : public LayerMethod {
 public:
  AwqMethod(const models::ArchSpec& arch, const AwqConfig& cfg, models::CausalLM& model)
      : arch_(arch), cfg_(cfg), model_(model) {}
  void quantize_layer(LayerDriver& d, int64_t i, std::vector<LayerLinear>& lls, PtqResult& res) override {
    auto c = calibrate(d, i, lls, true);
    colscale_.clear();
    rowscale_.clear();
    auto params = model_.layer(i).named_parameters();
    for (auto& f : arch_.awq_pairs) scale_pair(f, lls, params, c);
    if (cfg_.clip) clip(c);
    report(c, res);
  }

 private:
  void scale_pair(const models::AwqPair& f, std::vector<LayerLinear>& lls,
                  torch::OrderedDict<std::string, at::Tensor>& params, LayerCalib& c) {
    std::vector<LayerLinear*> fl;
    for (auto& rel : f.linears)
      if (auto* l = find(lls, rel); l && l->rule) fl.push_back(l);
    if (fl.size() != f.linears.size()) return;  // a partly quantized group keeps its scales
    const int64_t in = fl[0]->dense->in_features;
    LayerLinear* pl = nullptr;
    if (f.prev_is_norm) {
      if (!params.contains(f.prev + ".weight")) return;
      if (model_.cfg.post_norm) return;  // a post-LN norm feeds the next block, not these linears
    } else {
      pl = find(lls, f.prev);
      if (!pl || !pl->dense || pl->dense->out_features != in) return;  // e.g. GQA: v_proj rows != o_proj inputs
    }
    std::vector<at::Tensor> Ws;
    std::vector<QuantSpec> specs;
    for (auto* l : fl) Ws.push_back(l->dense->weight.detach().to(at::kCPU, at::kFloat)), specs.push_back(l->rule->weight);
    auto Xs = strided_rows(c.X[fl[0]->rel], cfg_.tokens);
    // The MLP's input linears are judged on the MLP's output, as AutoAWQ inspects the MLP.
    Inspect inspect = linear_outputs;
    auto* down = find(lls, arch_.linear(TensorRole::FfnDown).name);
    if (f.mlp_input && down && down->dense) inspect = mlp_output(arch_, *fl[0]->dense, *down->dense);
    auto s = awq_scale(Xs, Ws, specs, cfg_, inspect);
    // Fold: prev's output channels / s, the linears' input columns * s (float model unchanged).
    if (f.prev_is_norm) {
      for (auto* suffix : {".weight", ".bias"})
        if (params.contains(f.prev + suffix)) {
          auto& t = params[f.prev + suffix];
          // Gemma's norms scale by (1 + w): w' = (1 + w) / s - 1 (AutoAWQ's GemmaRMSNorm fold).
          const bool offset = arch_.gemma_norms && std::string(suffix) == ".weight";
          if (offset) t.add_(1.0);
          t.div_(s.to(t.options()));
          if (offset) t.sub_(1.0);
        }
    } else {
      pl->dense->weight.div_(s.unsqueeze(1).to(pl->dense->weight.options()));
      if (pl->dense->bias.defined()) pl->dense->bias.div_(s.to(pl->dense->bias.options()));
      rowscale_[pl->rel] = rowscale_.count(pl->rel) ? rowscale_[pl->rel] * s : s;
    }
    for (auto* l : fl) {
      l->dense->weight.mul_(s.unsqueeze(0).to(l->dense->weight.options()));
      c.X[l->rel] = c.X[l->rel] / s.unsqueeze(0);
      colscale_[l->rel] = colscale_.count(l->rel) ? colscale_[l->rel] * s : s;
    }
  }
  void clip(LayerCalib& c) {
    for (auto* l : c.sel) {
      if (skips_clip(arch_, l->rel)) continue;
      auto W = l->dense->weight.detach().to(at::kCPU, at::kFloat).clone();
      awq_clip(W, strided_rows(c.X[l->rel], cfg_.clip_tokens), l->rule->weight, cfg_);
      l->dense->weight.copy_(W.to(l->dense->weight.options()));
    }
  }
  void report(LayerCalib& c, PtqResult& res) {
    for (auto* l : c.sel) {
      const auto& spec = l->rule->weight;
      const auto& w0 = c.W0[l->rel];
      const double rtn = output_error(w0, fake_quant_values(w0, spec), c.H[l->rel]);
      // The quantized weight in the original input and output spaces: fq(W') / s_in * s_out.
      auto wq = fake_quant_values(l->dense->weight.detach().to(at::kCPU, at::kFloat), spec);
      if (colscale_.count(l->rel)) wq = wq / colscale_[l->rel].unsqueeze(0);
      if (rowscale_.count(l->rel)) wq = wq * rowscale_[l->rel].unsqueeze(1);
      res.linears.push_back({l->full, spec.describe(), rtn, output_error(w0, wq, c.H[l->rel]), 0.0});
    }
  }
  const models::ArchSpec& arch_;
  const AwqConfig& cfg_;
  models::CausalLM& model_;
  std::map<std::string, at::Tensor> colscale_, rowscale_;  // this layer's folded scales per linear
};

std::unique_ptr<LayerMethod> make_method(const PtqConfig& p, const models::ArchSpec& arch, models::CausalLM& model,
                                         const std::map<std::string, at::Tensor>* importance) {
  switch (p.method) {
    case PtqMethod::Rtn: return std::make_unique<RtnMethod>(importance);
    case PtqMethod::Gptq: return std::make_unique<GptqMethod>(arch, p.gptq);
    case PtqMethod::Awq: return std::make_unique<AwqMethod>(arch, p.awq, model);
    case PtqMethod::None: break;
  }
  QF_CHECK(false, "run_ptq: no method");
  return nullptr;
}

}  // namespace

void check_ptq(models::CausalLM& model, const QatConfig& q, PtqMethod method) {
  std::vector<std::string> problems;
  int64_t selected = 0;
  for (int64_t i = 0; i < model.cfg.n_layers; ++i) {
    for (auto& l : layer_linears(model, i, q)) {
      if (!l.rule) continue;
      ++selected;
      if (!l.dense && !dynamic_cast<models::DeferredLinear*>(l.slot->get().get()))
        problems.push_back(str(l.full, ": PTQ needs float weights, but this layer is already a ",
                               l.slot->get()->name(), " (quantize the float model, not a QAT or converted one)"));
      if (method == PtqMethod::Gptq) {
        auto why = gptq_unsupported(l.rule->weight);
        if (!why.empty()) problems.push_back(str(l.full, ": gptq with ", l.rule->weight.describe(), ": ", why));
      }
      if (method == PtqMethod::Awq && l.rule->weight.kind == Kind::Nf4)
        problems.push_back(str(l.full, ": awq with NF4 is QLoRA's storage, not a PTQ target"));
      const int64_t blk = l.rule->weight.block(l.slot->get()->in_features);
      if (blk > 0 && l.slot->get()->in_features % blk != 0)
        problems.push_back(str(l.full, ": block size ", blk, " does not divide its input width ", l.slot->get()->in_features));
    }
  }
  if (selected == 0) problems.push_back("quant.rules select no linear inside the decoder layers; nothing to quantize");
  if (!problems.empty()) throw ConfigError(problems);
}

PtqResult run_ptq(models::CausalLM& model, const QatConfig& q, const PtqConfig& p, const at::Tensor& tokens,
                  bool progress, const PtqLayerHooks& hooks, const std::map<std::string, at::Tensor>* importance) {
  QF_CHECK(p.method != PtqMethod::None, "run_ptq: no method");
  QF_CHECK(tokens.dim() == 2 && tokens.size(0) > 0, "run_ptq: calibration tokens must be [samples, seq_len], got ",
           tokens.sizes());
  check_ptq(model, q, p.method);
  const auto t0 = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  PtqResult res;
  res.method = p.method;
  res.calib_tokens = tokens.numel();
  const models::ArchSpec& arch = models::arch_spec(model.cfg.family);
  QF_CHECK(!importance || p.method == PtqMethod::Rtn, "run_ptq: importance weights apply to rtn only");
  auto method = make_method(p, arch, model, importance);
  LayerDriver driver(model, tokens, p.calib.batch_size);
  std::optional<core::ProgressBar> bar;
  if (progress) bar.emplace(std::string("ptq ") + method_name(p.method), model.cfg.n_layers, 0, "layer");
  for (int64_t i = 0; i < model.cfg.n_layers; ++i) {
    if (hooks.before) hooks.before(i);
    auto lls = layer_linears(model, i, q);
    method->quantize_layer(driver, i, lls, res);
    driver.advance(i);
    method->after_layer();
    if (hooks.after) hooks.after(i, res);
    if (bar) bar->update(i + 1, str("rel. error ", res.mean_err(), " (rtn ", res.mean_err_rtn(), ")"));
  }
  if (bar) bar->finish();
  if (was_training) model.train();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

std::map<std::string, InputSquares> collect_input_squares(models::CausalLM& model, const at::Tensor& tokens,
                                                          int64_t batch_size, bool progress, const PtqLayerHooks& hooks) {
  QF_CHECK(tokens.dim() == 2 && tokens.size(0) > 0, "imatrix: calibration tokens must be [chunks, ctx], got ",
           tokens.sizes());
  at::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  std::map<std::string, InputSquares> out;
  LayerDriver driver(model, tokens, batch_size);
  std::optional<core::ProgressBar> bar;
  if (progress) bar.emplace("imatrix", model.cfg.n_layers, 0, "layer");
  const QatConfig none;  // no rules: every linear of the layer is captured, none is quantized
  for (int64_t i = 0; i < model.cfg.n_layers; ++i) {
    if (hooks.before) hooks.before(i);
    auto lls = layer_linears(model, i, none);
    std::vector<LayerLinear*> all;
    for (auto& l : lls) all.push_back(&l);
    auto caps = driver.capture(i, all, false, true);
    for (size_t k = 0; k < all.size(); ++k) out[all[k]->full] = caps[k]->squares();
    driver.advance(i);
    if (bar) bar->update(i + 1);
  }
  if (bar) bar->finish();
  if (was_training) model.train();
  return out;
}

namespace {
// GPTQ's exact codes into linear `name`'s converted module.
void apply_packed_one(const std::string& name, models::LinearBase& m, const PackedStorage& p) {
  at::NoGradGuard ng;
  auto* ql = dynamic_cast<QuantizedLinear*>(&m);
  QF_CHECK(ql, "apply_packed: ", name, " was quantized by GPTQ but is not a converted QuantizedLinear");
  QF_CHECK(p.qweight.sizes() == ql->qweight.sizes(), "apply_packed: ", name, " packed shape ", p.qweight.sizes(), " != ",
           ql->qweight.sizes());
  ql->qweight.copy_(p.qweight);
  if (p.scales.defined()) ql->scales.copy_(p.scales), ql->zeros.copy_(p.zeros);
  if (p.g_idx.defined()) ql->set_g_idx(p.g_idx);
}
}  // namespace

int64_t convert_layer(models::CausalLM& model, int64_t i, const QatConfig& q, PtqResult& r) {
  int64_t n = 0;
  for (auto& l : layer_linears(model, i, q)) {
    if (!l.rule || !l.dense) continue;
    // What prepare puts in the slot, then what convert puts in its place.
    auto fq = std::make_shared<FakeQuantLinear>(*l.dense, *l.rule, q.observer);
    auto ql = QuantizedLinear::from_fake_quant(*fq);
    if (auto it = r.packed.find(l.full); it != r.packed.end()) {
      apply_packed_one(l.full, *ql, it->second);
      r.packed.erase(it);
    }
    l.slot->replace(ql);
    ++n;
  }
  return n;
}

void apply_packed(torch::nn::Module& model, const PtqResult& r) {
  int64_t n = 0;
  for (auto& ns : models::linear_slots(model)) {
    auto it = r.packed.find(ns.name);
    if (it == r.packed.end()) continue;
    apply_packed_one(ns.name, *ns.slot->get(), it->second);
    ++n;
  }
  QF_CHECK(n == static_cast<int64_t>(r.packed.size()), "apply_packed: ", r.packed.size() - n,
           " GPTQ layers have no converted counterpart");
}

int64_t seed_learned_scales(torch::nn::Module& model, const PtqResult& r) {
  at::NoGradGuard ng;
  int64_t n = 0;
  for (auto& ns : models::linear_slots(model)) {
    auto it = r.packed.find(ns.name);
    auto f = std::dynamic_pointer_cast<FakeQuantLinear>(ns.slot->get());
    if (it == r.packed.end() || !f || !f->weight_fq->scale.defined() || !it->second.scales.defined() ||
        it->second.g_idx.defined())
      continue;
    f->weight_fq->scale.copy_(it->second.scales.to(f->weight_fq->scale.options()));
    ++n;
  }
  return n;
}

}  // namespace qf::quant
