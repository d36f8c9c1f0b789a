#include "quant/fake_quant.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>

#include "core/error.h"
#include "models/checkpoint.h"
#include "quant/ggml_blocks.h"

namespace qf::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Forward = precomputed fake-quant values (exact); backward = upstream * mask (undefined mask = all).
// Forward = precomputed fake-quant values (exact); backward = upstream * mask, or the identity when
// `mask` is undefined. Autograd inputs must be defined tensors, so the mask rides in saved_data.
struct SteFn : torch::autograd::Function<SteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fq) {
    return fq;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto it = ctx->saved_data.find("mask");
    at::Tensor gx = it != ctx->saved_data.end() ? g[0] * it->second.toTensor().to(g[0].scalar_type()) : g[0];
    return {gx, at::Tensor()};
  }
};
struct SteMaskFn : torch::autograd::Function<SteMaskFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fq, const at::Tensor& mask) {
    ctx->saved_data["mask"] = mask;
    return fq;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {g[0] * ctx->saved_data["mask"].toTensor().to(g[0].scalar_type()), at::Tensor(), at::Tensor()};
  }
};
at::Tensor ste(const at::Tensor& x, const at::Tensor& fq, const at::Tensor& mask) {
  return mask.defined() ? SteMaskFn::apply(x, fq, mask) : SteFn::apply(x, fq);
}

