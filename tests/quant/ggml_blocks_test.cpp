// llama.cpp block formats (quant/ggml_blocks.h): fake_quant == dequantize(quantize) bit for bit,
// hand-computed q4_0 / q8_0 blocks (byte by byte, from ggml-quants.c's reference quantizers),
// all-zero blocks, K-quant error bounds, the device (ATen) path == the block loop, and input checks.
// Byte-level parity with gguf-py's quantizers lives in tests/interop/test_gguf_blocks.py.
#include "quant/ggml_blocks.h"

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cctype>
#include <cmath>
#include <limits>
#include <set>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/ggml_types.h"

namespace qf::quant::ggml::detail {
// Defined in quant/ggml_blocks.cpp: the elementwise ATen fake quant (q8_0/q4_0/q4_1) that
// fake_quant() uses for tensors off the CPU; exercised here on the CPU.
at::Tensor fake_quant_vectorized(const at::Tensor& w, Rule r);
}  // namespace qf::quant::ggml::detail

namespace {

using qf::quant::Rule;
namespace gg = qf::quant::ggml;

const std::vector<Rule> kRules = {Rule::GgmlQ8_0, Rule::GgmlQ4_0, Rule::GgmlQ4_1, Rule::GgmlQ5_0, Rule::GgmlQ5_1,
                                  Rule::GgmlQ2_K, Rule::GgmlQ3_K, Rule::GgmlQ4_K, Rule::GgmlQ5_K, Rule::GgmlQ6_K};

std::string name(Rule r) { return gg::rule_label(r); }

// Bitwise equality of two float32 tensors (distinguishes -0.0 from +0.0, NaN payloads).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  return at::equal(a.contiguous().view(at::kInt), b.contiguous().view(at::kInt));
}

// Matrices that stress the rounding paths: normal, uniform, heavy outliers, zero rows, tiny values,
// repeated values (ties), and rows with exact .5 multiples.
std::vector<at::Tensor> sample_matrices(int64_t rows, int64_t cols) {
  at::manual_seed(1234);
  std::vector<at::Tensor> out;
  out.push_back(at::randn({rows, cols}));
  out.push_back(at::rand({rows, cols}).mul(6).sub(1));
  auto outl = at::randn({rows, cols}).mul(0.02);
  outl.view({-1}).index_put_({at::randint(rows * cols, {rows * cols / 97 + 1}, at::kLong)}, 40.0);
  outl.view({-1}).index_put_({at::randint(rows * cols, {rows * cols / 101 + 1}, at::kLong)}, -55.0);
  out.push_back(outl);
  auto zr = at::randn({rows, cols});
  zr.index_put_({at::arange(0, rows, 2)}, 0.0);
  out.push_back(zr);
  out.push_back(at::randn({rows, cols}).mul(1e-6));
  out.push_back(at::randn({rows, cols}).mul(3e-9));
  out.push_back(at::randint(-8, 8, {rows, cols}).to(at::kFloat).mul(0.5));  // many ties
  out.push_back(at::randn({rows, cols}).exp());                             // all positive
  out.push_back(at::randn({rows, cols}).exp().neg());                       // all negative
  return out;
}

TEST(GgmlBlocks, SizesMatchGgmlCommon) {
  EXPECT_EQ(gg::block_size(Rule::GgmlQ8_0), 32);
  EXPECT_EQ(gg::block_size(Rule::GgmlQ4_0), 32);
  EXPECT_EQ(gg::block_size(Rule::GgmlQ4_1), 32);
  for (Rule r : {Rule::GgmlQ2_K, Rule::GgmlQ3_K, Rule::GgmlQ4_K, Rule::GgmlQ5_K, Rule::GgmlQ6_K})
    EXPECT_EQ(gg::block_size(r), 256) << name(r);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ8_0), 34);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ4_0), 18);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ4_1), 20);
  // sizeof(block_q2_K) .. sizeof(block_q6_K) in ggml-common.h
  EXPECT_EQ(gg::type_size(Rule::GgmlQ2_K), 84);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ3_K), 110);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ4_K), 144);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ5_K), 176);
  EXPECT_EQ(gg::type_size(Rule::GgmlQ6_K), 210);
  EXPECT_THROW(gg::block_size(Rule::Affine), qf::Error);
}

