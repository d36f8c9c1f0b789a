// quant/affine: fake_quant == dequantize(quantize) bit for bit (every granularity, symmetric and
// asymmetric, scale dtypes, float32/bfloat16 inputs, CPU and -- when present -- CUDA); per-group
// and per-token blocks use only their own elements; hand-computed int4 / asymmetric / per-token /
// fp8 examples (round half to even, [-8, 7] bounds, torchao's FLOAT-domain zero point); the STE
// mask; bf16 inputs; error messages. Parity with torchao itself is tests/interop/test_torchao_fake_quant.py.
#include "quant/affine.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "quant/spec.h"

namespace {

using namespace qf::quant;

QuantSpec int_spec(int bits, bool sym, Granularity g, int64_t group = 0, ScaleDType sd = ScaleDType::F32) {
  QuantSpec s;
  s.bits = bits;
  s.symmetric = sym;
  s.granularity = g;
  s.group_size = group;
  s.scale_dtype = sd;
  return s;
}

QuantSpec int_zero(int bits, Granularity g, int64_t group, ScaleDType sd) {
  auto s = int_spec(bits, false, g, group, sd);
  s.rule = Rule::IntZeroPoint;
  return s;
}

// Bit-for-bit equality (distinguishes -0.0 from +0.0 and compares NaN payloads).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  auto it = a.element_size() == 4 ? at::kInt : at::kShort;
  return at::equal(a.contiguous().view(it).cpu(), b.contiguous().view(it).cpu());
}

at::Tensor f32(std::vector<float> v, std::vector<int64_t> shape) {
  return at::tensor(v, at::kFloat).reshape(shape);
}

std::vector<at::Device> devices() {
  std::vector<at::Device> d{at::kCPU};
  if (at::hasCUDA()) d.emplace_back(at::kCUDA);
  return d;
}

struct Case {
  std::string name;
  QuantSpec spec;
  std::vector<int64_t> shape;
};

std::vector<Case> cases() {
  return {
      {"int4-g32", QuantSpec::preset_named("int4-g32"), {8, 128}},
      {"int4-g128-asym", QuantSpec::preset_named("int4-g128-asym"), {4, 256}},
      {"int4-g128-zp", QuantSpec::preset_named("int4-g128-zp"), {4, 256}},
      {"int3-g16-zp", QuantSpec::preset_named("int3-g16-zp"), {8, 64}},
      {"int8-g32-zp-f32", int_zero(8, Granularity::PerGroup, 32, ScaleDType::F32), {6, 64}},
      {"int4-per-channel-zp", int_zero(4, Granularity::PerChannel, 0, ScaleDType::F16), {7, 34}},
      {"int8-per-channel", QuantSpec::preset_named("int8-per-channel"), {16, 48}},
      {"int8-per-token", QuantSpec::preset_named("int8-per-token"), {2, 5, 64}},
      {"int4-per-channel", int_spec(4, true, Granularity::PerChannel), {7, 33}},
      {"int8-g64", int_spec(8, true, Granularity::PerGroup, 64), {6, 192}},
      {"int4-g32-bf16", int_spec(4, true, Granularity::PerGroup, 32, ScaleDType::BF16), {8, 64}},
      {"int4-g32-f16", int_spec(4, true, Granularity::PerGroup, 32, ScaleDType::F16), {8, 64}},
      {"int3-g16-asym", int_spec(3, false, Granularity::PerGroup, 16), {8, 64}},
      {"int2-per-channel", int_spec(2, true, Granularity::PerChannel), {8, 64}},
      {"int8-per-tensor", int_spec(8, true, Granularity::PerTensor), {8, 64}},
      {"int8-per-tensor-asym", int_spec(8, false, Granularity::PerTensor), {8, 64}},
      {"int8-per-token-f16", int_spec(8, false, Granularity::PerToken, 0, ScaleDType::F16), {3, 40}},
  };
}

