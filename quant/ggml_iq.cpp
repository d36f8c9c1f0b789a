// IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, Q1_0, Q2_0 block codecs: llama.cpp 0c1e570 ggml/src/ggml-quants.c
// operation by operation (float32 arithmetic in the reference's order, fp16 conversion with
// round-to-nearest-even, nearest_int's 1.5*2^23 trick, lroundf / roundf half away from zero, the
// reference's integer wrap-arounds). Byte layouts: ggml-common.h's block_iq4_nl {fp16 d; u8 qs[16]},
// block_iq4_xs {fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}, block_tq1_0 {u8 qs[48]; u8 qh[4];
// fp16 d}, block_tq2_0 {u8 qs[64]; fp16 d}, block_q1_0 {fp16 d; u8 qs[16]}, block_q2_0 {fp16 d;
// u8 qs[16]}, little endian.
//
// Floating-point contraction stays off (no a*b+c fusing), as in quant/ggml_blocks.cpp: the reference
// is plain IEEE float32 operations.
#include "quant/ggml_iq.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "quant/ggml_scalar.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace qf::quant::ggml::iq {
namespace {

constexpr int kQKK = 256;               // QK_K
constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS

// kvalues_iq4nl (ggml-common.h): the 16 IQ4_NL / IQ4_XS levels; tests/interop/test_gguf_lowbit.py
// checks them against gguf-py's IQ4_NL.kvalues.
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// best_index_int8(16, kvalues_iq4nl, x): the nearest level, the upper one on a tie.
inline int best_index(float x) {
  const int8_t* val = kIq4Values;
  if (x <= val[0]) return 0;
  if (x >= val[15]) return 15;
  int ml = 0, mu = 15;
  while (mu - ml > 1) {
    const int mav = (ml + mu) / 2;
    if (x < val[mav]) mu = mav;
    else ml = mav;
  }
  return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

// quantize_row_iq4_nl_impl(super, 32, x, ..., kvalues_iq4nl, quant_weights, ntry = 7): per 32-value
// sub-block a weighted least-squares scale over the 15 candidate grids (itry in [-7, 7]); for IQ4_XS
// (super = 256) the sub-block scales then become 6-bit multiples of d = -max_scale/32 and the codes
// are re-chosen against them; for IQ4_NL (super = 32) against the one fp16-stored scale.
// Writes *dh, q4 (super/2 bytes), and for IQ4_XS scales_h (2 bytes LE) and scales_l (super/64 bytes).
void iq4_impl(int super, const float* x, uint8_t* dh, uint8_t* q4, uint8_t* scales_h, uint8_t* scales_l,
              const float* quant_weights) {
  constexpr int ntry = 7;
  constexpr int bs = 32;
  float scales[kQKK / bs];
  float weight[bs];
  uint8_t L[kQKK];

  float sigma2 = 0;
  for (int j = 0; j < super; ++j) sigma2 += x[j] * x[j];
  sigma2 *= 2.f / static_cast<float>(super);

  std::memset(q4, 0, super / 2);
  put_u16(dh, fp16_bits(0.f));

  float max_scale = 0, amax_scale = 0;
  for (int ib = 0; ib < super / bs; ++ib) {
    const float* xb = x + ib * bs;
    uint8_t* Lb = L + ib * bs;
    if (quant_weights) {
      const float* qw = quant_weights + ib * bs;
      for (int j = 0; j < bs; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    } else {
      for (int j = 0; j < bs; ++j) weight[j] = xb[j] * xb[j];
    }
    float amax = 0, max = 0;
    for (int j = 0; j < bs; ++j) {
      const float ax = std::fabs(xb[j]);
      if (ax > amax) {
        amax = ax;
        max = xb[j];
      }
    }
    if (amax < kGroupMaxEps) {
      scales[ib] = 0;
      continue;
    }
    float d = -max / static_cast<float>(kIq4Values[0]);  // ntry > 0
    float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < bs; ++j) {
      const float al = id * xb[j];
      const int l = best_index(al);
      Lb[j] = static_cast<uint8_t>(l);
      const float q = kIq4Values[l];
      const float w = weight[j];
      sumqx += w * q * xb[j];
      sumq2 += w * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int itry = -ntry; itry <= ntry; ++itry) {
      id = static_cast<float>(itry + kIq4Values[0]) / max;
      sumqx = sumq2 = 0;
      for (int j = 0; j < bs; ++j) {
        const float al = id * xb[j];
        const int l = best_index(al);
        const float q = kIq4Values[l];
        const float w = weight[j];
        sumqx += w * q * xb[j];
        sumq2 += w * q * q;
      }
      if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
        d = sumqx / sumq2;
        best = d * sumqx;
      }
    }
    scales[ib] = d;
    const float abs_d = std::fabs(d);
    if (abs_d > amax_scale) {
      amax_scale = abs_d;
      max_scale = d;
    }
  }

  if (super / bs > 1) {
    uint16_t sh = 0;
    const float d = -max_scale / 32;
    put_u16(dh, fp16_bits(d));
    const float id = d != 0.f ? 1 / d : 0.f;
    for (int ib = 0; ib < super / bs; ++ib) {
      int l = nearest_int(id * scales[ib]);
      l = std::max(-32, std::min(31, l));
      const float dl = d * static_cast<float>(l);
      const float idl = dl != 0.f ? 1 / dl : 0.f;
      uint8_t* Lb = L + ib * bs;
      const float* xb = x + ib * bs;
      for (int j = 0; j < bs; ++j) Lb[j] = static_cast<uint8_t>(best_index(idl * xb[j]));
      l += 32;
      const uint8_t l_l = static_cast<uint8_t>(l & 0xf);
      const uint8_t l_h = static_cast<uint8_t>(l >> 4);
      if (ib % 2 == 0) scales_l[ib / 2] = l_l;
      else scales_l[ib / 2] |= static_cast<uint8_t>(l_l << 4);
      sh = static_cast<uint16_t>(sh | (l_h << 2 * (ib % 8)));
    }
    put_u16(scales_h, sh);
  } else {
    put_u16(dh, fp16_bits(scales[0]));
    const float id = scales[0] != 0.f ? 1 / scales[0] : 0;
    for (int j = 0; j < super; ++j) L[j] = static_cast<uint8_t>(best_index(id * x[j]));
  }

  for (int i = 0; i < super / 32; ++i)
    for (int j = 0; j < 16; ++j) q4[16 * i + j] = static_cast<uint8_t>(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

// The ternary quantizers' absmax scale: d = amax, id = 1/d (0 for an all-zero block).
inline float absmax(const float* x, int n) {
  float amax = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float a = std::fabs(x[j]);
    amax = amax > a ? amax : a;  // MAX(amax, fabsf(v))
  }
  return amax;
}
// lroundf(v) + 1: -1, 0, 1 -> 0, 1, 2.
inline int trit(float v) { return static_cast<int>(std::lround(v)) + 1; }

// Base-3 packing of block_tq1_0: byte = ceil(t * 256 / 243) of the trits' base-3 number t (first
// trit most significant); decode trit n as ((uint8)(byte * 3^n) * 3) >> 8.
inline uint8_t tq1_pack(int q) { return static_cast<uint8_t>((static_cast<uint16_t>(q) * 256 + (243 - 1)) / 243); }
inline int tq1_trit(uint8_t byte, int n) {
  static constexpr uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
  const uint8_t q = static_cast<uint8_t>(byte * pow3[n]);
  return (static_cast<uint16_t>(q) * 3) >> 8;
}

}  // namespace

void quant_iq4_nl(const float* x, uint8_t* y) { iq4_impl(32, x, y, y + 2, nullptr, nullptr, nullptr); }

void quant_iq4_xs(const float* x, uint8_t* y) { iq4_impl(kQKK, x, y, y + 8, y + 2, y + 4, nullptr); }

void quant_row_iq4_nl_imatrix(const float* x, const float* qw, int64_t n, uint8_t* y) {
  for (int64_t b = 0; b < n / 32; ++b) iq4_impl(32, x + 32 * b, y + 18 * b, y + 18 * b + 2, nullptr, nullptr, qw + 32 * b);
}

void quant_row_iq4_xs_imatrix(const float* x, const float* qw, int64_t n, uint8_t* y) {
  for (int64_t b = 0; b < n / kQKK; ++b) {
    uint8_t* yb = y + 136 * b;
    iq4_impl(kQKK, x + kQKK * b, yb, yb + 8, yb + 2, yb + 4, qw + kQKK * b);
  }
}

void dequant_iq4_nl(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const uint8_t* qs = y + 2;
  for (int j = 0; j < 16; ++j) {
    x[j] = d * static_cast<float>(kIq4Values[qs[j] & 0xf]);
    x[j + 16] = d * static_cast<float>(kIq4Values[qs[j] >> 4]);
  }
}

void dequant_iq4_xs(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const uint16_t scales_h = get_u16(y + 2);
  const uint8_t* scales_l = y + 4;
  const uint8_t* qs = y + 8;
  for (int ib = 0; ib < kQKK / 32; ++ib) {
    const int ls = ((scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
    const float dl = d * static_cast<float>(ls - 32);
    for (int j = 0; j < 16; ++j) {
      x[j] = dl * static_cast<float>(kIq4Values[qs[j] & 0xf]);
      x[j + 16] = dl * static_cast<float>(kIq4Values[qs[j] >> 4]);
    }
    x += 32;
    qs += 16;
  }
}

// block_tq1_0: qs[0..31] hold values m + 32n (n = 0..4) of the first 160, qs[32..47] values
// 160 + m + 16n of the next 80, qh[0..3] values 240 + j + 4n (n = 0..3, the fifth trit slot zero).
void quant_tq1_0(const float* x, uint8_t* y) {
  uint8_t* qs = y;
  uint8_t* qh = y + 48;
  const float d = absmax(x, kQKK);
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_u16(y + 52, fp16_bits(d));
  for (int m = 0; m < 32; ++m) {
    int q = 0;
    for (int n = 0; n < 5; ++n) q = static_cast<uint8_t>(q * 3 + trit(x[m + n * 32] * id));
    qs[m] = tq1_pack(q);
  }
  x += 160;
  for (int m = 0; m < 16; ++m) {
    int q = 0;
    for (int n = 0; n < 5; ++n) q = static_cast<uint8_t>(q * 3 + trit(x[m + n * 16] * id));
    qs[32 + m] = tq1_pack(q);
  }
  x += 80;
  for (int j = 0; j < 4; ++j) {
    int q = 0;
    for (int m = 0; m < 4; ++m) q = static_cast<uint8_t>(q * 3 + trit(x[j + m * 4] * id));
    qh[j] = tq1_pack(static_cast<uint8_t>(q * 3));
  }
}

void dequant_tq1_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y + 52));
  for (int n = 0; n < 5; ++n)
    for (int m = 0; m < 32; ++m) *x++ = static_cast<float>(tq1_trit(y[m], n) - 1) * d;
  for (int n = 0; n < 5; ++n)
    for (int m = 0; m < 16; ++m) *x++ = static_cast<float>(tq1_trit(y[32 + m], n) - 1) * d;
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 4; ++j) *x++ = static_cast<float>(tq1_trit(y[48 + j], n) - 1) * d;
}