// The one type table (quant/ggml_types.h): unique names and GGUF ids, a row for every block rule, and
// each codec's output width follows the row (what gguf_writer checks tensors against).
TEST(GgmlBlocks, TypeTableIsTheOneDefinition) {
  std::set<std::string> names;
  std::set<uint32_t> ids;
  for (const auto& t : gg::type_table()) {
    EXPECT_TRUE(names.insert(t.name).second) << t.name;
    EXPECT_TRUE(ids.insert(t.gguf_id).second) << t.name;
    EXPECT_EQ(gg::traits_by_name(t.name), &t);
    EXPECT_EQ(gg::traits_by_gguf_id(t.gguf_id), &t);
    std::string upper = t.ggml_name;
    for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    EXPECT_EQ(upper, t.gguf_name);
    if (t.rule == Rule::Affine) continue;
    EXPECT_EQ(&gg::traits(t.rule), &t);
    EXPECT_EQ(gg::block_size(t.rule), t.block);
    EXPECT_EQ(gg::type_size(t.rule), t.bytes);
    auto w = at::randn({3, 2 * t.block});
    EXPECT_EQ(gg::quantize(w, t.rule).size(1), 2 * t.bytes) << t.name;
    EXPECT_EQ(qf::quant::QuantSpec::preset_named(t.name).rule, t.rule) << t.name;
  }
  for (Rule r : kRules) EXPECT_NO_THROW(gg::traits(r));
  EXPECT_EQ(gg::traits_by_name("iq2_xxs"), nullptr);
}

TEST(GgmlBlocks, FakeQuantEqualsDequantOfQuantBitForBit) {
  for (Rule r : kRules) {
    for (const auto& w : sample_matrices(12, 512)) {
      auto blocks = gg::quantize(w, r);
      ASSERT_EQ(blocks.scalar_type(), at::kByte);
      ASSERT_EQ(blocks.size(0), 12);
      ASSERT_EQ(blocks.size(1), 512 / gg::block_size(r) * gg::type_size(r));
      auto deq = gg::dequantize(blocks, r, 512);
      auto fq = gg::fake_quant(w, r);
      EXPECT_EQ(fq.scalar_type(), at::kFloat);
      EXPECT_TRUE(same_bits(fq, deq)) << name(r);
      // Deterministic: a second call gives the same bits.
      EXPECT_TRUE(same_bits(gg::fake_quant(w, r), fq)) << name(r);
    }
  }
}

TEST(GgmlBlocks, VectorisedPathEqualsBlockLoop) {
  for (Rule r : {Rule::GgmlQ8_0, Rule::GgmlQ4_0, Rule::GgmlQ4_1}) {
    for (const auto& w : sample_matrices(16, 256)) {
      auto loop = gg::dequantize(gg::quantize(w, r), r, 256);
      auto vec = gg::detail::fake_quant_vectorized(w, r);
      EXPECT_TRUE(same_bits(vec, loop)) << name(r) << " max diff " << (vec - loop).abs().max().item<float>();
    }
  }
}

