// LLM.int8 codec and Int8LtLinear. See int8_lt.h for the invariants. The ops mirror bitsandbytes
// 0.50's default backend (backends/default/ops.py: int8_vectorwise_quant, int8_mixed_scaled_mm,
// int8_scaled_mm, int8_mm_dequant, int8_vectorwise_dequant) and autograd/_functions.py MatMul8bitLt,
// one ATen op for each of theirs, so the CPU results are the same floats.
#include "quant/int8_lt.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <ostream>

#include "core/error.h"

namespace qf::quant {

namespace {

// round(a * (127 / absmax[row])) as int8, `a` fp16 [rows, cols], absmax fp32 [rows]. Python's
// `127.0 / t` is t.reciprocal() * 127.0; the fp16 x fp32 product promotes to fp32; round is half to
// even. A zero row makes 0 * inf = NaN there, which bitsandbytes' CPU cast turns into 0: written 0
// here on purpose rather than left to the cast.
at::Tensor rowwise_codes(const at::Tensor& a, const at::Tensor& absmax) {
  auto scaled = at::round(a * (absmax.unsqueeze(-1).reciprocal() * 127.0));
  auto zero_rows = absmax.eq(0);
  if (zero_rows.any().item<bool>()) scaled.masked_fill_(zero_rows.unsqueeze(-1), 0);
  return scaled.to(at::kChar);
}

// CA [rows, in] x CB [out, in]^T exactly in int32.
at::Tensor int8_mm(const at::Tensor& ca, const at::Tensor& cb) {
  const bool int_mm = ca.device().is_cpu() ||
                      (ca.size(0) > 16 && ca.size(1) % 8 == 0 && cb.size(0) % 8 == 0 && ca.size(1) >= 16);
  if (int_mm) return at::_int_mm(ca.contiguous(), cb.t());
  // Outside _int_mm's CUDA shape rules: fp64 holds every int32 sum of int8 products exactly.
  return at::matmul(ca.to(at::kDouble), cb.to(at::kDouble).t()).to(at::kInt);
}

// MatMul8bitLt with a frozen int8 weight: forward as int8_lt_forward, gradient to x only.
struct Int8LtFn : public torch::autograd::Function<Int8LtFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const Int8LtLinear* m) {
    ctx->saved_data["m"] = reinterpret_cast<int64_t>(m);
    ctx->saved_data["shape"] = x.sizes().vec();
    auto b = m->bias.defined() ? m->bias.to(x.scalar_type()) : at::Tensor();
    return int8_lt_forward(x, m->weight, m->scb, b, m->threshold);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto* m = reinterpret_cast<const Int8LtLinear*>(ctx->saved_data["m"].toInt());
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const auto dtype = g[0].scalar_type();
    // bitsandbytes: CB.to(dtype_A).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0)); grad_output.to(dtype_A) @ CB.
    auto w = m->weight.to(dtype).mul_(m->scb.unsqueeze(1).mul(1.0 / 127.0));
    auto go = g[0].reshape({-1, g[0].size(-1)});
    return {at::matmul(go, w).view(shape), at::Tensor()};
  }
};

}  // namespace

Int8Weight int8_quantize(const at::Tensor& w) {
  QF_CHECK(w.dim() == 2 && at::isFloatingType(w.scalar_type()), "int8_quantize: expected a float [out, in] weight, got ",
           w.scalar_type(), " ", w.sizes());
  at::NoGradGuard ng;
  auto h = w.detach().contiguous().to(at::kHalf);  // Int8Params: data.contiguous().to(device, float16)
  auto q = int8_vectorwise_quant(h, 0.0);
  QF_CHECK(at::isfinite(q.absmax).all().item<bool>(),
           "int8_quantize: the [", w.size(0), ", ", w.size(1), "] weight has values beyond float16's range (or NaN); "
           "bitsandbytes' Int8Params casts the weight to float16 before quantizing it");
  return {q.codes, q.absmax};
}