// ------------------------------------------------------------------------------------------------
TEST(Affine, FakeQuantEqualsDequantizeOfQuantizeBitForBit) {
  for (auto dev : devices()) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      for (const auto& c : cases()) {
        SCOPED_TRACE(c.name + " " + std::string(c10::toString(dt)) + " on " + dev.str());
        at::manual_seed(7);
        auto x = (at::randn(c.shape) * 0.3 + 0.05).to(dt).to(dev);
        x.select(-1, 0).fill_(3.0);  // an outlier column
        auto qp = choose_qparams(x, c.spec);
        EXPECT_EQ(qp.scale.scalar_type(), at::kFloat);
        EXPECT_EQ(qp.zero_point.scalar_type(), at::kFloat);
        auto [y, mask] = fake_quant_affine(x, qp, c.spec);
        auto q = quantize_affine(x, qp, c.spec);
        EXPECT_EQ(q.scalar_type(), at::kInt);
        EXPECT_EQ(q.sizes(), x.sizes());
        EXPECT_GE(q.min().item<int>(), c.spec.qmin());
        EXPECT_LE(q.max().item<int>(), c.spec.qmax());
        auto dq = dequantize_affine(q, qp, c.spec, dt);
        EXPECT_EQ(y.scalar_type(), dt);
        EXPECT_EQ(mask.scalar_type(), at::kBool);
        EXPECT_EQ(mask.sizes(), x.sizes());
        EXPECT_TRUE(same_bits(y, dq));
        // fake quant is close to x (within one quantization step of its block)
        auto err = (y.to(at::kFloat) - x.to(at::kFloat)).abs().max().item<float>();
        EXPECT_LE(err, qp.scale.max().item<float>() * 1.01f + 1e-2f);
      }
    }
  }
}

TEST(Affine, QParamShapes) {
  auto x = at::randn({6, 128});
  auto g = choose_qparams(x, QuantSpec::preset_named("int4-g32"));
  EXPECT_EQ(g.scale.sizes(), (std::vector<int64_t>{6, 4}));
  auto c = choose_qparams(x, QuantSpec::preset_named("int8-per-channel"));
  EXPECT_EQ(c.scale.sizes(), (std::vector<int64_t>{6, 1}));
  auto t = choose_qparams(at::randn({2, 3, 16}), QuantSpec::preset_named("int8-per-token"));
  EXPECT_EQ(t.scale.sizes(), (std::vector<int64_t>{6, 1}));
  EXPECT_EQ(t.zero_point.sizes(), (std::vector<int64_t>{6, 1}));
  auto p = choose_qparams(x, int_spec(8, true, Granularity::PerTensor));
  EXPECT_EQ(p.scale.sizes(), (std::vector<int64_t>{1, 1}));
  // F16 / BF16 scale dtypes: float32 tensors holding values of that dtype
  auto h = choose_qparams(x, int_spec(4, true, Granularity::PerGroup, 32, ScaleDType::F16));
  EXPECT_TRUE(at::equal(h.scale, h.scale.to(at::kHalf).to(at::kFloat)));
  auto b = choose_qparams(x, int_spec(4, true, Granularity::PerGroup, 32, ScaleDType::BF16));
  EXPECT_TRUE(at::equal(b.scale, b.scale.to(at::kBFloat16).to(at::kFloat)));
  EXPECT_FALSE(at::equal(g.scale, b.scale));
}

// Per-tensor is one group over the whole tensor with the per-channel arithmetic, so qparams
// derived from (min, max) pairs as PerGroup(2) (quant/fake_quant.cpp's observers) are identical.
TEST(Affine, PerTensorEqualsOneGroupOfMinMaxPairs) {
  at::manual_seed(9);
  auto x = at::randn({5, 24}) * 0.4 + 0.1;
  auto mn = x.min().reshape({1, 1}), mx = x.max().reshape({1, 1});
  auto pairs = at::stack({mn, mx}, -1).reshape({1, 2});
  for (bool sym : {true, false}) {
    auto pt = int_spec(8, sym, Granularity::PerTensor);
    auto pg = int_spec(8, sym, Granularity::PerGroup, 2);
    auto a = choose_qparams(x, pt), b = choose_qparams(pairs, pg);
    EXPECT_TRUE(same_bits(a.scale, b.scale)) << sym;
    EXPECT_TRUE(same_bits(a.zero_point, b.zero_point)) << sym;
  }
}