// block_tq2_0: byte 32c + m holds values 128c + m + 32n (n = 0..3) at bits 2n, as trit + 1.
void quant_tq2_0(const float* x, uint8_t* y) {
  const float d = absmax(x, kQKK);
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_u16(y + 64, fp16_bits(d));
  for (int c = 0; c < 2; ++c)
    for (int m = 0; m < 32; ++m) {
      int q = 0;
      for (int n = 0; n < 4; ++n) q += (trit(x[128 * c + m + n * 32] * id) & 3) << (2 * n);
      y[32 * c + m] = static_cast<uint8_t>(q);
    }
}

void dequant_tq2_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y + 64));
  for (int c = 0; c < 2; ++c)
    for (int n = 0; n < 4; ++n)
      for (int m = 0; m < 32; ++m) *x++ = static_cast<float>(((y[32 * c + m] >> (2 * n)) & 3) - 1) * d;
}

// block_q1_0: d = mean |x| over 128 values; bit j (LSB first) set when x[j] >= 0; x = +-d.
void quant_q1_0(const float* x, uint8_t* y) {
  float sum_abs = 0.0f;
  for (int j = 0; j < 128; ++j) sum_abs += std::fabs(x[j]);
  put_u16(y, fp16_bits(sum_abs / 128));
  std::memset(y + 2, 0, 16);
  for (int j = 0; j < 128; ++j)
    if (x[j] >= 0.0f) y[2 + j / 8] = static_cast<uint8_t>(y[2 + j / 8] | (1 << (j % 8)));
}

