// Affine integer and FP8 fake quantization, replicating torchao 0.18 op for op (same ops, same
// dtypes, same order), so that the results are bit-identical on the same device. The torchao code
// each function mirrors is named next to it. Checked live against torchao by
// tests/interop/test_torchao_fake_quant.py.
//
// QuantSpec -> torchao IntxFakeQuantizeConfig (the torchao config the numbers equal):
//   symmetric,  bits b  -> dtype torch.int<b>  (bounds [-2^(b-1), 2^(b-1)-1] == QuantSpec::qmin/qmax),
//                          zero_point_domain INT, zero_point_precision int32 (the defaults)
//   asymmetric, bits b  -> dtype torch.uint<b> (bounds [0, 2^b-1] == QuantSpec::qmin/qmax)
//     per-group / per-channel: zero_point_domain FLOAT, zero_point_precision = scale_precision.
//       IntxFakeQuantizer always computes asymmetric per-group qparams with
//       get_groupwise_affine_qparams, whose default is the tinygemm FLOAT-domain zero point
//       (zp = min + scale * 2^(b-1), not an integer). This is exactly torchao's own asymmetric
//       4-bit QAT config (qat/linear.py _get_4w_weight_config). With torchao's default
//       zero_point_domain=INT / zero_point_precision=int32, that float zero point is truncated
//       to int32 and used as an integer offset (usually 0), which clips or shifts the range
//       (max error 6-16x that of the FLOAT domain on N(0, 0.05) weights) -- a torchao quirk we
//       do not reproduce.
//       DEVIATION from affine.h's comment "zero_point: float32 holding integers": for these
//       specs QParams::zero_point holds the float-domain zero point (rounded through the scale
//       dtype), and quantize/dequantize use torchao's FLOAT-domain formulas
//         q = clamp(round((x - (zp - scale*mid)) / scale), qmin, qmax),  x' = (q - mid)*scale + zp,
//       with mid = (qmin + qmax + 1) / 2.
//     per-token: choose_qparams_affine(ASYMMETRIC) -> integer zero point, INT domain (torchao's
//       per-token path). torchao's usual activation config uses torch.int8 ([-128, 127]); we use
//       torch.uint8 ([0, 255] == QuantSpec). Fake-quant outputs and scales are identical either
//       way; codes and zero points differ by exactly 128 (checked in the interop test).
//   granularity: PerChannel == PerAxis(0) on x viewed as [rows, last dim]; PerGroup(g) ==
//     PerGroup(g); PerToken == PerToken; PerTensor (IntxFakeQuantizer has none) == PerAxis(0)
//     applied to x.reshape(1, -1): the whole tensor is one group, with the same symmetric /
//     asymmetric (FLOAT-domain) arithmetic as per-channel (which also keeps quant/fake_quant.cpp's
//     observers, which re-derive qparams from (min, max) pairs as PerGroup(2), consistent). Tensors of rank != 2 are viewed as
//     [prod(leading dims), last dim] (torchao's per-channel/per-group path only takes rank 2).
//   Symmetric per-token (torchao: NotImplementedError) uses the symmetric per-channel arithmetic.
//   scale_dtype F32/F16/BF16 -> scale_precision float32/float16/bfloat16. As in torchao, the
//   scale is computed in the input's dtype, then cast; quantize uses x * (1/scale) with the
//   reciprocal taken in the scale dtype. eps: torchao's defaults (None): finfo(x.dtype).smallest_normal
//   for symmetric and per-token, 1e-6 for the asymmetric per-group path.
//
// DEVIATION (INT domain with fp16 scales: symmetric or per-token specs with scale_dtype F16; no
// preset): torchao multiplies by 1/scale taken in fp16, which is inf when the fp16 scale is below
// ~2^-16 (a group whose amax is under ~1e-4 for int4), and its float32 eps (1.2e-38) underflows to
// a zero fp16 scale for all-zero groups; torchao then returns NaN for the zero elements of such a
// group and +-qmax*scale for the rest. qforge uses the float32 reciprocal of the fp16 scale for
// exactly those groups (0 when the scale is 0, so an all-zero group stays 0). Every group whose
// fp16 reciprocal is finite is bit-identical to torchao.
//
// Input dtype: float32, bfloat16 and float16 inputs go through exactly torchao's ops for that
// input dtype (qparams reduced and divided in the input dtype, the quantize arithmetic promoted
// with the scale dtype) and the output has the input's dtype, so bf16 results also equal torchao's.
//
// Mask: true where the value before clamping (round(x/scale) + zp, or round((x - min_val)/scale)
// for the FLOAT domain) lies in [qmin, qmax]. torchao 0.18's _fake_quantize_per_channel_group
// computes no mask, and _fake_quantize_affine_cachemask tests the value *after* clamping (always
// true); the interop test recomputes the pre-clamp value from torchao's own qparams instead.
//
// INTEGER zero point (Rule::IntZeroPoint, presets int<b>-g<G>-zp; not torchao): AutoAWQ's rule
// (awq/quantize/quantizer.py pseudo_quantize_tensor, zero_point=True), the one its GEMM format, GPTQ
// sym=false and ONNX Runtime's MatMulNBits store. Per block, in float32:
//   scale32 = max(amax - amin, 1e-5) / (2^b - 1);  s = scale32 rounded to the scale dtype (fp16 for
//   the presets); z = clamp(-round(amin / s), 0, 2^b - 1);  q = clamp(round(x / s) + z, 0, 2^b - 1);
//   x' = (q - z) * s, all with round half to even (torch.round).
// Order of operations: z and q are computed with the ROUNDED (shipped) scale s, so (q, z, s) as
// stored reproduce x' exactly. AutoAWQ instead runs the whole rule in the model dtype (its
// _apply_quant casts the linear to fp16: max - min, / 15, amin / s and x / s each round to fp16),
// then WQLinear_GEMM.from_linear re-derives the codes as round((x' + z*s) / s); for a weight whose
// group extremes make (amax - amin) / (2^b-1) an fp16 value both give the same s, z and q (checked
// live in tests/interop/test_awq_export.py); otherwise s can differ by one fp16 ulp and a code by one
// where x / s lies within fp16 rounding of a .5 boundary. GPTQ's find_params (sym=false) differs only
// at the edges: it widens the range to include 0 (xmin <= 0 <= xmax) and maps an all-zero block to
// [-1, 1]; AutoAWQ (and qforge) do not, so an all-positive block gets z = 0 and its values above
// 15 * s clip, and an all-equal block gets s = 1e-5 / 15 (x' = 0 for zeros, else +-(2^b-1) * s).
// The STE mask is true where round(x / s) + z lies in [0, 2^b - 1].
//
// FP8 == torchao Float8FakeQuantizer (PerChannel/PerToken -> PerRow(), PerTensor -> PerTensor):
// scale = amax(|x|) / finfo.max in x's dtype, cast to float32; q = clamp(x_f32 / scale, +-max)
// cast to float8; x' = q_f32 * scale, cast to x's dtype. Extensions (torchao's config rejects
// them): PerGroup(g) uses one scale per group of g; scale_dtype F16/BF16 rounds the scale through
// that dtype. DEVIATION: a block whose amax is 0 gives 0 (torchao divides 0/0 and returns NaN).
#include "quant/affine.h"