// ------------------------------------------------------------------------------------------------
TEST(Affine, PerGroupBlocksUseOnlyTheirOwnElements) {
  for (auto spec : {QuantSpec::preset_named("int4-g32"), QuantSpec::preset_named("int4-g128-asym"),
                    QuantSpec::preset_named("int4-g32-zp"), int_spec(8, true, Granularity::PerGroup, 64)}) {
    SCOPED_TRACE(spec.describe());
    const int64_t g = spec.group_size, rows = 3, nb = 4;
    at::manual_seed(3);
    auto x = at::randn({rows, nb * g});
    auto y0 = fake_quant_affine(x, choose_qparams(x, spec), spec).first;
    // perturb group (row 1, block 2) with a big outlier and a shift
    auto x1 = x.clone();
    x1.index({1, at::indexing::Slice(2 * g, 3 * g)}).mul_(5).add_(0.7);
    auto qp1 = choose_qparams(x1, spec);
    auto y1 = fake_quant_affine(x1, qp1, spec).first;
    auto qp0 = choose_qparams(x, spec);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        auto sl = at::indexing::Slice(b * g, (b + 1) * g);
        bool perturbed = r == 1 && b == 2;
        EXPECT_EQ(same_bits(y0.index({r, sl}).contiguous(), y1.index({r, sl}).contiguous()), !perturbed)
            << "row " << r << " block " << b;
        EXPECT_EQ(qp0.scale[r][b].item<float>() == qp1.scale[r][b].item<float>(), !perturbed);
      }
    }
  }
}

TEST(Affine, PerTokenBlocksUseOnlyTheirOwnToken) {
  auto spec = QuantSpec::preset_named("int8-per-token");
  at::manual_seed(5);
  auto x = at::randn({2, 4, 32});
  auto y0 = fake_quant_affine(x, choose_qparams(x, spec), spec).first;
  auto x1 = x.clone();
  x1[1][2].mul_(10).sub_(3);
  auto y1 = fake_quant_affine(x1, choose_qparams(x1, spec), spec).first;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 4; ++t)
      EXPECT_EQ(same_bits(y0[b][t].contiguous(), y1[b][t].contiguous()), !(b == 1 && t == 2)) << b << "," << t;
}

// ------------------------------------------------------------------------------------------------
// int4 symmetric, group 4, computed by hand: scale = max|x| / ((qmax - qmin) / 2) = 3.75 / 7.5 = 0.5;
// q = clamp(round_half_even(x * 2), -8, 7); x' = q * 0.5.
TEST(Affine, HandComputedInt4Symmetric) {
  auto spec = int_spec(4, true, Granularity::PerGroup, 4);
  EXPECT_EQ(spec.qmin(), -8);
  EXPECT_EQ(spec.qmax(), 7);
  auto x = f32({-3.75f, 0.25f, 0.75f, -0.25f, /**/ 3.75f, 1.3f, 2.6f, -1.0f}, {1, 8});
  auto qp = choose_qparams(x, spec);
  EXPECT_TRUE(at::equal(qp.scale, f32({0.5f, 0.5f}, {1, 2})));
  EXPECT_TRUE(at::equal(qp.zero_point, at::zeros({1, 2})));
  // -7.5 -> -8 (half to even, inside), 0.5 -> 0, 1.5 -> 2, -0.5 -> -0 -> 0 (+ int zero point);
  // 7.5 -> 8 -> clamped to 7 (outside: mask false), 2.6 -> 3, 5.2 -> 5, -2 -> -2.
  auto q = quantize_affine(x, qp, spec);
  EXPECT_TRUE(at::equal(q, at::tensor(std::vector<int>{-8, 0, 2, 0, 7, 3, 5, -2}, at::kInt).reshape({1, 8})));
  auto [y, mask] = fake_quant_affine(x, qp, spec);
  EXPECT_TRUE(same_bits(y, f32({-4.f, 0.f, 1.f, 0.f, 3.5f, 1.5f, 2.5f, -1.f}, {1, 8})));
  EXPECT_TRUE(at::equal(mask, at::tensor(std::vector<uint8_t>{1, 1, 1, 1, 0, 1, 1, 1}).to(at::kBool).reshape({1, 8})));
}