TEST(GgmlBlocks, Q4_0HandComputedBlock) {
  // Block 0: the first largest |x| is +4 (the -4 after it loses the tie), so d = 4/-8 = -0.5 and
  // id = -2. q = min(15, (int8)(x*id + 8.5)): 4 -> 0; -4 -> 16 -> clamped 15; -3.9 -> 16.3 -> 15;
  // 1 -> 6; 0.25 -> 8; 0.26 -> 7.98 -> 7; -0.25 -> 9; 0 -> 8.
  // Block 1: the largest |x| is -2 (signed), d = 0.25: -2 -> 0, 1 -> 12, 2 -> 16 -> 15.
  std::vector<float> v(64, 0.0f);
  v[0] = 4.0f, v[1] = -4.0f, v[2] = -3.9f, v[3] = 1.0f, v[4] = 0.25f, v[5] = 0.26f, v[6] = -0.25f;
  v[32] = -2.0f, v[33] = 1.0f, v[34] = 2.0f;
  auto w = at::from_blob(v.data(), {1, 64}, at::kFloat).clone();
  auto b = gg::quantize(w, Rule::GgmlQ4_0);
  ASSERT_EQ(b.size(1), 36);
  const uint8_t* p = b.data_ptr<uint8_t>();
  // fp16(-0.5) = 0xB800, little endian; qs[j] = q[j] | q[j+16] << 4 and q[j+16] = 8 (zeros).
  std::vector<int> want0 = {0x00, 0xB8, 0x80, 0x8F, 0x8F, 0x86, 0x88, 0x87, 0x89};
  for (size_t i = 0; i < want0.size(); ++i) EXPECT_EQ(p[i], want0[i]) << "byte " << i;
  for (int i = 9; i < 18; ++i) EXPECT_EQ(p[i], 0x88) << "byte " << i;
  // fp16(0.25) = 0x3400.
  std::vector<int> want1 = {0x00, 0x34, 0x80, 0x8C, 0x8F};
  for (size_t i = 0; i < want1.size(); ++i) EXPECT_EQ(p[18 + i], want1[i]) << "block 1 byte " << i;

  auto fq = gg::fake_quant(w, Rule::GgmlQ4_0);
  const float* f = fq.data_ptr<float>();
  EXPECT_EQ(f[0], 4.0f);
  EXPECT_EQ(f[1], -3.5f);  // the q == 16 -> 15 clamp costs the tied negative end half a step
  EXPECT_EQ(f[2], -3.5f);
  EXPECT_EQ(f[3], 1.0f);
  EXPECT_EQ(f[4], 0.0f);
  EXPECT_TRUE(std::signbit(f[4]));  // (8 - 8) * -0.5 = -0.0, as ggml computes it
  EXPECT_EQ(f[5], 0.5f);
  EXPECT_EQ(f[6], -0.5f);
  EXPECT_EQ(f[32], -2.0f);
  EXPECT_EQ(f[33], 1.0f);
  EXPECT_EQ(f[34], 1.75f);
}

TEST(GgmlBlocks, Q8_0RoundsHalvesAwayFromZero) {
  // amax = 127 gives d = 1 and id = 1, so x*id is x itself: roundf(2.5) = 3 (not 2), roundf(-2.5) = -3.
  std::vector<float> v(32, 0.0f);
  v[0] = 127.0f, v[1] = 0.5f, v[2] = -0.5f, v[3] = 1.5f, v[4] = 2.5f, v[5] = -2.5f, v[6] = 0.49999997f,
  v[7] = -126.5f, v[8] = -0.3f;
  auto w = at::from_blob(v.data(), {1, 32}, at::kFloat).clone();
  auto b = gg::quantize(w, Rule::GgmlQ8_0);
  const uint8_t* p = b.data_ptr<uint8_t>();
  EXPECT_EQ(p[0], 0x00);
  EXPECT_EQ(p[1], 0x3C);  // fp16(1.0)
  std::vector<int> want = {127, 1, -1, 2, 3, -3, 0, -127, 0};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(static_cast<int8_t>(p[2 + i]), want[i]) << "q " << i;
  auto fq = gg::fake_quant(w, Rule::GgmlQ8_0);
  const float* f = fq.data_ptr<float>();
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(f[i], static_cast<float>(want[i])) << i;
  EXPECT_FALSE(std::signbit(f[8]));  // int8 0 times d is +0 even though -0.3 rounds to -0
  auto vec = gg::detail::fake_quant_vectorized(w, Rule::GgmlQ8_0);
  EXPECT_TRUE(same_bits(vec, fq));
}