struct LsqFn : torch::autograd::Function<LsqFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& beta,
                            int64_t qmin, int64_t qmax, int64_t block) {
    auto xs = x.reshape({scale.size(0), scale.size(1), -1});
    auto s = scale.unsqueeze(-1);
    auto b = beta.unsqueeze(-1);
    auto v = (xs - b) / s;
    auto r = at::round(v);
    auto q = at::clamp(r, (double)qmin, (double)qmax);
    auto inside = (v >= (double)qmin) & (v <= (double)qmax);
    ctx->save_for_backward({v, r, inside});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["block"] = block < 0 ? -block : block;
    ctx->saved_data["has_beta"] = block > 0;
    return (q * s + b).reshape(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto sv = ctx->get_saved_variables();
    auto v = sv[0], r = sv[1], inside = sv[2];
    const double qmin = (double)ctx->saved_data["qmin"].toInt(), qmax = (double)ctx->saved_data["qmax"].toInt();
    const int64_t block = ctx->saved_data["block"].toInt();
    auto gy = g[0].reshape(v.sizes());
    const double gscale = 1.0 / std::sqrt((double)block * std::max(1.0, qmax));
    auto gx = (gy * inside.to(gy.scalar_type())).reshape(g[0].sizes());
    auto ds_elem = at::where(inside, r - v, at::where(v < qmin, at::full_like(v, qmin), at::full_like(v, qmax)));
    auto gs = (gy * ds_elem).sum(-1) * gscale;
    at::Tensor gb;
    if (ctx->saved_data["has_beta"].toBool()) gb = (gy * at::logical_not(inside).to(gy.scalar_type())).sum(-1) * gscale;
    return {gx, gs, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor fake_quant_values(const at::Tensor& x, const QuantSpec& spec) {
  if (spec.is_ggml()) {
    auto w = x.reshape({-1, x.size(-1)}).to(at::kFloat);
    return ggml::fake_quant(w, spec.rule).reshape(x.sizes()).to(x.scalar_type());
  }
  if (spec.kind == Kind::Fp8E4M3 || spec.kind == Kind::Fp8E5M2) return fake_quant_fp8(x, spec);
  QF_CHECK(spec.kind == Kind::Int, "fake quant of ", spec.describe(), " is not supported here");
  return fake_quant_affine(x, choose_qparams(x, spec), spec).first;
}

at::Tensor fake_quant_ste(const at::Tensor& x, const QuantSpec& spec) {
  at::Tensor fq, mask;
  {
    at::NoGradGuard ng;
    if (spec.kind == Kind::Int && !spec.is_ggml()) {
      auto r = fake_quant_affine(x.detach(), choose_qparams(x.detach(), spec), spec);
      fq = r.first;
      mask = r.second;
    } else {
      fq = fake_quant_values(x.detach(), spec);  // ggml blocks and fp8 saturate nothing away: identity STE
    }
  }
  return ste(x, fq, mask);
}

at::Tensor lsq_fake_quant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& beta, int64_t qmin,
                          int64_t qmax, int64_t block) {
  if (beta.defined()) return LsqFn::apply(x, scale, beta, qmin, qmax, block);
  return LsqFn::apply(x, scale, at::zeros_like(scale.detach()), qmin, qmax, -block);  // -block: no offset gradient
}

const cfg::Names<ObserverType>& observer_type_names() {
  static const cfg::Names<ObserverType> n{{"dynamic", ObserverType::Dynamic},
                                          {"minmax", ObserverType::MinMax},
                                          {"moving-average", ObserverType::MovingAverage},
                                          {"mse", ObserverType::Mse},
                                          {"percentile", ObserverType::Percentile}};
  return n;
}

YAML::Node ObserverConfig::to_yaml() const {
  YAML::Node n;
  n["type"] = cfg::name_of(observer_type_names(), type);
  n["averaging_constant"] = averaging_constant;
  n["percentile"] = percentile;
  n["freeze_after"] = freeze_after;
  return n;
}

ObserverConfig ObserverConfig::from_config(cfg::Reader& r) {
  ObserverConfig o;
  o.type = r.choice<ObserverType>("type", o.type, observer_type_names());
  o.averaging_constant = r.f64("averaging_constant", o.averaging_constant, 1e-6, 1.0);
  o.percentile = r.f64("percentile", o.percentile, 50.0, 100.0);
  o.freeze_after = r.i64("freeze_after", o.freeze_after, 0, 1LL << 40);
  r.finish();
  return o;
}

namespace {
StatSync& observer_sync() {
  static StatSync f;
  return f;
}
}  // namespace
void set_observer_sync(StatSync f) { observer_sync() = std::move(f); }

FakeQuantizer::FakeQuantizer(QuantSpec spec, ObserverConfig obs, bool is_activation)
    : spec_(std::move(spec)), obs_(obs), is_activation_(is_activation) {
  QF_CHECK(!(is_activation && spec_.learn != Learn::None),
           "learned (LSQ) activation scales are not supported; use a dynamic or observed activation spec");
  bool static_obs = obs_.type != ObserverType::Dynamic && !spec_.is_ggml() && spec_.kind == Kind::Int;
  if (static_obs && is_activation_) {
    QF_CHECK(spec_.granularity == Granularity::PerTensor,
             "observed (static) activation quantization is per-tensor; per-token is dynamic by definition");
    obs_min = register_buffer("obs_min", at::zeros({1, 1}));
    obs_max = register_buffer("obs_max", at::zeros({1, 1}));
    obs_n = register_buffer("obs_n", at::zeros({}, at::kLong));
  }
}

void FakeQuantizer::set_step(int64_t step, int64_t enable_after) {
  enabled_ = step >= enable_after;
  frozen_ = obs_.freeze_after > 0 && step >= obs_.freeze_after;
}

// qparams from per-block (min, max) statistics, through the same arithmetic as choose_qparams:
// a [rows, n_blocks * 2] tensor holding (min, max) pairs quantized per group of 2.
static QParams qparams_from_minmax(const at::Tensor& mn, const at::Tensor& mx, const QuantSpec& spec) {
  auto pairs = at::stack({mn, mx}, -1).reshape({mn.size(0), mn.size(1) * 2});
  QuantSpec s = spec;
  s.granularity = Granularity::PerGroup;
  s.group_size = 2;
  return choose_qparams(pairs, s);
}

void FakeQuantizer::observe(const at::Tensor& x) {
  if (frozen_ || obs_.type == ObserverType::Dynamic || spec_.is_ggml()) return;
  // A checkpointed layer's recompute sees the same input again: the first forward observed it.
  if (models::recomputing() && obs_min.defined()) return;
  at::NoGradGuard ng;
  auto shp = blocks_of(x, spec_);
  auto xb = x.detach().to(at::kFloat).reshape({shp[0], shp[1], shp[2]});
  at::Tensor mn, mx;
  if (obs_.type == ObserverType::Percentile) {
    double p = obs_.percentile / 100.0;
    mx = at::quantile(xb, p, -1);
    mn = at::quantile(xb, 1.0 - p, -1);
  } else if (obs_.type == ObserverType::Mse) {
    auto lo = std::get<0>(xb.min(-1)), hi = std::get<0>(xb.max(-1));
    at::Tensor best_err;
    for (int i = 0; i < 20; ++i) {
      double a = 1.0 - 0.025 * i;  // clip ratios 1.0 .. 0.525
      auto qp = qparams_from_minmax(lo * a, hi * a, spec_);
      auto fq = fake_quant_affine(xb.reshape(x.sizes()), qp, spec_).first.reshape(xb.sizes());
      auto err = (fq - xb).pow(2).sum(-1);
      if (!best_err.defined()) {
        best_err = err, mn = lo * a, mx = hi * a;
      } else {
        auto better = err < best_err;
        best_err = at::where(better, err, best_err);
        mn = at::where(better, lo * a, mn);
        mx = at::where(better, hi * a, mx);
      }
    }
  } else {
    mn = std::get<0>(xb.min(-1));
    mx = std::get<0>(xb.max(-1));
  }
  if (is_activation_ && observer_sync())
    observer_sync()(mn, mx, obs_.type == ObserverType::MinMax || obs_.type == ObserverType::MovingAverage);
  if (!obs_min.defined()) {
    obs_min = register_buffer("obs_min", mn.clone());
    obs_max = register_buffer("obs_max", mx.clone());
    obs_n = register_buffer("obs_n", at::ones({}, at::kLong));
    return;
  }
  QF_CHECK(obs_min.sizes() == mn.sizes(), "observer statistics of shape ", obs_min.sizes(), " cannot take a tensor with blocks ",
           mn.sizes());
  if (obs_n.item<int64_t>() == 0 || obs_.type == ObserverType::Mse || obs_.type == ObserverType::Percentile) {
    obs_min.copy_(mn);
    obs_max.copy_(mx);
  } else if (obs_.type == ObserverType::MovingAverage) {
    const double c = obs_.averaging_constant;
    obs_min.mul_(1 - c).add_(mn, c);
    obs_max.mul_(1 - c).add_(mx, c);
  } else {
    obs_min.copy_(at::minimum(obs_min, mn));
    obs_max.copy_(at::maximum(obs_max, mx));
  }
  obs_n.add_(1);
}

void FakeQuantizer::initialize(const at::Tensor& x) {
  if (obs_.type != ObserverType::Dynamic && !spec_.is_ggml() && spec_.kind == Kind::Int && !obs_min.defined()) observe(x);
  if (spec_.learn == Learn::None || scale.defined()) return;
  at::NoGradGuard ng;
  auto qp = choose_qparams(x.detach().to(at::kFloat), spec_);
  scale = register_parameter("scale", qp.scale.clone().clamp_min(1e-9));
  // LSQ+: y = q * s + beta. The asymmetric affine (torchao FLOAT domain) dequant is
  // (q - mid) * s + zp with mid = 2^(b-1), so beta starts at zp - mid * s.
  if (spec_.learn == Learn::LsqPlus)
    beta = register_parameter("beta", (qp.zero_point - static_cast<double>(int64_t(1) << (spec_.bits - 1)) * qp.scale).clone());
}

QParams FakeQuantizer::qparams_for(const at::Tensor& x) {
  if (scale.defined()) {
    QParams qp;
    qp.scale = scale.detach();
    // LSQ+: y = clamp(round((x - beta)/s)) * s + beta; convert quantizes with that same formula and
    // stores beta as a float offset, so the zero point here is informational (beta + mid * s).
    qp.zero_point = beta.defined() ? (beta.detach() + static_cast<double>(int64_t(1) << (spec_.bits - 1)) * scale.detach())
                                   : at::zeros_like(qp.scale);
    return qp;
  }
  if (obs_min.defined() && obs_.type != ObserverType::Dynamic && obs_n.item<int64_t>() > 0)
    return qparams_from_minmax(obs_min, obs_max, spec_);
  return choose_qparams(x.detach(), spec_);
}

at::Tensor FakeQuantizer::forward(const at::Tensor& x) {
  if (!enabled_) return x;
  if (spec_.learn != Learn::None) {
    initialize(x);
    auto shp = blocks_of(x, spec_);
    QF_CHECK(scale.size(0) == shp[0] && scale.size(1) == shp[1], "learned scale shape ", scale.sizes(),
             " does not match the tensor's blocks [", shp[0], ", ", shp[1], "]");
    return lsq_fake_quant(x, scale, beta, spec_.qmin(), spec_.qmax(), shp[2]);
  }
  if (obs_.type != ObserverType::Dynamic && !spec_.is_ggml() && spec_.kind == Kind::Int) {
    if (is_training() || !obs_min.defined() || obs_n.item<int64_t>() == 0) observe(x);
    at::Tensor fq, mask;
    {
      at::NoGradGuard ng;
      auto r = fake_quant_affine(x.detach(), qparams_for(x), spec_);
      fq = r.first;
      mask = r.second;
    }
    return ste(x, fq, mask);
  }
  return fake_quant_ste(x, spec_);
}

void FakeQuantizer::pretty_print(std::ostream& s) const {
  s << "FakeQuantizer(" << spec_.describe() << (is_activation_ ? ", activation" : ", weight") << ")";
}

}  // namespace qf::quant