// int4 asymmetric per-channel (torchao's tinygemm FLOAT-domain zero point): scale = (max - min) / 15
// = 7.5 / 15 = 0.5; zero_point = min + scale * 8 = 2.5; q = round((x - (zp - 8 * scale)) / scale)
// = round((x + 1.5) * 2); x' = (q - 8) * scale + zp.
TEST(Affine, HandComputedInt4AsymmetricFloatZeroPoint) {
  auto spec = int_spec(4, false, Granularity::PerChannel);
  EXPECT_EQ(spec.qmin(), 0);
  EXPECT_EQ(spec.qmax(), 15);
  auto x = f32({-1.5f, 6.0f, 0.2f, 2.0f}, {1, 4});
  auto qp = choose_qparams(x, spec);
  EXPECT_EQ(qp.scale.item<float>(), 0.5f);
  EXPECT_EQ(qp.zero_point.item<float>(), 2.5f);
  auto q = quantize_affine(x, qp, spec);
  EXPECT_TRUE(at::equal(q, at::tensor(std::vector<int>{0, 15, 3, 7}, at::kInt).reshape({1, 4})));
  auto y = fake_quant_affine(x, qp, spec).first;
  EXPECT_TRUE(same_bits(y, f32({-1.5f, 6.0f, 0.0f, 2.0f}, {1, 4})));
}

// int4 with an INTEGER zero point (AutoAWQ's rule, preset int<b>-g<G>-zp: fp16 scales), group 4, by
// hand: s = max(max - min, 1e-5) / 15 rounded to fp16; z = clamp(-round(min / s), 0, 15);
// q = clamp(round(x / s) + z, 0, 15); x' = (q - z) * s.
TEST(Affine, HandComputedInt4IntegerZeroPoint) {
  auto spec = QuantSpec::preset_named("int4-g4-zp");
  ASSERT_TRUE(spec.int_zero_point());
  EXPECT_FALSE(spec.is_ggml());
  EXPECT_EQ(spec.qmin(), 0);
  EXPECT_EQ(spec.qmax(), 15);
  EXPECT_EQ(spec.scale_dtype, ScaleDType::F16);
  const float tiny = std::ldexp(11.0f, -24);  // fp16(1e-5 / 15) = 6.6667e-7 -> 11 * 2^-24 (subnormal)
  auto x = f32({-1.5f, 0.0f, 2.25f, 6.0f,    // mixed: s = 7.5/15 = 0.5, z = -round(-3) = 3
                1.0f, 2.0f, 3.0f, 8.5f,      // all positive: s = 0.5, z = -round(2) -> clamped to 0
                0.25f, 0.25f, 0.25f, 0.25f,  // all equal: s = tiny, z = -round(381300.4) -> 0
                -0.25f, -0.25f, -0.25f, -0.25f,  // all equal, negative: z = round(381300.4) -> 15
                0.0f, 0.0f, 0.0f, 0.0f},     // all zero: s = tiny, z = 0
               {1, 20});
  auto qp = choose_qparams(x, spec);
  EXPECT_TRUE(same_bits(qp.scale, f32({0.5f, 0.5f, tiny, tiny, tiny}, {1, 5})));
  EXPECT_TRUE(same_bits(qp.zero_point, f32({3.f, 0.f, 0.f, 15.f, 0.f}, {1, 5})));
  // mixed: x / s = -3, 0, 4.5 (-> 4, half to even), 12; + 3 -> 0, 3, 7, 15
  // all positive: 2, 4, 6, 17 -> clamped to 15 (outside: mask false; AutoAWQ clips it too)
  // all equal 0.25: round(381300.4) = 381300 -> 15; -0.25: -381300 + 15 -> 0; zeros: 0
  auto q = quantize_affine(x, qp, spec);
  EXPECT_TRUE(at::equal(q, at::tensor(std::vector<int>{0, 3, 7, 15, 2, 4, 6, 15, 15, 15, 15, 15, 0, 0, 0, 0, 0, 0, 0, 0},
                                      at::kInt).reshape({1, 20})));
  auto [y, mask] = fake_quant_affine(x, qp, spec);
  const float top = 15 * tiny;
  EXPECT_TRUE(same_bits(y, f32({-1.5f, 0.0f, 2.0f, 6.0f, 1.0f, 2.0f, 3.0f, 7.5f, top, top, top, top, -top, -top, -top, -top,
                                0.f, 0.f, 0.f, 0.f},
                               {1, 20})));
  EXPECT_TRUE(at::equal(mask, at::tensor(std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1})
                                  .to(at::kBool)
                                  .reshape({1, 20})));
  EXPECT_TRUE(same_bits(dequantize_affine(q, qp, spec, at::kFloat), y));
}