TEST(GgmlBlocks, AllZeroBlocks) {
  auto w = at::zeros({3, 256});
  for (Rule r : kRules) {
    auto b = gg::quantize(w, r);
    auto fq = gg::fake_quant(w, r);
    EXPECT_TRUE(at::all(fq.eq(0)).item<bool>()) << name(r);
    EXPECT_TRUE(same_bits(fq, gg::dequantize(b, r, 256))) << name(r);
    const uint8_t* p = b.data_ptr<uint8_t>();
    if (r == Rule::GgmlQ4_0) {
      // max stays +0, d = 0/-8 = -0.0 (fp16 0x8000), every q = (int8)(0 + 8.5) = 8.
      for (int64_t blk = 0; blk < b.numel() / 18; ++blk) {
        EXPECT_EQ(p[blk * 18], 0x00);
        EXPECT_EQ(p[blk * 18 + 1], 0x80);
        for (int j = 2; j < 18; ++j) EXPECT_EQ(p[blk * 18 + j], 0x88);
      }
    } else if (r == Rule::GgmlQ5_0) {
      // d = -0.0 again, every q = (int8)(0 + 16.5) = 16: low nibbles 0, every fifth bit set in qh.
      for (int64_t blk = 0; blk < b.numel() / 22; ++blk) {
        EXPECT_EQ(p[blk * 22], 0x00);
        EXPECT_EQ(p[blk * 22 + 1], 0x80);
        for (int j = 2; j < 6; ++j) EXPECT_EQ(p[blk * 22 + j], 0xFF);
        for (int j = 6; j < 22; ++j) EXPECT_EQ(p[blk * 22 + j], 0x00);
      }
    } else {
      EXPECT_TRUE(at::all(b.eq(0)).item<bool>()) << name(r);
    }
  }
}

TEST(GgmlBlocks, KQuantErrorBounds) {
  for (const auto& w : sample_matrices(8, 1024)) {
    // Values near 1e-6 and below underflow the fp16 super-block scales (to zero or subnormals);
    // the bounds below are about the grid, so only matrices in fp16's normal range take part.
    if (w.abs().max().item<float>() < 1e-3) continue;
    auto blocks = w.view({-1, 256});
    auto range = (blocks.amax(-1, true) - blocks.amin(-1, true));
    auto amax = blocks.abs().amax(-1, true);
    // q4_K: 15 levels per sub-block with 6-bit scales/mins and a fitted (not min/max) grid whose
    // end levels may clamp: about one step of the super-block's range at worst (measured up to
    // 1.01 * range/15 on the interop matrices), so range/12 leaves a margin.
    auto e4 = (gg::fake_quant(w, Rule::GgmlQ4_K).view({-1, 256}) - blocks).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e4.le(range / 12 + 1e-30)).item<bool>())
        << "q4_k worst err/(range/15) " << (e4 / range.clamp_min(1e-30)).max().item<float>() * 15;
    // q6_K: 64 levels, 8-bit sub-block scales: within a step of amax/32.
    // q5_K: 31 levels, otherwise as q4_K.
    auto e5 = (gg::fake_quant(w, Rule::GgmlQ5_K).view({-1, 256}) - blocks).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e5.le(range / 24 + 1e-30)).item<bool>())
        << "q5_k worst err/(range/31) " << (e5 / range.clamp_min(1e-30)).max().item<float>() * 31;
    // q3_K: 8 levels (-4..3) per sub-block of 16 with 6-bit signed scales: within a step of amax/4
    // (the clamp at +3 of a positive maximum costs one more step).
    auto e3 = (gg::fake_quant(w, Rule::GgmlQ3_K).view({-1, 256}) - blocks).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e3.le(amax / 2 + 1e-30)).item<bool>())
        << "q3_k worst err/amax " << (e3 / amax.clamp_min(1e-30)).max().item<float>();
    // q2_K: 4 levels with 4-bit scales and mins: about one step of the range (range/3).
    auto e2 = (gg::fake_quant(w, Rule::GgmlQ2_K).view({-1, 256}) - blocks).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e2.le(range / 2 + 1e-30)).item<bool>())
        << "q2_k worst err/range " << (e2 / range.clamp_min(1e-30)).max().item<float>();
    auto e6 = (gg::fake_quant(w, Rule::GgmlQ6_K).view({-1, 256}) - blocks).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e6.le(amax / 32 + 1e-30)).item<bool>())
        << "q6_k worst ratio " << (e6 / amax.clamp_min(1e-30)).max().item<float>() * 32;
    // And the 32-blocks: q8_0 within half a step plus 127 * d's fp16 rounding (2^-11 relative),
    // q4_0 within one step (the q == 16 -> 15 clamp) plus 8 * d's fp16 rounding.
    auto b32 = w.view({-1, 32});
    auto am32 = b32.abs().amax(-1, true);
    auto e8 = (gg::fake_quant(w, Rule::GgmlQ8_0).view({-1, 32}) - b32).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e8.le(am32 / 127 * 0.6 + 1e-30)).item<bool>());
    auto e40 = (gg::fake_quant(w, Rule::GgmlQ4_0).view({-1, 32}) - b32).abs().amax(-1, true);
    EXPECT_TRUE(at::all(e40.le(am32 / 8 * 1.05 + 1e-30)).item<bool>());
  }
}

