#include "quant/gptq.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "quant/affine.h"
#include "quant/ggml_blocks.h"

namespace qf::quant {

GptqConfig GptqConfig::from_config(cfg::Reader& r) {
  GptqConfig c;
  c.damp = r.f64("damp", c.damp, 0.0, 10.0);
  c.block_size = r.i64("block_size", c.block_size, 1, 1 << 20);
  c.act_order = r.boolean("act_order", c.act_order);
  // A recipe's GPTQ is a QAT start: static groups put GPTQ's grid where fake quant finds it again.
  c.static_groups = r.boolean("static_groups", true);
  c.true_sequential = r.boolean("true_sequential", c.true_sequential);
  r.finish();
  return c;
}

YAML::Node GptqConfig::to_yaml() const {
  YAML::Node n;
  n["damp"] = damp;
  n["block_size"] = block_size;
  n["act_order"] = act_order;
  n["static_groups"] = static_groups;
  n["true_sequential"] = true_sequential;
  return n;
}

std::string gptq_unsupported(const QuantSpec& s) {
  if (s.is_ggml())
    return ggml::is_simple(s.rule) ? ""
                                   : s.preset + "'s 256-element super-blocks fit their sub-block scales jointly, so "
                                                "GPTQ cannot quantize them column by column; use q4_0/q4_1/q5_0/q5_1/q8_0, "
                                                "an int preset, or --method awq";
  if (s.kind != Kind::Int) return s.describe() + " is not an integer format (GPTQ quantizes to integer grids)";
  if (s.learn != Learn::None) return "learned scales (LSQ) are trained by QAT, not set by GPTQ; drop `learn`";
  if (s.granularity == Granularity::PerTensor) return "per-tensor weights cannot be packed; use per-channel or per-group";
  return "";
}

namespace {

// Quantizes one column at a time with parameters fitted per group of columns.
class ColumnQuantizer {
 public:
  virtual ~ColumnQuantizer() = default;
  // Parameters of group g from its columns wg [rows, group].
  virtual void fit(int64_t g, const at::Tensor& wg) = 0;
  // Column [rows] -> (dequantized float32 [rows], codes int32 [rows]) under group g's parameters.
  virtual std::pair<at::Tensor, at::Tensor> quant(int64_t g, const at::Tensor& col) = 0;
  // Codes [rows, cols] in storage order -> QuantizedLinear's packed storage.
  virtual PackedStorage pack(const at::Tensor& codes) = 0;
  // Grid step (distance between neighbouring levels) per row and group: float32 [rows, groups].
  virtual at::Tensor steps() = 0;
};

// torchao-exact affine integers (quant/affine.h): a group's qparams come from choose_qparams on
// its columns; a column is quantized with the same formulas viewed as a width-1 channel.
class AffineColumns : public ColumnQuantizer {
 public:
  AffineColumns(const QuantSpec& s, int64_t groups) : spec_(s), col_(s), qp_(static_cast<size_t>(groups)) {
    col_.granularity = Granularity::PerChannel;
    col_.group_size = 0;
  }
  void fit(int64_t g, const at::Tensor& wg) override {
    auto fit_spec = spec_;
    if (fit_spec.granularity == Granularity::PerGroup) fit_spec.group_size = wg.size(1);
    qp_[g] = choose_qparams(wg.contiguous(), fit_spec);
  }
  std::pair<at::Tensor, at::Tensor> quant(int64_t g, const at::Tensor& col) override {
    auto x = col.reshape({-1, 1}).contiguous();
    auto codes = quantize_affine(x, qp_[g], col_);
    auto dq = dequantize_affine(codes, qp_[g], col_, at::kFloat);
    return {dq.reshape({-1}), codes.reshape({-1}).to(at::kInt)};
  }
  PackedStorage pack(const at::Tensor& codes) override {
    std::vector<at::Tensor> s, z;
    for (auto& q : qp_) s.push_back(q.scale), z.push_back(q.zero_point);
    PackedStorage p;
    p.qweight = pack_codes(codes, spec_);
    p.scales = at::cat(s, 1).to(scale_type(spec_));
    p.zeros = at::cat(z, 1).to(at::kFloat);
    return p;
  }
  at::Tensor steps() override {
    std::vector<at::Tensor> s;
    for (auto& q : qp_) s.push_back(q.scale.to(at::kFloat));
    return at::cat(s, 1);
  }