// The zero point and the codes use the fp16-ROUNDED scale (what is shipped), not the float32 one:
// here (max - min) / 15 = 0.1 is not an fp16 value (fp16(0.1) = 0.0999755859375), and
// -min / s32 = 2.49999996 (-> 2) while -min / s16 = 2.50061 -> 3.
TEST(Affine, IntegerZeroPointUsesTheRoundedScale) {
  auto spec = QuantSpec::preset_named("int4-g4-zp");
  auto x = f32({-0.25f, 0.0f, 0.5f, 1.25f}, {1, 4});
  auto qp = choose_qparams(x, spec);
  const float s16 = at::scalar_tensor(0.1, at::kHalf).item<float>();
  EXPECT_EQ(qp.scale.item<float>(), s16);
  EXPECT_EQ(qp.zero_point.item<float>(), 3.0f);
  auto q = quantize_affine(x, qp, spec);
  // x / s16 = -2.5006 (-> -3), 0, 5.0012 (-> 5), 12.503 (-> 13); + 3 = 0, 3, 8, 16 -> clamped to 15
  EXPECT_TRUE(at::equal(q, at::tensor(std::vector<int>{0, 3, 8, 15}, at::kInt).reshape({1, 4})));
  auto y = fake_quant_affine(x, qp, spec).first;
  EXPECT_TRUE(same_bits(y, (f32({-3.f, 0.f, 5.f, 12.f}, {1, 4}) * s16)));
}

TEST(Spec, IntegerZeroPointPresets) {
  for (const char* n : {"int4-g128-zp", "int4-g32-zp", "int3-g128-zp"}) {
    const auto& names = QuantSpec::preset_names();
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  }
  auto s = QuantSpec::preset_named("int4-g128-zp");
  EXPECT_EQ(s.bits, 4);
  EXPECT_FALSE(s.symmetric);
  EXPECT_EQ(s.granularity, Granularity::PerGroup);
  EXPECT_EQ(s.group_size, 128);
  EXPECT_EQ(s.rule, Rule::IntZeroPoint);
  EXPECT_EQ(s.describe(), "int4 asym int-zero-point per-group(128) fp16-scale");
  // 4 bits + (16-bit scale + 4-bit zero point) per 128 weights
  EXPECT_DOUBLE_EQ(s.bits_per_weight(4096), 4.0 + 20.0 / 128.0);
  EXPECT_EQ(QuantSpec::preset_named("int4-g128-asym").rule, Rule::Affine);
  auto g = QuantSpec::preset_named("int5-g64-zp");
  EXPECT_EQ(g.bits, 5);
  EXPECT_EQ(g.group_size, 64);
  EXPECT_TRUE(g.int_zero_point());
  EXPECT_THROW(QuantSpec::preset_named("int4-g128-zpx"), qf::ConfigError);
  // fitting presets keep the zero-point kind
  auto fit = fitting_presets(s, 96);
  EXPECT_NE(std::find(fit.begin(), fit.end(), "int4-g32-zp"), fit.end());
}