TEST(GgmlBlocks, KQuantLayoutDecodesScalesAndNibbles) {
  // A ramp per sub-block makes every sub-block use its full 0..15 (q4_K) / 0..63 (q6_K) range, so
  // any mix-up of scale packing or nibble order shows up as a large error.
  auto ramp = at::arange(256, at::kFloat).remainder(32).mul(at::arange(256, at::kFloat).div(32, "floor").add(1));
  auto w = ramp.view({1, 256}).sub(40);
  // The 16-element sub-blocks of q2_K / q3_K get a ramp of their own (each half of a 32-ramp).
  const float range = (w.max() - w.min()).item<float>();
  for (auto [r, levels] : {std::pair{Rule::GgmlQ2_K, 3}, {Rule::GgmlQ3_K, 7}, {Rule::GgmlQ4_K, 15},
                           {Rule::GgmlQ5_K, 31}, {Rule::GgmlQ6_K, 63}}) {
    auto fq = gg::fake_quant(w, r);
    EXPECT_LT((fq - w).abs().max().item<float>(), range / levels) << name(r);
  }
}

TEST(GgmlBlocks, ConvertsNonFloat32Input) {
  auto w = at::randn({4, 256});
  for (Rule r : kRules) {
    auto want = gg::quantize(w, r);
    EXPECT_TRUE(at::equal(gg::quantize(w.to(at::kDouble), r), want)) << name(r);
    auto wb = w.to(at::kBFloat16);
    EXPECT_TRUE(at::equal(gg::quantize(wb, r), gg::quantize(wb.to(at::kFloat), r))) << name(r);
    EXPECT_TRUE(same_bits(gg::fake_quant(w.to(at::kDouble), r), gg::fake_quant(w, r))) << name(r);
    // Non-contiguous input.
    auto wt = at::randn({256, 4}).t();
    EXPECT_TRUE(at::equal(gg::quantize(wt, r), gg::quantize(wt.contiguous(), r))) << name(r);
  }
}