 private:
  QuantSpec spec_, col_;
  std::vector<QParams> qp_;
};

// llama.cpp's q8_0/q4_0/q4_1/q5_0/q5_1 (quantize_row_*_ref): per 32-block d (and min), the
// reciprocal taken in float32 before d is rounded to fp16, codes by truncation (roundf for q8_0).
class GgmlColumns : public ColumnQuantizer {
 public:
  GgmlColumns(Rule r, int64_t groups) : r_(r), d_(groups), id_(groups), min_(groups) {}
  void fit(int64_t g, const at::Tensor& wg) override {
    at::Tensor d, mn;
    switch (r_) {
      case Rule::GgmlQ8_0: d = wg.abs().amax(1) / 127.0; break;
      case Rule::GgmlQ4_0:
      case Rule::GgmlQ5_0: {
        // the signed value of the first element with the largest |x|
        auto idx = wg.abs().argmax(1, /*keepdim=*/true);
        d = wg.gather(1, idx).squeeze(1) / (r_ == Rule::GgmlQ4_0 ? -8.0 : -16.0);
        break;
      }
      default:
        mn = wg.amin(1);
        d = (wg.amax(1) - mn) / (r_ == Rule::GgmlQ4_1 ? 15.0 : 31.0);
    }
    id_[g] = at::where(d != 0, d.reciprocal(), at::zeros_like(d));
    d_[g] = d.to(at::kHalf);
    if (mn.defined()) min_[g] = mn;
  }
  std::pair<at::Tensor, at::Tensor> quant(int64_t g, const at::Tensor& col) override {
    const auto dh = d_[g].to(at::kFloat);
    at::Tensor code, dq;
    switch (r_) {
      case Rule::GgmlQ8_0: {
        // roundf: half away from zero (v - trunc(v) is exact)
        auto v = col * id_[g];
        auto t = at::trunc(v);
        code = (t + at::where((v - t).abs() >= 0.5, at::sign(v), at::zeros_like(v))).clamp(-128, 127);
        dq = code * dh;
        break;
      }
      case Rule::GgmlQ4_0:
      case Rule::GgmlQ5_0: {
        const double off = r_ == Rule::GgmlQ4_0 ? 8.0 : 16.0, top = r_ == Rule::GgmlQ4_0 ? 15.0 : 31.0;
        code = at::trunc(col * id_[g] + (off + 0.5)).clamp(0, top);
        dq = (code - off) * dh;
        break;
      }
      default: {
        const double top = r_ == Rule::GgmlQ4_1 ? 15.0 : 31.0;
        code = at::trunc((col - min_[g]) * id_[g] + 0.5).clamp(0, top);
        dq = code * dh + min_[g].to(at::kHalf).to(at::kFloat);
      }
    }
    return {dq, code.to(at::kInt)};
  }
  PackedStorage pack(const at::Tensor& codes) override {
    PackedStorage p;
    auto m = min_[0].defined() ? at::stack(min_, 1) : at::Tensor();
    p.qweight = ggml::pack_simple(r_, codes, at::stack(d_, 1), m);
    return p;
  }
  at::Tensor steps() override { return at::stack(d_, 1).to(at::kFloat).abs(); }