void dequant_q1_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  for (int j = 0; j < 128; ++j) x[j] = ((y[2 + j / 8] >> (j % 8)) & 1) ? d : -d;
}

// block_q2_0: d = amax over 64 values; code roundf(x/d) + 1 clamped to [0, 3] in 2 bits (LSB first);
// x = (code - 1) * d.
void quant_q2_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  for (int j = 0; j < 64; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax) amax = a;
  }
  const float id = amax > 0.0f ? 1.0f / amax : 0.0f;
  put_u16(y, fp16_bits(amax));
  std::memset(y + 2, 0, 16);
  for (int j = 0; j < 64; ++j) {
    const int q = std::max(0, std::min(3, static_cast<int>(std::roundf(x[j] * id)) + 1));
    y[2 + j / 4] = static_cast<uint8_t>(y[2 + j / 4] | (q << ((j % 4) * 2)));
  }
}

void dequant_q2_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  for (int j = 0; j < 64; ++j) x[j] = static_cast<float>(((y[2 + j / 4] >> ((j % 4) * 2)) & 3) - 1) * d;
}

namespace {
// The fp16 field at byte k as float32 [n_blocks, 1].
at::Tensor half_at(const at::Tensor& b, int64_t k) { return b.slice(1, k, k + 2).contiguous().view(at::kHalf).to(at::kFloat); }
// 4-bit codes of IQ4 bytes [n, 16 * s] -> level values float32 [n, s, 32] (low nibbles first).
at::Tensor iq4_levels(const at::Tensor& qs, int64_t s) {
  auto lut = at::tensor(std::vector<float>(kIq4Values, kIq4Values + 16), qs.options().dtype(at::kFloat));
  auto q = qs.reshape({-1, s, 16});
  return lut.take(at::cat({q.bitwise_and(15), q.bitwise_right_shift(4)}, 2).to(at::kLong));
}
// Bit fields of bytes [n, k]: field i of byte j (width w bits, LSB first) -> uint8 [n, k, 8 / w].
at::Tensor bit_fields(const at::Tensor& bytes, int w) {
  auto shifts = at::arange(0, 8, w, bytes.options().dtype(at::kLong)).to(at::kByte);
  return bytes.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and((1 << w) - 1);
}
// TQ1_0 trits of bytes [n, k]: trit t of each byte as uint8 [n, t, k] for t < trits.
at::Tensor tq1_trits(const at::Tensor& bytes, int trits) {
  std::vector<at::Tensor> out;
  auto wide = bytes.to(at::kInt);
  static constexpr int pow3[5] = {1, 3, 9, 27, 81};
  for (int n = 0; n < trits; ++n) out.push_back(wide.mul(pow3[n]).bitwise_and(255).mul(3).bitwise_right_shift(8));
  return at::stack(out, 1);
}
}  // namespace

