// IQ4_NL / IQ4_XS / TQ1_0 / TQ2_0 / Q1_0 / Q2_0 block codecs (quant/ggml_iq.h): hand-worked blocks
// from ggml-quants.c's definitions, exact round trips of on-grid values, the importance weights'
// reach (IQ4 only), all-zero blocks, and the ATen dequantizer == the block loop bit for bit.
// Byte parity with libggml's ggml_quantize_chunk lives in tests/interop/test_gguf_lowbit.py.
#include "quant/ggml_iq.h"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstring>
#include <random>
#include <vector>

#include "quant/ggml_blocks.h"

namespace {

using qf::quant::Rule;
namespace iq = qf::quant::ggml::iq;

struct Codec {
  const char* name;
  Rule rule;
  int block, bytes, d_at;  // values and bytes per block, offset of the fp16 d
  void (*quant)(const float*, uint8_t*);
  void (*dequant)(const uint8_t*, float*);
  void (*quant_imatrix)(const float*, const float*, int64_t, uint8_t*);  // nullptr: ggml ignores the weights
};

const std::vector<Codec>& codecs() {
  static const std::vector<Codec> c = {
      {"iq4_nl", Rule::GgmlIQ4_NL, 32, 18, 0, iq::quant_iq4_nl, iq::dequant_iq4_nl, iq::quant_row_iq4_nl_imatrix},
      {"iq4_xs", Rule::GgmlIQ4_XS, 256, 136, 0, iq::quant_iq4_xs, iq::dequant_iq4_xs, iq::quant_row_iq4_xs_imatrix},
      {"tq1_0", Rule::GgmlTQ1_0, 256, 54, 52, iq::quant_tq1_0, iq::dequant_tq1_0, nullptr},
      {"tq2_0", Rule::GgmlTQ2_0, 256, 66, 64, iq::quant_tq2_0, iq::dequant_tq2_0, nullptr},
      {"q1_0", Rule::GgmlQ1_0, 128, 18, 0, iq::quant_q1_0, iq::dequant_q1_0, nullptr},
      {"q2_0", Rule::GgmlQ2_0, 64, 18, 0, iq::quant_q2_0, iq::dequant_q2_0, nullptr},
  };
  return c;
}

uint16_t half_bits(float f) { return c10::Half(f).x; }

std::vector<float> normal(int n, uint32_t seed, float scale = 1.f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(n);
  for (auto& v : x) v = nd(g) * scale;
  return x;
}

TEST(GgmlIq, Q1_0BlockByHand) {
  // d = mean |x| = (64 * 0.5 + 64 * 1.5) / 128 = 1; bit j set for x[j] >= 0 (-0.0 included).
  std::vector<float> x(128);
  for (int j = 0; j < 128; ++j) x[j] = (j % 2 ? -1.f : 1.f) * (j < 64 ? 0.5f : 1.5f);
  x[1] = -0.0f;  // |x| 0 -> adjust another to keep the mean: x[3] = -1.0
  x[3] = -1.0f;
  uint8_t y[18];
  iq::quant_q1_0(x.data(), y);
  EXPECT_EQ(y[0] | (y[1] << 8), half_bits(1.0f));
  EXPECT_EQ(y[2], 0x57);  // bits 0, 1 (-0.0 >= 0), 2, 4, 6 set; 3, 5, 7 clear
  for (int k = 3; k < 18; ++k) EXPECT_EQ(y[k], 0x55) << k;
  float back[128];
  iq::dequant_q1_0(y, back);
  EXPECT_EQ(back[0], 1.f);
  EXPECT_EQ(back[1], 1.f);
  EXPECT_EQ(back[3], -1.f);
}

TEST(GgmlIq, Q2_0BlockByHand) {
  // d = amax = 2; code = roundf(x / 2) + 1 (half away from zero), 2 bits LSB first.
  std::vector<float> x(64, 0.f);
  x[0] = 2.f, x[1] = -2.f, x[2] = 1.f, x[3] = -1.f, x[4] = 0.9f;
  uint8_t y[18];
  iq::quant_q2_0(x.data(), y);
  EXPECT_EQ(y[0] | (y[1] << 8), half_bits(2.0f));
  EXPECT_EQ(y[2], 2 | (0 << 2) | (2 << 4) | (0 << 6));  // 1 -> 2, -1 -> 0, 0.5 -> 1 -> 2, -0.5 -> -1 -> 0
  EXPECT_EQ(y[3], 1 | (1 << 2) | (1 << 4) | (1 << 6));  // 0.45 -> 0 -> 1
  float back[64];
  iq::dequant_q2_0(y, back);
  EXPECT_EQ(back[2], 2.f);
  EXPECT_EQ(back[4], 0.f);
}

TEST(GgmlIq, TernaryOnGridValuesRoundTrip) {
  // Values in {-a, 0, a} survive TQ1_0 / TQ2_0 exactly when a is an fp16 value.
  std::mt19937 g(7);
  std::vector<float> x(256);
  for (auto& v : x) v = 0.75f * static_cast<float>(static_cast<int>(g() % 3) - 1);
  x[5] = 0.75f;
  for (const auto* c : {&codecs()[2], &codecs()[3]}) {
    std::vector<uint8_t> y(c->bytes);
    std::vector<float> back(256);
    c->quant(x.data(), y.data());
    c->dequant(y.data(), back.data());
    EXPECT_EQ(std::memcmp(back.data(), x.data(), 256 * sizeof(float)), 0) << c->name;
  }
  // TQ2_0's layout by hand: byte m of chunk c holds values 128c + m + 32n at bits 2n.
  std::vector<uint8_t> y(66);
  iq::quant_tq2_0(x.data(), y.data());
  int code = 0;
  for (int n = 0; n < 4; ++n) code |= (static_cast<int>(x[128 + 7 + 32 * n] / 0.75f) + 1) << (2 * n);
  EXPECT_EQ(y[32 + 7], code);
}

TEST(GgmlIq, ImportanceWeightsChangeIq4Blocks) {
  // Heavy weight on a few columns moves the fitted scales, so some of 4 blocks' bytes differ from the
  // unweighted choice; uniform weights do not give the unweighted bytes (those weight by x^2).
  for (const auto& c : codecs()) {
    if (!c.quant_imatrix) continue;
    const int n = c.block * 4;
    auto x = normal(n, 11);
    auto w = normal(n, 12);
    for (auto& v : w) v = v * v + 0.01f;
    for (int j = 3; j < n; j += 37) w[j] = 1000.f;
    std::vector<uint8_t> plain(c.bytes * 4), weighted(c.bytes * 4);
    for (int b = 0; b < 4; ++b) c.quant(x.data() + b * c.block, plain.data() + b * c.bytes);
    c.quant_imatrix(x.data(), w.data(), n, weighted.data());
    EXPECT_NE(plain, weighted) << c.name;
    std::vector<float> back(c.block);
    c.dequant(weighted.data(), back.data());  // the weighted blocks still decode near x
    double se = 0, sx = 0;
    for (int j = 0; j < c.block; ++j) se += (back[j] - x[j]) * (back[j] - x[j]), sx += x[j] * x[j];
    EXPECT_LT(se / sx, 0.05) << c.name;
  }
}

TEST(GgmlIq, ZeroBlocks) {
  for (const auto& c : codecs()) {
    std::vector<float> x(c.block, 0.f), back(c.block, 1.f);
    std::vector<uint8_t> y(c.bytes, 0xAB);
    c.quant(x.data(), y.data());
    c.dequant(y.data(), back.data());
    for (float v : back) EXPECT_EQ(v, 0.f) << c.name;
  }
  // IQ4_NL: scale 0 and every code the level nearest 0 (index 8, value 1).
  std::vector<float> z(32, 0.f);
  uint8_t y[18];
  iq::quant_iq4_nl(z.data(), y);
  EXPECT_EQ(y[0], 0);
  EXPECT_EQ(y[1], 0);
  for (int k = 2; k < 18; ++k) EXPECT_EQ(y[k], 0x88);
  // IQ4_XS: d = -max_scale / 32 = -0.0 (fp16 0x8000), scales l = 0 + 32.
  std::vector<float> z256(256, 0.f);
  uint8_t xs[136];
  iq::quant_iq4_xs(z256.data(), xs);
  EXPECT_EQ(xs[0] | (xs[1] << 8), 0x8000);
  EXPECT_EQ(xs[2] | (xs[3] << 8), 0xAAAA);  // top bits of 32 = 0b10 for each of 8 sub-blocks
  for (int k = 4; k < 8; ++k) EXPECT_EQ(xs[k], 0);
}

TEST(GgmlIq, Iq4ErrorIsSmall) {
  for (const auto* c : {&codecs()[0], &codecs()[1]}) {
    auto x = normal(c->block * 64, 3);
    std::vector<uint8_t> y(c->bytes);
    std::vector<float> back(c->block);
    double se = 0, sx = 0;
    for (int b = 0; b < 64; ++b) {
      c->quant(x.data() + b * c->block, y.data());
      c->dequant(y.data(), back.data());
      for (int j = 0; j < c->block; ++j) {
        const double e = back[j] - x[b * c->block + j];
        se += e * e;
        sx += static_cast<double>(x[b * c->block + j]) * x[b * c->block + j];
      }
    }
    EXPECT_LT(se / sx, 0.02) << c->name;  // 4-bit non-linear grid: relative MSE about 1%
  }
}

TEST(GgmlIq, AtenDequantEqualsBlockLoop) {
  std::mt19937 g(5);
  for (const auto& c : codecs()) {
    const int n = 37;
    auto b = at::randint(0, 256, {n, c.bytes}, at::TensorOptions().dtype(at::kByte));
    auto* p = b.data_ptr<uint8_t>();
    std::normal_distribution<float> nd;
    for (int i = 0; i < n; ++i) {  // finite scales (random bytes can spell inf / NaN)
      const uint16_t d = half_bits(nd(g));
      p[i * c.bytes + c.d_at] = static_cast<uint8_t>(d & 0xFF);
      p[i * c.bytes + c.d_at + 1] = static_cast<uint8_t>(d >> 8);
    }
    auto ref = at::empty({n, c.block}, at::kFloat);
    for (int i = 0; i < n; ++i) c.dequant(p + i * c.bytes, ref.data_ptr<float>() + i * c.block);
    auto got = iq::dequantize_blocks_aten(b, c.rule);
    ASSERT_EQ(got.sizes(), ref.sizes()) << c.name;
    EXPECT_TRUE(at::equal(got.view(at::kInt), ref.view(at::kInt))) << c.name;
  }
}

TEST(GgmlIq, ThroughTheBlockApiFakeQuantIsDequantOfQuantize) {
  // The rules as ggml::quantize / dequantize / dequantize_aten / fake_quant see them (format table).
  namespace gg = qf::quant::ggml;
  auto w = at::randn({7, 512}, at::detail::createCPUGenerator(9));
  w[2].zero_();
  auto qw = at::rand({512}, at::detail::createCPUGenerator(10)).pow(4).mul(30);
  for (const auto& c : codecs()) {
    auto blocks = gg::quantize(w, c.rule);
    ASSERT_EQ(blocks.size(1), 512 / c.block * c.bytes) << c.name;
    auto deq = gg::dequantize(blocks, c.rule, 512);
    EXPECT_TRUE(at::equal(gg::fake_quant(w, c.rule).view(at::kInt), deq.view(at::kInt))) << c.name;
    EXPECT_TRUE(at::equal(gg::dequantize_aten(blocks, c.rule, 512).view(at::kInt), deq.view(at::kInt))) << c.name;
    auto weighted = gg::quantize(w, c.rule, qw);
    EXPECT_EQ(at::equal(weighted, blocks), c.quant_imatrix == nullptr) << c.name;  // only IQ4 uses the weights
  }
}

}  // namespace