 private:
  Rule r_;
  std::vector<at::Tensor> d_, id_, min_;
};

// The upper Cholesky factor of (H + damp * mean(diag H) I)^-1, escalating the dampening x10 (up to
// four times, logged) while H + damp is not positive definite. Returns the factor and the damp used.
std::pair<at::Tensor, double> inverse_hessian_factor(const at::Tensor& H, double damp, const std::string& name) {
  const double mean_diag = H.diagonal().mean().item<double>();
  for (int attempt = 0;; ++attempt) {
    auto Hd = H.clone();
    Hd.diagonal().add_(damp * mean_diag);
    auto [L, info] = at::linalg_cholesky_ex(Hd);
    if (info.item<int64_t>() == 0) {
      auto [U, info2] = at::linalg_cholesky_ex(at::cholesky_inverse(L), /*upper=*/true);
      if (info2.item<int64_t>() == 0 && at::isfinite(U).all().item<bool>()) return {U, damp};
    }
    QF_CHECK(attempt < 4, "gptq: the Hessian of ", name, " is not positive definite even with dampening ", damp,
             " x its mean diagonal (", mean_diag, "); the layer's calibration inputs are degenerate (constant, or fewer "
             "distinct tokens than its ", H.size(0), " inputs): use more calibration samples or a larger gptq.damp");
    log::warn("gptq: ", name, ": H + ", damp, " x mean(diag) is not positive definite; retrying with dampening ", damp * 10);
    damp *= 10;
  }
}

// QAT's starting weights (QuantizedWeight::latent): the original weights w0 moved just inside the
// rounding bin of GPTQ's choice Q (`step`: each element's grid step).
at::Tensor latent_weights(const at::Tensor& w0, const at::Tensor& Q, const at::Tensor& step, const QuantSpec& spec) {
  const int64_t rows = w0.size(0), cols = w0.size(1);
  auto latent = Q + at::max(at::min(w0 - Q, 0.499 * step), -0.499 * step);
  // Fake quant recomputes each block's grid from its extremes (max |w|, or min and max): those
  // elements keep their original values, so the grid stays the one rounding the original weights
  // finds (GPTQ's, with static groups); everything else lies between them.
  const int64_t blk = spec.block(cols);
  auto wb = w0.reshape({rows, cols / blk, blk}), lb = latent.view({rows, cols / blk, blk});
  // spec.symmetric holds for the ggml presets too: q8_0/q4_0/q5_0 are scale-only, q4_1/q5_1 carry a min.
  auto pin = spec.symmetric ? wb.abs() == wb.abs().amax(-1, true) : (wb == wb.amax(-1, true)) | (wb == wb.amin(-1, true));
  lb.copy_(at::where(pin, wb, lb));
  return latent;
}

}  // namespace

double output_error(const at::Tensor& W, const at::Tensor& Wq, const at::Tensor& H) {
  at::NoGradGuard ng;
  auto w = W.to(at::kDouble), dw = Wq.to(at::kDouble) - w, h = H.to(at::kDouble);
  const double den = (at::matmul(w, h) * w).sum().item<double>();
  const double num = (at::matmul(dw, h) * dw).sum().item<double>();
  return den > 0 ? num / den : 0.0;
}

QuantizedWeight gptq_quantize(const at::Tensor& W0, const at::Tensor& H0, const QuantSpec& spec, const GptqConfig& cfg,
                              const std::string& name) {
  at::NoGradGuard no_grad;
  auto why = gptq_unsupported(spec);
  QF_CHECK(why.empty(), "gptq: cannot quantize ", name, " to ", spec.describe(), ": ", why);
  auto W = W0.detach().to(at::kCPU, at::kFloat).clone();
  auto H = H0.detach().to(at::kCPU, at::kFloat).clone();
  const int64_t rows = W.size(0), cols = W.size(1);
  QF_CHECK(H.dim() == 2 && H.size(0) == cols && H.size(1) == cols, "gptq: Hessian of ", name, " is ", H.sizes(),
           ", expected [", cols, ", ", cols, "]");
  const int64_t gs = spec.block(cols);  // llama.cpp presets: their 32-element block
  QF_CHECK(cols % gs == 0, "gptq: group size ", gs, " does not divide the input width ", cols, " of ", name);
  const int64_t ng = cols / gs;
  std::unique_ptr<ColumnQuantizer> cq;
  if (spec.is_ggml())
    cq = std::make_unique<GgmlColumns>(spec.rule, ng);
  else
    cq = std::make_unique<AffineColumns>(spec, ng);

  // Inputs that are always zero carry no information: their weights become 0.
  auto dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1.0);
  W.masked_fill_(dead.unsqueeze(0).expand_as(W), 0.0);
  // llama.cpp blocks are contiguous 32-column groups: with act-order their parameters are fixed
  // up front (static groups). Affine specs without static groups take their groups in processing
  // order and record each column's group (g_idx), as GPTQ's desc_act does.
  const bool fixed = cfg.static_groups || (cfg.act_order && spec.is_ggml());
  const bool with_g_idx = cfg.act_order && !fixed;
  auto g_idx = at::zeros({cols}, at::kInt);
  int32_t* gp = g_idx.data_ptr<int32_t>();
  if (fixed)
    for (int64_t g = 0; g < ng; ++g) cq->fit(g, W.slice(1, g * gs, (g + 1) * gs));
  at::Tensor perm;
  if (cfg.act_order) {
    perm = at::argsort(H.diagonal(), /*stable=*/true, 0, /*descending=*/true);
    W = W.index_select(1, perm);
    H = H.index_select(0, perm).index_select(1, perm);
  } else {
    perm = at::arange(cols, at::kLong);
  }
  const auto order = std::vector<int64_t>(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + cols);