at::Tensor dequantize_blocks_aten(const at::Tensor& b, Rule r) {
  const int64_t n = b.size(0);
  switch (r) {
    case Rule::GgmlIQ4_NL: return iq4_levels(b.slice(1, 2, 18), 1).reshape({n, 32}).mul(half_at(b, 0));
    case Rule::GgmlIQ4_XS: {
      // 6-bit sub-block scale ls: low nibble from scales_l[ib / 2] (low half for even ib), top 2
      // bits from scales_h >> 2 ib; dl = d * (ls - 32).
      auto lo = bit_fields(b.slice(1, 4, 8), 4).reshape({n, 8}).to(at::kInt);
      auto hi = bit_fields(b.slice(1, 2, 4), 2).reshape({n, 8}).to(at::kInt);
      auto dl = half_at(b, 0).mul(lo.bitwise_or(hi.bitwise_left_shift(4)).sub(32).to(at::kFloat));
      return dl.unsqueeze(-1).mul(iq4_levels(b.slice(1, 8, 136), 8)).reshape({n, kQKK});
    }
    case Rule::GgmlTQ1_0: {
      auto a = tq1_trits(b.slice(1, 0, 32), 5).reshape({n, 160});
      auto c = tq1_trits(b.slice(1, 32, 48), 5).reshape({n, 80});
      auto h = tq1_trits(b.slice(1, 48, 52), 4).reshape({n, 16});
      return at::cat({a, c, h}, 1).sub(1).to(at::kFloat).mul(half_at(b, 52));
    }
    case Rule::GgmlTQ2_0: {
      // [n, 2, 32, 4] fields -> value order (chunk, field, byte).
      auto q = bit_fields(b.slice(1, 0, 64).reshape({n, 2, 32}), 2).permute({0, 1, 3, 2}).reshape({n, kQKK});
      return q.to(at::kFloat).sub(1).mul(half_at(b, 64));
    }
    case Rule::GgmlQ1_0: {
      auto d = half_at(b, 0);
      auto bit = bit_fields(b.slice(1, 2, 18), 1).reshape({n, 128});
      return at::where(bit.eq(1), d, d.neg());
    }
    case Rule::GgmlQ2_0:
      return bit_fields(b.slice(1, 2, 18), 2).reshape({n, 64}).to(at::kFloat).sub(1).mul(half_at(b, 0));
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "ggml iq dequantize_blocks_aten: not one of this file's rules");
}

}  // namespace qf::quant::ggml::iq