// int8 asymmetric per-token (integer zero point): scale = (max(x,0) - min(x,0)) / 255;
// zero_point = 0 - round(min / scale) = round(63.75) = 64.
TEST(Affine, HandComputedPerTokenAsymmetric) {
  auto spec = QuantSpec::preset_named("int8-per-token");
  auto x = f32({-1.0f, 3.0f, 0.5f, 0.0f, /**/ 2.0f, 4.0f, 3.0f, 2.5f}, {2, 4});
  auto qp = choose_qparams(x, spec);
  EXPECT_EQ(qp.scale[0][0].item<float>(), 4.0f / 255.0f);
  EXPECT_EQ(qp.zero_point[0][0].item<float>(), 64.0f);
  // the all-positive token still includes 0 in its range: min(x, 0) = 0, zero point 0
  EXPECT_EQ(qp.scale[1][0].item<float>(), 4.0f / 255.0f);
  EXPECT_EQ(qp.zero_point[1][0].item<float>(), 0.0f);
  auto [y, mask] = fake_quant_affine(x, qp, spec);
  EXPECT_TRUE(mask.all().item<bool>());
  EXPECT_EQ(y[0][3].item<float>(), 0.0f);  // zero is exactly representable
  // -1 * 63.75 = -63.75 -> -64; (-64 + 64 - 64) * 4/255 = -1.0039 (within half a step)
  EXPECT_NEAR(y[0][0].item<float>(), -1.0f, 2.0 / 255 + 1e-6);
}

// ------------------------------------------------------------------------------------------------
// Mask = pre-clamp integer inside [qmin, qmax]; checked with hand-given qparams, int8 per-tensor,
// scale 1/8: range [-128, 127] / 8 = [-16, 15.875].
TEST(Affine, MaskIsThePreClampRangeTest) {
  auto spec = int_spec(8, true, Granularity::PerTensor);
  QParams qp{at::full({1, 1}, 0.125f), at::zeros({1, 1})};
  auto x = f32({15.875f, 15.9375f, 16.5f, -16.0f, -16.0625f, -16.1875f, 0.0f}, {1, 7});
  // x * 8 = 127, 127.5 -> 128 (out), 132 (out), -128, -128.5 -> -128 (half-even: in), -129.5 -> -130 (out), 0
  auto [y, mask] = fake_quant_affine(x, qp, spec);
  EXPECT_TRUE(at::equal(mask, at::tensor(std::vector<uint8_t>{1, 0, 0, 1, 1, 0, 1}).to(at::kBool).reshape({1, 7})));
  EXPECT_TRUE(same_bits(y, f32({15.875f, 15.875f, 15.875f, -16.f, -16.f, -16.f, 0.f}, {1, 7})));

  // asymmetric (FLOAT domain): int4 per-channel, scale 1, zero point 8 -> min_val 0, range [0, 15]
  auto aspec = int_spec(4, false, Granularity::PerChannel);
  QParams aq{at::ones({1, 1}), at::full({1, 1}, 8.0f)};
  auto xa = f32({-0.4f, -0.6f, 15.4f, 15.6f, 7.0f}, {1, 5});
  auto [ya, ma] = fake_quant_affine(xa, aq, aspec);
  EXPECT_TRUE(at::equal(ma, at::tensor(std::vector<uint8_t>{1, 0, 1, 0, 1}).to(at::kBool).reshape({1, 5})));
  EXPECT_TRUE(same_bits(ya, f32({0.f, 0.f, 15.f, 15.f, 7.f}, {1, 5})));
}