  const auto [U, damp] = inverse_hessian_factor(H, cfg.damp, name);

  auto Q = at::zeros_like(W);
  auto codes = at::zeros({rows, cols}, at::kInt);
  // The column loop is thousands of small ops: OpenMP fork/join per op cost ~10x the work (measured:
  // 80% of the time spinning in libgomp), so it runs on one thread.
  struct OneThread {
    int prev = at::get_num_threads();
    OneThread() { at::set_num_threads(1); }
    ~OneThread() { at::set_num_threads(prev); }
  } one_thread;
  auto diag = U.diagonal().contiguous();
  const float* dptr = diag.data_ptr<float>();
  for (int64_t i1 = 0; i1 < cols; i1 += cfg.block_size) {
    const int64_t i2 = std::min(i1 + cfg.block_size, cols), n = i2 - i1;
    auto W1 = W.slice(1, i1, i2).clone();
    auto Err1 = at::zeros_like(W1);
    auto U1 = U.slice(0, i1, i2).slice(1, i1, i2);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = i1 + i, col = order[j];
      int64_t g;
      if (fixed) {
        g = col / gs;
      } else {
        g = j / gs;
        // As the reference does: the group's parameters from the weights as updated up to this block.
        if (j % gs == 0) cq->fit(g, W.slice(1, j, j + gs));
      }
      auto w = W1.select(1, i).contiguous();
      gp[col] = static_cast<int32_t>(g);
      auto [dq, c] = cq->quant(g, w);
      Q.select(1, j).copy_(dq);
      codes.select(1, col).copy_(c);
      auto err = (w - dq) / static_cast<double>(dptr[j]);
      W1.slice(1, i, n).sub_(err.unsqueeze(1) * U1.select(0, i).slice(0, i, n).unsqueeze(0));
      Err1.select(1, i).copy_(err);
    }
    if (i2 < cols) W.slice(1, i2, cols).sub_(at::matmul(Err1, U.slice(0, i1, i2).slice(1, i2, cols)));
  }
  if (cfg.act_order) Q = Q.index_select(1, at::argsort(perm));

  QuantizedWeight out;
  out.weight = Q;
  out.packed = cq->pack(codes);
  if (with_g_idx) out.packed.g_idx = g_idx;
  out.latent = latent_weights(W0.detach().to(at::kCPU, at::kFloat), Q, cq->steps().index_select(1, g_idx.to(at::kLong)), spec);
  out.damp = damp;
  // The packed form must dequantize to exactly what GPTQ chose (what the next layer was fed).
  QF_CHECK(at::equal(unpack_weight(out.packed, spec, rows, cols), Q), "gptq: internal error: packed weights of ", name,
           " do not reproduce the quantized weights");
  return out;
}

}  // namespace qf::quant