TEST(GgmlBlocks, BadWidthNamesBothNumbers) {
  auto w = at::randn({2, 48});
  for (Rule r : {Rule::GgmlQ2_K, Rule::GgmlQ3_K, Rule::GgmlQ4_K, Rule::GgmlQ5_K, Rule::GgmlQ6_K}) {
    for (int which = 0; which < 3; ++which) {
      try {
        if (which == 0) gg::quantize(w, r);
        if (which == 1) gg::fake_quant(w, r);
        if (which == 2) gg::dequantize(at::zeros({2, 144}, at::kByte), r, 48);
        ADD_FAILURE() << "no error for width 48";
      } catch (const qf::Error& e) {
        std::string m = e.what();
        EXPECT_NE(m.find("48"), std::string::npos) << m;
        EXPECT_NE(m.find("256"), std::string::npos) << m;
      }
    }
  }
  try {
    gg::quantize(at::randn({2, 40}), Rule::GgmlQ8_0);
    ADD_FAILURE() << "no error for width 40";
  } catch (const qf::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("40"), std::string::npos) << m;
    EXPECT_NE(m.find("32"), std::string::npos) << m;
  }
  // Wrong byte count for the given width.
  EXPECT_THROW(gg::dequantize(at::zeros({2, 35}, at::kByte), Rule::GgmlQ8_0, 32), qf::Error);
  EXPECT_THROW(gg::dequantize(at::zeros({2, 34}, at::kFloat), Rule::GgmlQ8_0, 32), qf::Error);
  EXPECT_THROW(gg::quantize(at::randn({64}), Rule::GgmlQ8_0), qf::Error);
}

TEST(GgmlBlocks, ManyThreadsSameBytesAsOne) {
  auto w = at::randn({64, 512});
  for (Rule r : kRules) {
    auto many = gg::quantize(w, r);
    const int n = at::get_num_threads();
    at::set_num_threads(1);
    auto one = gg::quantize(w, r);
    at::set_num_threads(n);
    EXPECT_TRUE(at::equal(many, one)) << name(r);
  }
}

// Importance-weighted quantization (quantize(w, r, imatrix)): no imatrix is the reference path,
// q8_0 ignores the weights, and for every other type the weights do what they are for: the
// imatrix-weighted squared error falls when the imatrix is skewed to a few columns.
TEST(GgmlBlocks, ImatrixQuantizeWeightsTheError) {
  at::manual_seed(99);
  const int64_t rows = 32, cols = 1024;
  auto w = at::randn({rows, cols});
  auto imatrix = at::rand({cols}).pow(8).mul(100);  // a few columns carry most of the importance
  for (Rule r : kRules) {
    EXPECT_TRUE(at::equal(gg::quantize(w, r, at::Tensor()), gg::quantize(w, r))) << name(r);
    auto plain = gg::quantize(w, r);
    auto weighted = gg::quantize(w, r, imatrix);
    ASSERT_EQ(weighted.sizes(), plain.sizes()) << name(r);
    if (r == Rule::GgmlQ8_0) {
      EXPECT_TRUE(at::equal(weighted, plain));
      continue;
    }
    EXPECT_FALSE(at::equal(weighted, plain)) << name(r);
    auto err = [&](const at::Tensor& b) { return (gg::dequantize(b, r, cols) - w).pow(2).mul(imatrix).sum().item<double>(); };
    EXPECT_LT(err(weighted), err(plain)) << name(r);
    // Rows are independent: quantizing a slice gives that slice's bytes (with threads or without).
    EXPECT_TRUE(at::equal(gg::quantize(w.slice(0, 5, 9), r, imatrix), weighted.slice(0, 5, 9))) << name(r);
  }
}

TEST(GgmlBlocks, ImatrixIsChecked) {
  auto w = at::randn({2, 256});
  EXPECT_THROW(gg::quantize(w, Rule::GgmlQ4_K, at::ones({128})), qf::Error);      // not one per column
  EXPECT_THROW(gg::quantize(w, Rule::GgmlQ4_K, at::ones({2, 256})), qf::Error);   // not 1-D
  auto bad = at::ones({256});
  bad[7] = std::numeric_limits<float>::infinity();
  try {
    gg::quantize(w, Rule::GgmlQ3_K, bad);
    ADD_FAILURE() << "no error for a non-finite imatrix";
  } catch (const qf::Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
  }
}

}  // namespace