// ------------------------------------------------------------------------------------------------
// bf16 inputs follow torchao's dtype flow: qparams are reduced/divided in bf16, the quantize
// arithmetic promotes to the (float32) scale dtype, and the result is returned as bf16.
TEST(Affine, Bf16InputFollowsTorchaoAndReturnsBf16) {
  for (const auto& c : cases()) {
    // integer zero points are not torchao's: their qparams are computed in float32 for every input dtype
    if (c.spec.scale_dtype != ScaleDType::F32 || c.spec.int_zero_point()) continue;
    SCOPED_TRACE(c.name);
    at::manual_seed(11);
    auto x = (at::randn(c.shape) * 0.7).to(at::kBFloat16);
    auto qp = choose_qparams(x, c.spec);
    // the scale was computed in bf16 arithmetic (then cast to float32)
    EXPECT_TRUE(at::equal(qp.scale, qp.scale.to(at::kBFloat16).to(at::kFloat)));
    auto [y, mask] = fake_quant_affine(x, qp, c.spec);
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    auto [yf, maskf] = fake_quant_affine(x.to(at::kFloat), qp, c.spec);
    EXPECT_TRUE(at::equal(mask, maskf));
    if (c.spec.symmetric || c.spec.granularity == Granularity::PerToken) {
      // INT domain with a float32 scale: the elementwise math is float32, rounded to bf16 once
      EXPECT_TRUE(same_bits(y, yf.to(at::kBFloat16)));
    } else {
      // FLOAT domain: torchao's dequant works in place in the output dtype ((q - mid) * scale,
      // then + zero_point), so bf16 rounds twice; at most one bf16 step from the float32 path
      auto d = (y.to(at::kFloat) - yf).abs();
      EXPECT_TRUE((d <= yf.abs() * (1.0 / 128) + 1e-30).all().item<bool>());
    }
  }
}

// ------------------------------------------------------------------------------------------------
// DEVIATION (documented in affine.cpp): fp16 scales below 2^-16 (and all-zero groups, whose scale
// underflows to 0 in fp16) use the float32 reciprocal: no NaN, zeros stay zero.
TEST(Affine, Fp16ScalesOfTinyAndZeroGroupsStayFinite) {
  auto spec = int_spec(4, true, Granularity::PerGroup, 4, ScaleDType::F16);
  auto x = f32({0, 0, 0, 0, /**/ 3e-5f, -1e-5f, 0, 2e-5f, /**/ 1, -2, 0.5f, 0}, {1, 12});
  auto qp = choose_qparams(x, spec);
  EXPECT_EQ(qp.scale[0][0].item<float>(), 0.0f);  // float32 eps underflows in fp16
  auto [y, mask] = fake_quant_affine(x, qp, spec);
  EXPECT_TRUE(at::isfinite(y).all().item<bool>());
  EXPECT_TRUE(at::equal(y.slice(1, 0, 4), at::zeros({1, 4})));
  EXPECT_TRUE(mask.slice(1, 0, 4).all().item<bool>());
  auto s1 = qp.scale[0][1].item<float>();
  EXPECT_GT(s1, 0.0f);
  EXPECT_LT(s1, 1.0f / 65504);  // its fp16 reciprocal would overflow
  EXPECT_NEAR(y[0][4].item<float>(), 3e-5f, s1);
  EXPECT_TRUE(same_bits(y, dequantize_affine(quantize_affine(x, qp, spec), qp, spec, at::kFloat)));
}

// ------------------------------------------------------------------------------------------------
TEST(Affine, BadGroupSizeNamesBothNumbers) {
  auto spec = QuantSpec::preset_named("int4-g32");
  auto x = at::randn({4, 48});
  for (int which = 0; which < 3; ++which) {
    try {
      if (which == 0) choose_qparams(x, spec);
      if (which == 1) fake_quant_affine(x, QParams{at::ones({4, 1}), at::zeros({4, 1})}, spec);
      if (which == 2) quantize_affine(x, QParams{at::ones({4, 1}), at::zeros({4, 1})}, spec);
      ADD_FAILURE() << "no error for group size 32 on width 48";
    } catch (const qf::Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("32"), std::string::npos) << m;
      EXPECT_NE(m.find("48"), std::string::npos) << m;
      EXPECT_NE(m.find("group size"), std::string::npos) << m;
    }
  }
}