Int8Rows int8_vectorwise_quant(const at::Tensor& a_half, double threshold) {
  TORCH_INTERNAL_ASSERT(a_half.scalar_type() == at::kHalf && a_half.dim() == 2, "int8_vectorwise_quant: fp16 [rows, cols]");
  Int8Rows r;
  at::Tensor a = a_half, abs_a = a_half.abs();
  if (threshold > 0.0) {
    auto outliers = abs_a.ge(threshold);
    r.outlier_cols = at::argwhere(outliers.any(0)).view({-1});
    // bitsandbytes zeroes the outliers (in place, restored afterwards) for the statistics and codes.
    if (r.outlier_cols.numel() > 0) {
      a = a.masked_fill(outliers, 0);
      abs_a.masked_fill_(outliers, 0);
    }
  } else {
    r.outlier_cols = at::empty({0}, a.options().dtype(at::kLong));
  }
  r.absmax = std::get<0>(abs_a.max(1)).to(at::kFloat);
  r.codes = rowwise_codes(a, r.absmax);
  // The outlier columns are computed in float from x; their int8 codes go to 0 in every row.
  if (a.size(0) > 1 && r.outlier_cols.numel() > 0) r.codes.index_fill_(1, r.outlier_cols, 0);
  return r;
}

at::Tensor int8_dequantize(const at::Tensor& cb, const at::Tensor& scb, at::ScalarType dtype) {
  return (cb * scb.view({-1, 1}) * 7.874015718698502e-3).to(dtype);
}

at::Tensor int8_lt_forward(const at::Tensor& x, const at::Tensor& cb, const at::Tensor& scb, const at::Tensor& bias,
                           double threshold) {
  QF_CHECK(x.size(-1) == cb.size(1), "Int8LtLinear: input has ", x.size(-1), " features, the weight expects ", cb.size(1));
  auto out_shape = x.sizes().vec();
  out_shape.back() = cb.size(0);
  if (x.numel() == 0) return at::empty(out_shape, x.options());
  auto a = x.reshape({-1, x.size(-1)});
  auto q = int8_vectorwise_quant(a.to(at::kHalf), threshold);
  // int8_scaled_mm -> int8_mm_dequant: i32 * (row_stats * col_stats) * 6.200124e-05 (+ bias), to x's dtype.
  auto out = int8_mm(q.codes, cb) * (q.absmax.reshape({-1}).unsqueeze(-1) * scb.reshape({-1}).unsqueeze(0)) * 6.200124e-05;
  if (bias.defined()) out.add_(bias);
  out = out.to(x.scalar_type());
  if (q.outlier_cols.numel() > 0) {
    // int8_mixed_scaled_mm: the outlier columns of x in its own dtype times the dequantized weight columns.
    auto sub_a = a.index_select(1, q.outlier_cols);
    auto sub_b = int8_dequantize(cb.index_select(1, q.outlier_cols), scb, x.scalar_type()).t();
    out = out.addmm(sub_a, sub_b);
  }
  // Not a view (the caller may add to it in place, as LoRA does, also as a custom Function's output).
  return at::_unsafe_view(out, out_shape);
}

Int8LtLinear::Int8LtLinear(const at::Tensor& w, const at::Tensor& b, double thr)
    : Int8LtLinear(int8_quantize(w), b, thr) {}

Int8LtLinear::Int8LtLinear(const Int8Weight& w, const at::Tensor& b, double thr)
    : FrozenLinear(w.cb.size(1), w.cb.size(0)), threshold(thr) {
  QF_CHECK(w.cb.dim() == 2 && w.cb.scalar_type() == at::kChar, "Int8LtLinear: CB must be int8 [out, in], got ",
           w.cb.scalar_type(), " ", w.cb.sizes());
  QF_CHECK(w.scb.numel() == w.cb.size(0), "Int8LtLinear: SCB has ", w.scb.numel(), " row scales for ", w.cb.size(0), " rows");
  QF_CHECK(std::isfinite(thr) && thr >= 0, "Int8LtLinear: threshold must be >= 0, got ", thr);
  weight = register_buffer("weight", w.cb.detach().contiguous());
  scb = register_buffer("SCB", w.scb.detach().reshape({-1}).to(at::kFloat).contiguous());
  if (b.defined()) bias = register_buffer("bias", b.detach().clone());
}

at::Tensor Int8LtLinear::forward(const at::Tensor& x) {
  if (!x.requires_grad() || !at::GradMode::is_enabled()) {
    at::NoGradGuard ng;
    return int8_lt_forward(x, weight, scb, bias.defined() ? bias.to(x.scalar_type()) : at::Tensor(), threshold);
  }
  return Int8LtFn::apply(x, this);
}

void Int8LtLinear::pretty_print(std::ostream& s) const {
  s << "qf::Int8LtLinear(in=" << in_features << ", out=" << out_features << ", threshold=" << threshold
    << (bias.defined() ? ", bias" : "") << ")";
}

}  // namespace qf::quant