#include <ATen/ATen.h>

#include <array>
#include <limits>

#include "core/error.h"

namespace qf::quant {
namespace {

enum class Domain { Int, Float, IntZero };

at::ScalarType to_scalar_type(ScaleDType d) {
  switch (d) {
    case ScaleDType::F32: return at::kFloat;
    case ScaleDType::F16: return at::kHalf;
    case ScaleDType::BF16: return at::kBFloat16;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown ScaleDType");
}

// torch.finfo(dtype).smallest_normal
double smallest_normal(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 6.103515625e-05;
    case at::kDouble: return std::numeric_limits<double>::min();
    default: return std::numeric_limits<float>::min();  // float32 and bfloat16
  }
}

Domain domain_of(const QuantSpec& s) {
  if (s.int_zero_point()) return Domain::IntZero;
  return (!s.symmetric && s.granularity != Granularity::PerToken) ? Domain::Float : Domain::Int;
}

void check_int_spec(const QuantSpec& s, const char* what) {
  QF_CHECK(s.kind == Kind::Int, what, ": ", s.describe(), " is not an integer format");
  QF_CHECK(!s.is_ggml(), what, ": ", s.describe(), " uses llama.cpp block rules; see quant/ggml_blocks.h");
  QF_CHECK(s.bits >= 2 && s.bits <= 8, what, ": bits must be in [2, 8], got ", s.bits);
}

void check_float_input(const at::Tensor& x, const char* what) {
  QF_CHECK(x.defined(), what, ": undefined tensor");
  QF_CHECK(x.dim() >= 1 && x.numel() > 0, what, ": expected a non-empty tensor, got shape ", x.sizes());
  QF_CHECK(at::isFloatingType(x.scalar_type()), what, ": expected a floating-point tensor, got ", x.scalar_type());
}


// torchao quant_primitives: mid_point = (quant_max + quant_min + 1) / 2 (Python true division).
double mid_point(const QuantSpec& s) { return static_cast<double>(s.qmax() + s.qmin() + 1) / 2.0; }

struct Prepared {
  std::array<int64_t, 3> b;
  at::Tensor scale;  // [rows, n_blocks, 1] in the scale dtype
  at::Tensor zp;     // [rows, n_blocks, 1]: int32 (INT domain), the scale dtype (FLOAT) or float32 integers (IntZero)
  Domain domain;
};

Prepared prepare(const at::Tensor& x, const QParams& qp, const QuantSpec& s, const char* what) {
  Prepared p;
  p.b = blocks_of(x, s);
  p.domain = domain_of(s);
  QF_CHECK(qp.scale.defined() && qp.zero_point.defined(), what, ": qparams are undefined");
  const std::vector<int64_t> want{p.b[0], p.b[1]};
  QF_CHECK(qp.scale.sizes() == at::IntArrayRef(want) && qp.zero_point.sizes() == at::IntArrayRef(want), what,
           ": qparams of shape ", qp.scale.sizes(), " / ", qp.zero_point.sizes(), " do not match the blocks [", p.b[0],
           ", ", p.b[1], "] of a tensor of shape ", x.sizes(), " under ", s.describe());
  const auto sdt = to_scalar_type(s.scale_dtype);
  p.scale = qp.scale.to(x.device(), sdt).reshape({p.b[0], p.b[1], 1});
  // IntxFakeQuantizer: zero_point.to(zero_point_precision): int32 (INT) / the scale dtype (FLOAT).
  const auto zdt = p.domain == Domain::Int ? at::kInt : p.domain == Domain::IntZero ? at::kFloat : sdt;
  p.zp = qp.zero_point.to(x.device(), zdt).reshape({p.b[0], p.b[1], 1});
  return p;
}

// torchao _quantize_affine_no_dtype_cast (INT) / _quantize_affine_tinygemm_no_dtype_cast (FLOAT),
// returning the value before the clamp as well. Both are [rows, n_blocks, block].
std::pair<at::Tensor, at::Tensor> quant_core(const at::Tensor& x, const Prepared& p, const QuantSpec& s) {
  auto xv = x.reshape({p.b[0], p.b[1], p.b[2]});
  at::Tensor pre;
  if (p.domain == Domain::IntZero) {
    // round(x / s) + z in float32 (the scale is already a value of its dtype)
    pre = at::round(xv.to(at::kFloat) / p.scale.to(at::kFloat)) + p.zp;
  } else if (p.domain == Domain::Int) {
    // torch.clamp(_Round.apply(input * (1.0 / scale)) + zero_point, quant_min, quant_max);
    // Python's 1.0 / t is t.reciprocal() * 1.0 (torch/_tensor.py __rdiv__), an exact identity.
    auto inv = p.scale.reciprocal();
    auto prod = xv * inv;
    if (p.scale.scalar_type() == at::kHalf) {
      // DEVIATION (fp16 scales only, see the header comment): where torchao's fp16 1/scale is inf
      // use the float32 reciprocal (0 where the fp16 scale underflowed to 0) instead of NaN/saturation.
      auto s32 = p.scale.to(at::kFloat);
      auto inv32 = at::where(s32 > 0, s32.reciprocal(), at::zeros_like(s32));
      prod = at::where(at::isinf(inv), (xv.to(at::kFloat) * inv32).to(prod.scalar_type()), prod);
    }
    pre = at::round(prod) + p.zp;
  } else {
    // min_val = zero_point - scale * mid_point; clamp(round((input - min_val) / scale), qmin, qmax)
    auto min_val = p.zp - p.scale * mid_point(s);
    pre = at::round((xv - min_val) / p.scale);
  }
  auto q = at::clamp(pre, static_cast<double>(s.qmin()), static_cast<double>(s.qmax()));
  return {pre, q};
}

// torchao _dequantize_affine_no_dtype_check (INT) / _dequantize_affine_tinygemm_no_dtype_check (FLOAT).
at::Tensor dequant_core(const at::Tensor& q, const Prepared& p, const QuantSpec& s, at::ScalarType out) {
  auto qv = q.reshape({p.b[0], p.b[1], p.b[2]});
  if (p.domain == Domain::IntZero) {
    // (q - z) * s in float32: q - z is a small integer, so the product is the exact one a runtime's
    // fp32 dequant computes (q and z enter as exact float32 integers).
    auto dq = (qv.to(at::kFloat) - p.zp) * p.scale.to(at::kFloat);
    return dq.to(out);
  }
  if (p.domain == Domain::Int) {
    auto dq = qv.to(out, /*non_blocking=*/false, /*copy=*/true);
    dq = dq - p.zp.to(out);
    dq = dq * p.scale;
    return dq.to(out);
  }
  // Integer codes enter as float32 (int32 - 8.0 is float32 in PyTorch too); the values are small
  // integers, exact in every float dtype, so this equals torchao's float-q path.
  auto qf = at::isFloatingType(qv.scalar_type()) ? qv : qv.to(at::kFloat);
  auto dq = qf - mid_point(s);
  dq = dq.to(out);
  dq.mul_(p.scale);
  dq.add_(p.zp);
  return dq.to(out);
}

}  // namespace

std::array<int64_t, 3> blocks_of(const at::Tensor& x, const QuantSpec& s) {
  const int64_t last = x.size(-1), rows = x.numel() / last;
  switch (s.granularity) {
    case Granularity::PerTensor:
      return {1, 1, x.numel()};
    case Granularity::PerGroup:
      QF_CHECK(s.group_size > 0, "per-group quantization needs a group size > 0, got ", s.group_size);
      QF_CHECK(last % s.group_size == 0, "group size ", s.group_size, " does not divide the last dimension ", last,
               " of a tensor of shape ", x.sizes());
      return {rows, last / s.group_size, s.group_size};
    case Granularity::PerChannel:
    case Granularity::PerToken:
      return {rows, 1, last};
  }
  TORCH_INTERNAL_ASSERT(false, "unknown granularity");
}

QParams choose_qparams(const at::Tensor& x, const QuantSpec& spec) {
  check_int_spec(spec, "choose_qparams");
  check_float_input(x, "choose_qparams");
  const auto b = blocks_of(x, spec);
  const auto sdt = to_scalar_type(spec.scale_dtype);
  const double qmin = static_cast<double>(spec.qmin()), qmax = static_cast<double>(spec.qmax());
  auto xv = x.reshape({b[0], b[1], b[2]});
  auto min_val = at::amin(xv, {-1});
  auto max_val = at::amax(xv, {-1});
  at::Tensor scale, zp;
  if (spec.int_zero_point()) {
    // AutoAWQ pseudo_quantize_tensor (zero_point=True), in float32, then z from the rounded scale.
    QF_CHECK(!spec.symmetric, "choose_qparams: an integer zero point needs an asymmetric spec, got ", spec.describe());
    auto mn = min_val.to(at::kFloat), mx = max_val.to(at::kFloat);
    scale = at::clamp(mx - mn, at::Scalar(1e-5), c10::nullopt) / qmax;
    scale = scale.to(sdt).to(at::kFloat);
    zp = at::clamp(-at::round(mn / scale), qmin, qmax) + 0.0;  // + 0.0: -0 (from -round(0)) -> +0
  } else if (spec.symmetric) {
    // get_group_qparams_symmetric -> choose_qparams_affine(SYMMETRIC), eps = smallest_normal(x.dtype)
    auto min_neg = at::minimum(min_val, at::zeros_like(min_val));
    auto max_pos = at::maximum(max_val, at::zeros_like(max_val));
    max_pos = at::maximum(-min_neg, max_pos);
    scale = max_pos / ((qmax - qmin) / 2.0);
    zp = at::zeros_like(scale);  // full_like(scale, int((qmax + qmin + 1) / 2)) == 0
    scale = at::clamp(scale, at::Scalar(smallest_normal(x.scalar_type())), c10::nullopt);
    scale = scale.to(sdt);
  } else if (spec.granularity == Granularity::PerToken) {
    // IntxFakeQuantizer._per_token_forward -> choose_qparams_affine(ASYMMETRIC), eps = smallest_normal
    auto min_neg = at::minimum(min_val, at::zeros_like(min_val));
    auto max_pos = at::maximum(max_val, at::zeros_like(max_val));
    scale = (max_pos - min_neg) / (qmax - qmin);
    scale = at::clamp(scale, at::Scalar(smallest_normal(x.scalar_type())), c10::nullopt);
    // zero point from the scale before its cast to scale_dtype, as torchao does
    zp = at::rsub(at::round(min_neg / scale), spec.qmin());
    zp = at::clamp(zp, qmin, qmax).to(at::kInt);
    scale = scale.to(sdt);
  } else {
    // get_groupwise_affine_qparams(..., dtype=scale_precision) -> _choose_qparams_affine_tinygemm,
    // eps = 1e-6 (its default when the config's eps is None)
    scale = (max_val - min_val) / (qmax - qmin);
    scale = at::clamp(scale, at::Scalar(1e-6), c10::nullopt);
    zp = min_val + scale * mid_point(spec);
    zp = zp.to(sdt);
    scale = scale.to(sdt);
  }
  return {scale.to(at::kFloat).reshape({b[0], b[1]}), zp.to(at::kFloat).reshape({b[0], b[1]})};
}

at::Tensor quantize_affine(const at::Tensor& x, const QParams& qp, const QuantSpec& spec) {
  check_int_spec(spec, "quantize_affine");
  check_float_input(x, "quantize_affine");
  auto p = prepare(x, qp, spec, "quantize_affine");
  return quant_core(x, p, spec).second.to(at::kInt).reshape(x.sizes());
}

at::Tensor dequantize_affine(const at::Tensor& q, const QParams& qp, const QuantSpec& spec, at::ScalarType out) {
  check_int_spec(spec, "dequantize_affine");
  QF_CHECK(q.defined() && q.numel() > 0, "dequantize_affine: expected non-empty codes");
  QF_CHECK(at::isFloatingType(out), "dequantize_affine: output dtype must be floating point, got ", out);
  auto p = prepare(q, qp, spec, "dequantize_affine");
  return dequant_core(q, p, spec, out).reshape(q.sizes());
}

std::pair<at::Tensor, at::Tensor> fake_quant_affine(const at::Tensor& x, const QParams& qp, const QuantSpec& spec) {
  check_int_spec(spec, "fake_quant_affine");
  check_float_input(x, "fake_quant_affine");
  auto p = prepare(x, qp, spec, "fake_quant_affine");
  auto [pre, q] = quant_core(x, p, spec);
  auto y = dequant_core(q, p, spec, x.scalar_type()).reshape(x.sizes());
  auto mask = at::logical_and(pre >= static_cast<double>(spec.qmin()), pre <= static_cast<double>(spec.qmax()));
  return {y, mask.reshape(x.sizes())};
}

std::pair<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const QuantSpec& spec) {
  QF_CHECK(spec.kind == Kind::Fp8E4M3 || spec.kind == Kind::Fp8E5M2, "fake_quant_fp8: ", spec.describe(),
           " is not an fp8 format");
  check_float_input(x, "fake_quant_fp8");
  const bool e4m3 = spec.kind == Kind::Fp8E4M3;
  const auto f8 = e4m3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  const double max_finite = e4m3 ? 448.0 : 57344.0;  // torch.finfo(float8 dtype).max
  const auto b = blocks_of(x, spec);
  // _choose_scale_float8: max_abs = x.abs().amax(block); scale = max_abs / quant_max; .to(float32)
  auto xv = x.reshape({b[0], b[1], b[2]});
  auto scale = xv.abs().amax({-1}, /*keepdim=*/true) / max_finite;
  scale = scale.to(at::kFloat);
  if (spec.scale_dtype != ScaleDType::F32) scale = scale.to(to_scalar_type(spec.scale_dtype)).to(at::kFloat);
  // DEVIATION: amax == 0 -> divide by 1 (gives 0) instead of torchao's 0/0 = NaN.
  auto divisor = at::where(scale == 0, at::ones_like(scale), scale);
  // _quantize_affine_float8: x.to(float32) / scale, clamp(+-max), .to(float8)
  auto t = (xv.to(at::kFloat) / divisor).clamp(-max_finite, max_finite).to(f8);
  return {t, scale};
}

at::Tensor fake_quant_fp8(const at::Tensor& x, const QuantSpec& spec) {
  auto [t, scale] = quantize_fp8(x, spec);
  // _dequantize_affine_float8: q.to(float32) * scale, .to(output dtype)
  auto y = t.to(at::kFloat) * scale;
  return y.to(x.scalar_type()).reshape(x.sizes());
}

}  // namespace qf::quant