TEST(Affine, OtherErrors) {
  auto x = at::randn({4, 64});
  auto spec = QuantSpec::preset_named("int4-g32");
  // qparams of the wrong shape
  EXPECT_THROW(fake_quant_affine(x, QParams{at::ones({4, 1}), at::zeros({4, 1})}, spec), qf::Error);
  // llama.cpp block presets and fp8 are not affine integer specs
  EXPECT_THROW(choose_qparams(x, QuantSpec::preset_named("q4_0")), qf::Error);
  EXPECT_THROW(choose_qparams(x, QuantSpec::preset_named("fp8-e4m3")), qf::Error);
  EXPECT_THROW(fake_quant_fp8(x, spec), qf::Error);
  // integer input
  EXPECT_THROW(choose_qparams(at::ones({4, 64}, at::kInt), spec), qf::Error);
}

// ------------------------------------------------------------------------------------------------
// FP8: scale = amax / max_finite per output channel (row); values on the fp8 grid survive.
TEST(Affine, Fp8HandComputed) {
  auto e4 = QuantSpec::preset_named("fp8-e4m3");
  // row 0: amax 448 -> scale 1; 0.3 -> 0.3125 (e4m3 grid 0.28125, 0.3125 near 0.3)
  // row 1: amax 224 -> scale 0.5; 0.15 / 0.5 = 0.3 -> 0.3125 -> 0.15625
  // row 2: all zero -> 0 (DEVIATION: torchao returns NaN from 0/0)
  auto x = f32({448, 1, -2.5f, 0.3f, /**/ 224, -0.5f, 0.15f, 0, /**/ 0, 0, 0, 0}, {3, 4});
  auto y = fake_quant_fp8(x, e4);
  EXPECT_TRUE(same_bits(y, f32({448, 1, -2.5f, 0.3125f, 224, -0.5f, 0.15625f, 0, 0, 0, 0, 0}, {3, 4})));
  auto e5 = QuantSpec::preset_named("fp8-e5m2");
  auto x5 = f32({57344, 1, -2.5f, 0.3f}, {1, 4});
  EXPECT_TRUE(same_bits(fake_quant_fp8(x5, e5), f32({57344, 1, -2.5f, 0.3125f}, {1, 4})));
  // per-tensor: one scale for everything (row 1 is quantized relative to row 0's amax)
  auto pt = e4;
  pt.granularity = Granularity::PerTensor;
  auto xt = f32({448, 0, 0, 0, 1.0f, 0.3f, 0, 0}, {2, 4});
  EXPECT_TRUE(same_bits(fake_quant_fp8(xt, pt), f32({448, 0, 0, 0, 1.0f, 0.3125f, 0, 0}, {2, 4})));
  // bf16 in -> bf16 out
  auto yb = fake_quant_fp8(x.to(at::kBFloat16), e4);
  EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::isfinite(yb.to(at::kFloat)).all().item<bool>());
}

TEST(Affine, Fp8IsCloseAndSaturates) {
  for (auto dev : devices()) {
    at::manual_seed(2);
    auto x = (at::randn({16, 64}) * 3).to(dev);
    for (auto spec : {QuantSpec::preset_named("fp8-e4m3"), QuantSpec::preset_named("fp8-e5m2")}) {
      auto y = fake_quant_fp8(x, spec).cpu();
      auto xc = x.cpu();
      // relative error bounded by half an ulp of the format (e4m3: 2^-4, e5m2: 2^-3) above the subnormals
      double rel = spec.kind == Kind::Fp8E4M3 ? 0.0625 : 0.125;
      auto amax = xc.abs().amax({1}, true);
      auto err = (y - xc).abs();
      EXPECT_TRUE((err <= xc.abs() * rel + amax * 1e-3).all().item<bool>()) << spec.describe();
      // the row maximum maps onto the largest finite value, so |y| never exceeds the row amax by more than a rounding
      EXPECT_TRUE((y.abs().amax({1}, true) <= amax * (1 + 1e-6)).all().item<bool>());
    }
  }
}

}  // namespace
