// llama.cpp (ggml) block formats: q8_0, q4_0, q4_1, q5_0, q5_1, q2_K, q3_K, q4_K, q5_K, q6_K.
//
// Every block routine below follows llama.cpp ggml/src/ggml-quants.c at 0c1e570 (quantize_row_*_ref,
// the importance-weighted quantize_row_*_impl, dequantize_row_*, make_qkx2_quants / make_qkx3_quants,
// make_qx_quants, make_q3_quants, make_qp_quants, nearest_int, get_scale_min_k4) operation by
// operation: float32 arithmetic in the same order, fp16 conversion with round-to-nearest-even
// (c10::Half == GGML_FP32_TO_FP16), nearest_int's 1.5*2^23 trick (round half to even), roundf for
// q8_0 (half away from zero) and (int8_t) truncation of x*id + 8.5f / + 0.5f for q4_0 / q4_1.
// The block byte layouts are ggml-common.h's block_q8_0 / q4_0 / q4_1 / q5_0 / q5_1 / q2_K / q3_K /
// q4_K / q5_K / q6_K (little endian).
//
// Floating-point contraction must stay off in this file (no -ffast-math, no FMA fusing of a*b+c):
// the reference is plain IEEE float32 operations, which is also what gguf-py's numpy code computes.
// The pragmas below pin that even if the build adds -march=native / -mfma (measured: with GCC's
// default -ffp-contract=fast and -march=native, 86 of 152 test matrices got different K-quant bytes).
#include "quant/ggml_blocks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"
#include "quant/cuda/dequant.h"
#include "quant/ggml_iq.h"
#include "quant/ggml_scalar.h"
#include "quant/ggml_types.h"

// -Wpsabi: the lane vectors below only pass between internal (inlined) helpers, so the vector-ABI
// note does not apply.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace qf::quant::ggml {
namespace {

constexpr int kQK = 32;    // QK8_0 == QK4_0 == QK4_1
constexpr int kQKK = 256;  // QK_K
constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS

// ---------------------------------------------------------------- q8_0: {fp16 d; int8 qs[32]}

// The signed value of the first element with the largest |x| (q4_0 / q5_0 / q3_K scales from it);
// that |x| in *amax_out when given.
inline float signed_absmax(const float* x, int n = kQK, float* amax_out = nullptr) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float a = std::fabs(x[j]);
    if (amax < a) {
      amax = a;
      max = x[j];
    }
  }
  if (amax_out) *amax_out = amax;
  return max;
}

void quant_q8_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  for (int j = 0; j < kQK; ++j) {
    const float v = x[j] * id;
    y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v)));
  }
}

void dequant_q8_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  for (int j = 0; j < kQK; ++j) x[j] = static_cast<float>(static_cast<int8_t>(y[2 + j])) * d;
}

// ---------------------------------------------------------------- q4_0: {fp16 d; uint8 qs[16]}

void quant_q4_0(const float* x, uint8_t* y) {
  const float d = signed_absmax(x) / -8;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  for (int j = 0; j < kQK / 2; ++j) {
    const float lo = x[j] * id;
    const float hi = x[j + kQK / 2] * id;
    const int qlo = std::min(15, static_cast<int>(static_cast<int8_t>(lo + 8.5f)));
    const int qhi = std::min(15, static_cast<int>(static_cast<int8_t>(hi + 8.5f)));
    y[2 + j] = static_cast<uint8_t>(qlo | (qhi << 4));
  }
}

void dequant_q4_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  for (int j = 0; j < kQK / 2; ++j) {
    const int lo = (y[2 + j] & 0x0F) - 8;
    const int hi = (y[2 + j] >> 4) - 8;
    x[j] = static_cast<float>(lo) * d;
    x[j + kQK / 2] = static_cast<float>(hi) * d;
  }
}

// ---------------------------------------------------------------- q5_0 / q5_1
// {fp16 d; uint8 qh[4]; uint8 qs[16]} / {fp16 d, m; uint8 qh[4]; uint8 qs[16]}: low nibbles as in
// q4_0/q4_1 (element j low, j+16 high), the fifth bits of elements 0..31 in the 32-bit qh.

inline void put_q5(const int* q, uint8_t* qh, uint8_t* qs) {
  uint32_t h = 0;
  for (int j = 0; j < kQK / 2; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + kQK / 2] & 0x0F) << 4));
    h |= static_cast<uint32_t>((q[j] & 0x10) >> 4) << j;
    h |= static_cast<uint32_t>((q[j + kQK / 2] & 0x10) >> 4) << (j + kQK / 2);
  }
  std::memcpy(qh, &h, 4);
}

inline void get_q5(const uint8_t* qh, const uint8_t* qs, int* q) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int j = 0; j < kQK / 2; ++j) {
    q[j] = (qs[j] & 0x0F) | static_cast<int>(((h >> j) << 4) & 0x10);
    q[j + kQK / 2] = (qs[j] >> 4) | static_cast<int>((h >> (j + 12)) & 0x10);
  }
}

void quant_q5_0(const float* x, uint8_t* y) {
  const float d = signed_absmax(x) / -16;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  int q[kQK];
  for (int j = 0; j < kQK; ++j) q[j] = std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * id + 16.5f)));
  put_q5(q, y + 2, y + 6);
}

void dequant_q5_0(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  int q[kQK];
  get_q5(y + 2, y + 6, q);
  for (int j = 0; j < kQK; ++j) x[j] = static_cast<float>(q[j] - 16) * d;
}

void quant_q5_1(const float* x, uint8_t* y) {
  float min = x[0], max = x[0];
  for (int j = 1; j < kQK; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / 31;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  put_u16(y + 2, fp16_bits(min));
  int q[kQK];
  for (int j = 0; j < kQK; ++j) q[j] = static_cast<uint8_t>((x[j] - min) * id + 0.5f);
  put_q5(q, y + 4, y + 8);
}

void dequant_q5_1(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const float m = fp16_value(get_u16(y + 2));
  int q[kQK];
  get_q5(y + 4, y + 8, q);
  for (int j = 0; j < kQK; ++j) x[j] = static_cast<float>(q[j]) * d + m;
}

// ---------------------------------------------------------------- q4_1: {fp16 d, m; uint8 qs[16]}

void quant_q4_1(const float* x, uint8_t* y) {
  float min = std::numeric_limits<float>::max();
  float max = -std::numeric_limits<float>::max();
  for (int j = 0; j < kQK; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / 15;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  put_u16(y + 2, fp16_bits(min));
  for (int j = 0; j < kQK / 2; ++j) {
    const float lo = (x[j] - min) * id;
    const float hi = (x[j + kQK / 2] - min) * id;
    const int qlo = std::min(15, static_cast<int>(static_cast<int8_t>(lo + 0.5f)));
    const int qhi = std::min(15, static_cast<int>(static_cast<int8_t>(hi + 0.5f)));
    y[4 + j] = static_cast<uint8_t>(qlo | (qhi << 4));
  }
}

void dequant_q4_1(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const float m = fp16_value(get_u16(y + 2));
  for (int j = 0; j < kQK / 2; ++j) {
    const int lo = y[4 + j] & 0x0F;
    const int hi = y[4 + j] >> 4;
    x[j] = static_cast<float>(lo) * d + m;
    x[j + kQK / 2] = static_cast<float>(hi) * d + m;
  }
}

// ---------------------------------------------------------------- K-quant fits
// The K-quant fits below run all sub-blocks of a super-block (or, for the importance-weighted
// 32-blocks, 8 blocks of a row) in lockstep, one SIMD lane per sub-block (GCC/Clang vector
// extensions: plain elementwise IEEE float32 / int32 operations, so every lane computes exactly what
// the reference's scalar code computes for its sub-block, in the same order; only independent
// sub-blocks share an instruction).
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <class F, class I>
inline I nearest_int_v(const F& x) {  // nearest_int lane by lane
  const F biased = x + 12582912.f;
  I bits;
  std::memcpy(&bits, &biased, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}
template <class F, class I>
inline F fabs_v(const F& x) {
  I bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = bits & 0x7fffffff;
  F out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
template <class I>
inline I clamp_v(const I& v, int lo, int hi) {
  const I vlo = I{} + lo, vhi = I{} + hi;
  const I l = v < vlo ? vlo : v;
  return l > vhi ? vhi : l;
}
template <class F, class I>
inline F to_float_v(const I& v) {
  return __builtin_convertvector(v, F);
}

// Parameters of make_qkx2_quants / make_qkx3_quants (the affine grid fit: scale and min <= 0).
struct AffineFit {
  int nmax;
  float rmin, rdelta;
  int nstep;
  bool use_mad;     // weighted |error| instead of weighted error^2 (q2_K's reference)
  bool flat_if_le;  // make_qkx3_quants returns early on max <= min, make_qkx2_quants on max == min
};

// make_qkx2_quants(N, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) (and
// make_qkx3_quants with weights, which differs only in its early-return test) for one sub-block per
// lane: weighted least-squares fit of an affine grid (scale, min <= 0) trying nstep + 1 candidate
// iscales. Lane s is sub-block s: xt[i][s] = x[N*s + i], wt likewise. Writes L (sub-block-major),
// each sub-block's scale (the return value) and the_min (= -min).
template <class F, class I, int N>
void fit_affine_lanes(const F (&xt)[N], const F (&wt)[N], const AffineFit& p, uint8_t* L, float* scales,
                      float* the_mins) {
  constexpr int kLanes = sizeof(F) / sizeof(float);
  F lo = xt[0], hi = xt[0];
  F sum_w = wt[0];
  F sum_x = sum_w * xt[0];
  for (int i = 1; i < N; ++i) {
    lo = xt[i] < lo ? xt[i] : lo;
    hi = xt[i] > hi ? xt[i] : hi;
    sum_w += wt[i];
    sum_x += wt[i] * xt[i];
  }
  const F zero{};
  lo = lo > zero ? zero : lo;
  const I flat = p.flat_if_le ? I(hi <= lo) : I(hi == lo);  // the reference returns scale 0, L = 0
  const F lo0 = lo;
  auto error_of = [&](const F& diff) { return p.use_mad ? fabs_v<F, I>(diff) : diff * diff; };
  F iscale = static_cast<float>(p.nmax) / (hi - lo);
  F scale = 1 / iscale;
  F best_error{};
  I Lt[N], Laux[N];
  for (int i = 0; i < N; ++i) {
    Lt[i] = clamp_v(nearest_int_v<F, I>(iscale * (xt[i] - lo)), 0, p.nmax);
    const F diff = scale * to_float_v<F, I>(Lt[i]) + lo - xt[i];
    best_error += wt[i] * error_of(diff);
  }
  for (int is = 0; is <= p.nstep; ++is) {
    // lo is the best min so far: the reference re-centres the grid after each accepted candidate.
    iscale = (p.rmin + p.rdelta * static_cast<float>(is) + static_cast<float>(p.nmax)) / (hi - lo);
    F sum_l{}, sum_l2{}, sum_xl{};
    for (int i = 0; i < N; ++i) {
      Laux[i] = clamp_v(nearest_int_v<F, I>(iscale * (xt[i] - lo)), 0, p.nmax);
      const F fl = to_float_v<F, I>(Laux[i]);
      sum_l += wt[i] * fl;
      sum_l2 += wt[i] * fl * fl;
      sum_xl += wt[i] * fl * xt[i];
    }
    const F D = sum_w * sum_l2 - sum_l * sum_l;
    F this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    const I pos_min = this_min > zero;
    this_scale = pos_min ? sum_xl / sum_l2 : this_scale;
    this_min = pos_min ? zero : this_min;
    F cur_error{};
    for (int i = 0; i < N; ++i) {
      const F diff = this_scale * to_float_v<F, I>(Laux[i]) + this_min - xt[i];
      cur_error += wt[i] * error_of(diff);
    }
    const I take = (D > zero) & (cur_error < best_error);  // lanes with D <= 0 skip the candidate
    best_error = take ? cur_error : best_error;
    scale = take ? this_scale : scale;
    lo = take ? this_min : lo;
    for (int i = 0; i < N; ++i) Lt[i] = take ? Laux[i] : Lt[i];
  }
  for (int s = 0; s < kLanes; ++s) {
    scales[s] = flat[s] ? 0.f : scale[s];
    the_mins[s] = flat[s] ? -lo0[s] : -lo[s];
    for (int i = 0; i < N; ++i) L[N * s + i] = flat[s] ? 0 : static_cast<uint8_t>(Lt[i][s]);
  }
}

// make_qx_quants(N, nmax, x, L, rmse_type = 1, qw) for one sub-block per lane (lane s: xt[i][s] =
// x[N*s + i]): symmetric grid, weights qw (wt) or x^2 (wt == nullptr), trying iscale =
// -(nmax + 0.1*is)/max for is in [-9, 9]. L (sub-block-major) gets l + nmax; returns the scales.
template <class F, class I, int N>
void fit_symmetric_lanes(const F (&xt)[N], const F* wt, int nmax, int8_t* L, float* scales) {
  constexpr int kLanes = sizeof(F) / sizeof(float);
  F max{}, amax{};
  for (int i = 0; i < N; ++i) {
    const F ax = fabs_v<F, I>(xt[i]);
    const I bigger = ax > amax;
    amax = bigger ? ax : amax;
    max = bigger ? xt[i] : max;
  }
  auto weight = [&](int i) { return wt ? wt[i] : xt[i] * xt[i]; };
  F iscale = static_cast<float>(-nmax) / max;
  F sumlx{}, suml2{};
  I Lt[N], Laux[N];
  for (int i = 0; i < N; ++i) {
    const I l = clamp_v(nearest_int_v<F, I>(iscale * xt[i]), -nmax, nmax - 1);
    Lt[i] = l + nmax;
    const F w = weight(i);
    const F fl = to_float_v<F, I>(l);
    sumlx += w * xt[i] * fl;
    suml2 += w * fl * fl;
  }
  const F zero{};
  F scale = suml2 != zero ? sumlx / suml2 : zero;
  F best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = zero;
    for (int i = 0; i < N; ++i) {
      const I l = clamp_v(nearest_int_v<F, I>(iscale * xt[i]), -nmax, nmax - 1);
      Laux[i] = l + nmax;  // the levels the reference recomputes when it takes this iscale
      const F w = weight(i);
      const F fl = to_float_v<F, I>(l);
      sumlx += w * xt[i] * fl;
      suml2 += w * fl * fl;
    }
    const I take = (suml2 > zero) & (sumlx * sumlx > best * suml2);
    const F new_scale = sumlx / suml2;
    scale = take ? new_scale : scale;
    best = take ? new_scale * sumlx : best;
    for (int i = 0; i < N; ++i) Lt[i] = take ? Laux[i] : Lt[i];
  }
  for (int s = 0; s < kLanes; ++s) {
    const bool all_zero = amax[s] < kGroupMaxEps;  // the reference returns 0 with L = 0 right away
    scales[s] = all_zero ? 0.f : scale[s];
    for (int i = 0; i < N; ++i) L[N * s + i] = all_zero ? 0 : static_cast<int8_t>(Lt[i][s]);
  }
}

// make_q3_quants(n, nmax, x, L, do_rmse = true): symmetric grid from the largest |x|, then up to 5
// rounds of coordinate descent on the x^2-weighted fit. L gets l + nmax; returns the scale.
float make_q3_quants(int n, int nmax, const float* x, int8_t* L) {
  float amax;
  const float max = signed_absmax(x, n, &amax);
  if (amax < kGroupMaxEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      const float li = static_cast<float>(L[i]);
      float slx = sumlx - w * x[i] * li;
      if (slx > 0) {
        float sl2 = suml2 - w * li * li;
        const int new_l = std::max(-nmax, std::min(nmax - 1, nearest_int(x[i] * sl2 / slx)));
        if (new_l != L[i]) {
          const float fl = static_cast<float>(new_l);
          slx += w * x[i] * fl;
          sl2 += w * fl * fl;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// make_qp_quants(n, nmax, x, L, quant_weights): the importance-weighted fit of non-negative values
// (sub-block scales or mins) to a grid 0..nmax, 9 candidate scales then up to 5 descent rounds.
float make_qp_quants(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  float iscale = static_cast<float>(nmax) / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * static_cast<float>(L[i]);
    best_mse += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * static_cast<float>(is) + static_cast<float>(nmax)) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * static_cast<float>(l);
      mse += w[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * static_cast<float>(l);
    suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float li = static_cast<float>(L[i]);
      float slx = sumlx - w[i] * x[i] * li;
      float sl2 = suml2 - w[i] * li * li;
      if (slx > 0 && sl2 > 0) {
        const int new_l = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          const float fl = static_cast<float>(new_l);
          slx += w[i] * x[i] * fl;
          sl2 += w[i] * fl * fl;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// The importance weights of a super-block's impl: qw[l] * sqrt(sigma2 + x[l]^2), with sigma2 =
// scale * sum(x^2) / 256 over the super-block (scale 1 for q2_K, 2 for q3_K/q4_K/q5_K).
float superblock_sigma2(const float* x, float scale) {
  float sum_x2 = 0;
  for (int l = 0; l < kQKK; ++l) sum_x2 += x[l] * x[l];
  return scale * sum_x2 / kQKK;
}

// Sub-block-major lanes: xt[i][s] = x[N*s + i]; with qw, wt[i][s] = qw * sqrt(sigma2 + x^2) and
// sw[s] = the sub-block's sum of weights (in order).
template <class F, int N>
void load_lanes(const float* x, F (&xt)[N]) {
  constexpr int kLanes = sizeof(F) / sizeof(float);
  for (int s = 0; s < kLanes; ++s)
    for (int i = 0; i < N; ++i) xt[i][s] = x[N * s + i];
}
template <class F, int N>
void load_imatrix_lanes(const float* x, const float* qw, float sigma2, F (&wt)[N], float* sw) {
  constexpr int kLanes = sizeof(F) / sizeof(float);
  for (int s = 0; s < kLanes; ++s) {
    float sum = 0;
    for (int i = 0; i < N; ++i) {
      const float v = x[N * s + i];
      const float w = qw[N * s + i] * std::sqrt(sigma2 + v * v);
      wt[i][s] = w;
      sum += w;
    }
    sw[s] = sum;
  }
}

// A super-block's sub-blocks in lanes with their importance weights (sigma2 from superblock_sigma2).
template <class F, int N>
void load_superblock_imatrix(const float* x, const float* qw, float sigma_scale, F (&xt)[N], F (&wt)[N], float* sw) {
  load_lanes(x, xt);
  load_imatrix_lanes(x, qw, superblock_sigma2(x, sigma_scale), wt, sw);
}

// Two-bit codes of 256 values in 64 bytes (q2_K / q3_K qs): byte 32h + l holds elements
// 128h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7.
inline void pack_2bit(const uint8_t* L, uint8_t* qs) {
  for (int j = 0; j < kQKK; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}
inline int unpack_2bit(const uint8_t* qs, int e) { return (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3; }

// ---------------------------------------------------------------- q2_K
// {uint8 scales[16]; uint8 qs[64]; fp16 d, dmin}: 16 sub-blocks of 16, x = d*(sc&15)*q - dmin*(sc>>4).

// Shared tail of quantize_row_q2_K_ref / _impl: re-quantize against the rounded scales (scales[],
// d, dmin already in y; a sub-block whose scale rounded to zero keeps the levels of its fit), pack.
void finish_q2_K(const float* x, uint8_t* L, uint8_t* y) {
  const float d_all = fp16_value(get_u16(y + 80));
  const float m_all = fp16_value(get_u16(y + 82));
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * static_cast<float>(y[j] & 0xF);
    if (d == 0.0f) continue;
    const float dm = m_all * static_cast<float>(y[j] >> 4);
    for (int ii = 0; ii < 16; ++ii) {
      const int l = nearest_int((x[16 * j + ii] + dm) / d);
      L[16 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
    }
  }
  pack_2bit(L, y + 16);
}

void quant_q2_K(const float* x, uint8_t* y) {
  constexpr float q4scale = 15.f;
  f32x16 xt[16], wt[16];
  load_lanes(x, xt);
  for (int i = 0; i < 16; ++i) wt[i] = fabs_v<f32x16, i32x16>(xt[i]);
  uint8_t L[kQKK];
  float scales[16], mins[16];
  fit_affine_lanes<f32x16, i32x16, 16>(xt, wt, {3, -0.5f, 0.1f, 15, true, false}, L, scales, mins);
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  if (max_scale > 0) {
    const float iscale = q4scale / max_scale;
    for (int j = 0; j < 16; ++j) y[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
    put_u16(y + 80, fp16_bits(max_scale / q4scale));
  } else {
    std::memset(y, 0, 16);
    put_u16(y + 80, fp16_bits(0.f));
  }
  if (max_min > 0) {
    const float iscale = q4scale / max_min;
    for (int j = 0; j < 16; ++j) y[j] = static_cast<uint8_t>(y[j] | (nearest_int(iscale * mins[j]) << 4));
    put_u16(y + 82, fp16_bits(max_min / q4scale));
  } else {
    put_u16(y + 82, fp16_bits(0.f));
  }
  finish_q2_K(x, L, y);
}

void quant_q2_K_imatrix(const float* x, const float* qw, uint8_t* y) {
  f32x16 xt[16], wt[16];
  float sw[16];
  load_superblock_imatrix(x, qw, 1.f, xt, wt, sw);
  uint8_t L[kQKK];
  float scales[16], mins[16];
  fit_affine_lanes<f32x16, i32x16, 16>(xt, wt, {3, -0.9f, 0.05f, 36, false, true}, L, scales, mins);
  uint8_t Ls[16], Lm[16];
  const float dm = make_qp_quants(16, 15, scales, Ls, sw);
  const float mm = make_qp_quants(16, 15, mins, Lm, sw);
  put_u16(y + 80, fp16_bits(dm));
  put_u16(y + 82, fp16_bits(mm));
  for (int j = 0; j < 16; ++j) y[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
  finish_q2_K(x, L, y);
}

void dequant_q2_K(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y + 80));
  const float min = fp16_value(get_u16(y + 82));
  for (int e = 0; e < kQKK; ++e) {
    const uint8_t sc = y[e / 16];
    const float dl = d * static_cast<float>(sc & 0xF), ml = min * static_cast<float>(sc >> 4);
    x[e] = dl * static_cast<float>(unpack_2bit(y + 16, e)) - ml;
  }
}

// ---------------------------------------------------------------- q3_K
// {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; fp16 d}: 16 sub-blocks of 16, x = d*(sc-32)*(q-4)
// with 6-bit sc (low nibbles in bytes 0-7, top 2 bits in bytes 8-11) and 3-bit q (low 2 bits in qs,
// the third bit of element 32k + l at bit k of hmask[l]).

// Writes sub-block j's 6-bit scale code l (0..63) into the 12 scale bytes (zeroed beforehand).
inline void put_q3_scale(int j, int l, uint8_t* s) {
  if (j < 8) s[j] = static_cast<uint8_t>(l & 0xF);
  else s[j - 8] = static_cast<uint8_t>(s[j - 8] | ((l & 0xF) << 4));
  s[j % 4 + 8] = static_cast<uint8_t>(s[j % 4 + 8] | ((l >> 4) << (2 * (j / 4))));
}
inline int get_q3_scale(int j, const uint8_t* s) {  // signed: code - 32
  const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
  return (lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
}

// Shared tail of quantize_row_q3_K_ref / _impl: re-quantize against the rounded scales, then the
// high bits into hmask and the low 2 bits into qs. L holds codes 0..7.
void finish_q3_K(const float* x, int8_t* L, uint8_t* y) {
  const float d_all = fp16_value(get_u16(y + 108));
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * static_cast<float>(get_q3_scale(j, y + 96));
    if (d == 0.0f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      const int l = nearest_int(x[16 * j + ii] / d);
      L[16 * j + ii] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
    }
  }
  uint8_t* hmask = y;
  std::memset(hmask, 0, 32);
  uint8_t low[kQKK];
  for (int j = 0; j < kQKK; ++j) {
    int l = L[j];
    if (l > 3) {
      hmask[j % 32] = static_cast<uint8_t>(hmask[j % 32] | (1 << (j / 32)));
      l -= 4;
    }
    low[j] = static_cast<uint8_t>(l);
  }
  pack_2bit(low, y + 32);
}

void quant_q3_K(const float* x, uint8_t* y) {
  int8_t L[kQKK];
  float scales[16];
  float max_scale = 0, amax = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
    const float scale = std::fabs(scales[j]);
    if (scale > amax) {
      amax = scale;
      max_scale = scales[j];
    }
  }
  uint8_t* s = y + 96;
  std::memset(s, 0, 12);
  if (max_scale != 0.0f) {
    const float iscale = -32.f / max_scale;
    for (int j = 0; j < 16; ++j) {
      const int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));  // int -> int8_t first, as ggml
      put_q3_scale(j, std::max<int>(-32, std::min<int>(31, l)) + 32, s);
    }
    put_u16(y + 108, fp16_bits(1 / iscale));
  } else {
    put_u16(y + 108, fp16_bits(0.f));
  }
  finish_q3_K(x, L, y);
}

void quant_q3_K_imatrix(const float* x, const float* qw, uint8_t* y) {
  f32x16 xt[16], wt[16];
  float sw[16];
  load_superblock_imatrix(x, qw, 2.f, xt, wt, sw);
  int8_t L[kQKK];
  float scales[16];
  fit_symmetric_lanes<f32x16, i32x16, 16>(xt, wt, 4, L, scales);
  // make_qx_quants(16, 32, scales, Ls, 1, sw): one problem, run in every lane, lane 0 kept.
  f32x16 st[16], swt[16];
  for (int i = 0; i < 16; ++i) {
    st[i] = f32x16{} + scales[i];
    swt[i] = f32x16{} + sw[i];
  }
  int8_t Ls[16 * 16];
  float d_block[16];
  fit_symmetric_lanes<f32x16, i32x16, 16>(st, swt, 32, Ls, d_block);
  uint8_t* s = y + 96;
  std::memset(s, 0, 12);
  for (int j = 0; j < 16; ++j) put_q3_scale(j, Ls[j], s);
  put_u16(y + 108, fp16_bits(d_block[0]));
  finish_q3_K(x, L, y);
}

void dequant_q3_K(const uint8_t* y, float* x) {
  const float d_all = fp16_value(get_u16(y + 108));
  for (int e = 0; e < kQKK; ++e) {
    const float dl = d_all * static_cast<float>(get_q3_scale(e / 16, y + 96));
    const int high = (y[e % 32] >> (e / 32)) & 1;
    x[e] = dl * static_cast<float>(unpack_2bit(y + 32, e) - (high ? 0 : 4));
  }
}

// ---------------------------------------------------------------- q4_K / q5_K
// {fp16 d, dmin; uint8 scales[12]; [q5_K: uint8 qh[32];] uint8 qs[128]}: 8 sub-blocks of 32,
// x = d*sc*q - dmin*m with 6-bit sc and m.

// get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 packed bytes.
inline void unpack_scale_min(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// The shared tail of quantize_row_q4_K / q5_K (_ref and _impl): pack the 6-bit scales ls and mins lm,
// store d and dmin as fp16, re-quantize against the rounded values (a sub-block whose scale rounded
// to zero keeps the levels of its fit), then the codes: q4_K's nibbles (each 32-byte chunk of qs:
// low nibbles = sub-block 2k, high = 2k+1) or q5_K's low nibbles plus fifth bits in qh.
template <int NMax>
void finish_q45_K(const float* x, const uint8_t* ls, const uint8_t* lm, float d_block, float m_block, uint8_t* L,
                  uint8_t* y) {
  uint8_t* packed = y + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      packed[j] = ls[j];
      packed[j + 4] = lm[j];
    } else {
      packed[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      packed[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
      packed[j] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
    }
  }
  const uint16_t d16 = fp16_bits(d_block), dmin16 = fp16_bits(m_block);
  put_u16(y, d16);
  put_u16(y + 2, dmin16);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    unpack_scale_min(j, packed, &sc, &m);
    const float d = fp16_value(d16) * static_cast<float>(sc);
    if (d == 0.0f) continue;
    const float dm = fp16_value(dmin16) * static_cast<float>(m);
    for (int ii = 0; ii < 32; ++ii) {
      const int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(NMax, l)));
    }
  }
  if (NMax == 15) {
    uint8_t* qs = y + 16;
    for (int j = 0; j < kQKK; j += 64, qs += 32)
      for (int l = 0; l < 32; ++l) qs[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  } else {
    uint8_t* qh = y + 16;
    uint8_t* ql = y + 48;
    std::memset(qh, 0, 32);
    for (int n = 0, shift = 0; n < kQKK; n += 64, shift += 2, ql += 32) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[n + j], l2 = L[n + j + 32];
        if (l1 > 15) l1 -= 16, qh[j] = static_cast<uint8_t>(qh[j] | (1 << shift));
        if (l2 > 15) l2 -= 16, qh[j] = static_cast<uint8_t>(qh[j] | (2 << shift));
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
  }
}

// quantize_row_q4_K_ref / q5_K_ref: make_qkx2_quants per sub-block weighted by av_x + |x| (av_x =
// the sub-block's rms), scales and mins to 6 bits against their maxima.
template <int NMax>
void quant_q45_K(const float* x, uint8_t* y) {
  f32x8 xt[32], wt[32];
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) {
      xt[l][j] = xs[l];
      wt[l][j] = av_x + std::fabs(xs[l]);
    }
  }
  uint8_t L[kQKK];
  float scales[8], mins[8];
  const AffineFit fit = NMax == 15 ? AffineFit{15, -1.f, 0.1f, 20, false, false} : AffineFit{31, -0.5f, 0.1f, 15, false, false};
  fit_affine_lanes<f32x8, i32x8, 32>(xt, wt, fit, L, scales, mins);
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    // int -> uint8_t wraps like the C assignment does, then the 63 clamp.
    ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
    lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
  }
  finish_q45_K<NMax>(x, ls, lm, max_scale / 63.f, max_min / 63.f, L, y);
}

// quantize_row_q4_K_impl / q5_K_impl with quant_weights: make_qkx3_quants weighted by the imatrix,
// then make_qp_quants fits the 6-bit scales and mins weighted by each sub-block's total weight.
template <int NMax>
void quant_q45_K_imatrix(const float* x, const float* qw, uint8_t* y) {
  f32x8 xt[32], wt[32];
  float sw[8];
  load_superblock_imatrix(x, qw, 2.f, xt, wt, sw);
  uint8_t L[kQKK];
  float scales[8], mins[8];
  fit_affine_lanes<f32x8, i32x8, 32>(xt, wt, {NMax, -0.9f, 0.05f, 36, false, true}, L, scales, mins);
  uint8_t ls[8], lm[8];
  const float d_block = make_qp_quants(8, 63, scales, ls, sw);
  const float m_block = make_qp_quants(8, 63, mins, lm, sw);
  finish_q45_K<NMax>(x, ls, lm, d_block, m_block, L, y);
}

void quant_q4_K(const float* x, uint8_t* y) { quant_q45_K<15>(x, y); }
void quant_q5_K(const float* x, uint8_t* y) { quant_q45_K<31>(x, y); }
void quant_q4_K_imatrix(const float* x, const float* qw, uint8_t* y) { quant_q45_K_imatrix<15>(x, qw, y); }
void quant_q5_K_imatrix(const float* x, const float* qw, uint8_t* y) { quant_q45_K_imatrix<31>(x, qw, y); }

void dequant_q4_K(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const float min = fp16_value(get_u16(y + 2));
  const uint8_t* packed = y + 4;
  const uint8_t* q = y + 16;
  int is = 0;
  for (int j = 0; j < kQKK; j += 64) {
    uint8_t sc, m;
    unpack_scale_min(is + 0, packed, &sc, &m);
    const float d1 = d * static_cast<float>(sc);
    const float m1 = min * static_cast<float>(m);
    unpack_scale_min(is + 1, packed, &sc, &m);
    const float d2 = d * static_cast<float>(sc);
    const float m2 = min * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) *x++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *x++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

void dequant_q5_K(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y));
  const float min = fp16_value(get_u16(y + 2));
  const uint8_t* packed = y + 4;
  const uint8_t* qh = y + 16;
  const uint8_t* ql = y + 48;
  for (int c = 0; c < 4; ++c, ql += 32) {
    for (int k = 0; k < 2; ++k) {
      uint8_t sc, m;
      unpack_scale_min(2 * c + k, packed, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = min * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) {
        const int q = (k ? ql[l] >> 4 : ql[l] & 0xF) + ((qh[l] >> (2 * c + k)) & 1 ? 16 : 0);
        *x++ = d1 * static_cast<float>(q) - m1;
      }
    }
  }
}

// ---------------------------------------------------------------- q6_K
// {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}: 16 sub-blocks of 16, x = d*sc*(q-32).

// quantize_row_q6_K_ref (qw == nullptr: make_qx_quants weighted by x^2) and quantize_row_q6_K_impl
// (weighted by the imatrix values qw themselves).
void quant_q6_K_weighted(const float* x, const float* qw, uint8_t* y) {
  int8_t L[kQKK];
  float scales[kQKK / 16];
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  uint8_t* sc = y + 192;  // int8 scales[16]
  uint8_t* dp = y + 208;

  f32x16 xt[16], wt[16];
  load_lanes(x, xt);
  if (qw) load_lanes(qw, wt);
  fit_symmetric_lanes<f32x16, i32x16, 16>(xt, qw ? wt : nullptr, 32, L, scales);
  float max_scale = 0;
  float max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    const float abs_scale = std::fabs(scales[ib]);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(y, 0, 210);
    put_u16(dp, fp16_bits(0.f));
    return;
  }
  const float iscale = -128.f / max_scale;
  const uint16_t d16 = fp16_bits(1 / iscale);
  put_u16(dp, d16);
  for (int ib = 0; ib < kQKK / 16; ++ib) {
    const int s = std::min(127, nearest_int(iscale * scales[ib]));
    sc[ib] = static_cast<uint8_t>(static_cast<int8_t>(s));
  }
  for (int j = 0; j < kQKK / 16; ++j) {
    const float d = fp16_value(d16) * static_cast<float>(static_cast<int8_t>(sc[j]));
    if (d == 0.0f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / d);
      l = std::max(-32, std::min(31, l));
      L[16 * j + ii] = static_cast<int8_t>(l + 32);
    }
  }
  for (int j = 0; j < kQKK; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const int a = L[j + l], b = L[j + l + 32], c = L[j + l + 64], e = L[j + l + 96];
      ql[l] = static_cast<uint8_t>((a & 0xF) | ((c & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((b & 0xF) | ((e & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

void quant_q6_K(const float* x, uint8_t* y) { quant_q6_K_weighted(x, nullptr, y); }
void quant_q6_K_imatrix(const float* x, const float* qw, uint8_t* y) { quant_q6_K_weighted(x, qw, y); }

void dequant_q6_K(const uint8_t* y, float* x) {
  const float d = fp16_value(get_u16(y + 208));
  const uint8_t* ql = y;
  const uint8_t* qh = y + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(y + 192);
  for (int n = 0; n < kQKK; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      x[l + 0] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
      x[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      x[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      x[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    x += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// ---------------------------------------------------------------- importance-weighted rows
// quantize_q*(src, dst, nrow, n_per_row, quant_weights != NULL), one row at a time: qw is the row's
// imatrix (n floats, one per column).

// The K-quants: their _impl per super-block.
template <void (*Q)(const float*, const float*, uint8_t*), int Bytes>
void quant_row_imatrix_K(const float* x, const float* qw, int64_t n, uint8_t* y) {
  for (int64_t b = 0; b < n / kQKK; ++b) Q(x + kQKK * b, qw + kQKK * b, y + Bytes * b);
}

// quantize_row_q4_0_impl / q5_0 / q4_1 / q5_1: weights qw * sqrt(sigma2 + x^2) with sigma2 the
// ROW's mean square, then per 32-block make_qx_quants (q4_0 nmax 8, q5_0 16) or make_qkx3_quants
// (q4_1 nmax 15, q5_1 31). 8 blocks share the lanes; the last group repeats the row's last block in
// its unused lanes.
template <int Kind>  // 0 q4_0, 1 q5_0, 2 q4_1, 3 q5_1
void quant_row_imatrix_32(const float* x, const float* qw, int64_t n, uint8_t* y) {
  constexpr bool affine = Kind >= 2;
  constexpr int nmax = Kind == 0 ? 8 : Kind == 1 ? 16 : Kind == 2 ? 15 : 31;
  constexpr int bytes = Kind == 0 ? 18 : Kind == 1 ? 22 : Kind == 2 ? 20 : 24;
  float sum_x2 = 0;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  const float sigma2 = sum_x2 / static_cast<float>(n);
  const int64_t nb = n / kQK;
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    f32x8 xt[kQK], wt[kQK];
    for (int s = 0; s < 8; ++s) {
      const int64_t b = std::min(b0 + s, nb - 1);
      for (int j = 0; j < kQK; ++j) {
        const float v = x[kQK * b + j];
        xt[j][s] = v;
        wt[j][s] = qw[kQK * b + j] * std::sqrt(sigma2 + v * v);
      }
    }
    int q[8][kQK];
    float d[8], m[8];
    if (affine) {
      uint8_t L[8 * kQK];
      float the_min[8];
      fit_affine_lanes<f32x8, i32x8, kQK>(xt, wt, {nmax, -0.9f, 0.05f, 36, false, true}, L, d, the_min);
      for (int s = 0; s < 8; ++s) {
        m[s] = -the_min[s];
        for (int j = 0; j < kQK; ++j) q[s][j] = L[kQK * s + j];
      }
    } else {
      int8_t L[8 * kQK];
      fit_symmetric_lanes<f32x8, i32x8, kQK>(xt, wt, nmax, L, d);
      for (int s = 0; s < 8; ++s)
        for (int j = 0; j < kQK; ++j) q[s][j] = L[kQK * s + j];
    }
    for (int s = 0; s < 8 && b0 + s < nb; ++s) {
      uint8_t* yb = y + bytes * (b0 + s);
      put_u16(yb, fp16_bits(d[s]));
      if (affine) put_u16(yb + 2, fp16_bits(m[s]));
      const int off = affine ? 4 : 2;
      if (Kind == 0 || Kind == 2) {
        for (int j = 0; j < kQK / 2; ++j) yb[off + j] = static_cast<uint8_t>(q[s][j] | (q[s][j + kQK / 2] << 4));
      } else {
        put_q5(q[s], yb + off, yb + off + 4);
      }
    }
  }
}

// ---------------------------------------------------------------- format table

struct Format {
  const char* name;
  int block;  // values per block
  int bytes;  // bytes per block
  void (*quant)(const float*, uint8_t*);
  void (*dequant)(const uint8_t*, float*);
  int64_t grain;  // blocks per parallel_for chunk
  // One row of n values with its importance weights (quantize_<type> with quant_weights); nullptr
  // where ggml ignores them (q8_0).
  void (*quant_imatrix)(const float* x, const float* qw, int64_t n, uint8_t* y);
};

// The codec of each block rule; its name and geometry come from the type table (quant/ggml_types.h).
const Format& format_of(Rule r) {
  using RowImatrix = void (*)(const float*, const float*, int64_t, uint8_t*);
  auto make = [](Rule rule, void (*q)(const float*, uint8_t*), void (*dq)(const uint8_t*, float*), int64_t grain,
                 RowImatrix qi) {
    const TypeTraits& t = traits(rule);
    return Format{t.name, static_cast<int>(t.block), static_cast<int>(t.bytes), q, dq, grain, qi};
  };
  static const Format q8_0 = make(Rule::GgmlQ8_0, quant_q8_0, dequant_q8_0, 1024, nullptr);
  static const Format q4_0 = make(Rule::GgmlQ4_0, quant_q4_0, dequant_q4_0, 1024, quant_row_imatrix_32<0>);
  static const Format q4_1 = make(Rule::GgmlQ4_1, quant_q4_1, dequant_q4_1, 1024, quant_row_imatrix_32<2>);
  static const Format q5_0 = make(Rule::GgmlQ5_0, quant_q5_0, dequant_q5_0, 1024, quant_row_imatrix_32<1>);
  static const Format q5_1 = make(Rule::GgmlQ5_1, quant_q5_1, dequant_q5_1, 1024, quant_row_imatrix_32<3>);
  static const Format q2_K =
      make(Rule::GgmlQ2_K, quant_q2_K, dequant_q2_K, 8, quant_row_imatrix_K<quant_q2_K_imatrix, 84>);
  static const Format q3_K =
      make(Rule::GgmlQ3_K, quant_q3_K, dequant_q3_K, 8, quant_row_imatrix_K<quant_q3_K_imatrix, 110>);
  static const Format q4_K =
      make(Rule::GgmlQ4_K, quant_q4_K, dequant_q4_K, 8, quant_row_imatrix_K<quant_q4_K_imatrix, 144>);
  static const Format q5_K =
      make(Rule::GgmlQ5_K, quant_q5_K, dequant_q5_K, 8, quant_row_imatrix_K<quant_q5_K_imatrix, 176>);
  static const Format q6_K =
      make(Rule::GgmlQ6_K, quant_q6_K, dequant_q6_K, 8, quant_row_imatrix_K<quant_q6_K_imatrix, 210>);
  // IQ4_NL / IQ4_XS / TQ1_0 / TQ2_0 / Q1_0 / Q2_0: quant/ggml_iq.h (ggml ignores the weights of the last four).
  static const Format iq4_nl = make(Rule::GgmlIQ4_NL, iq::quant_iq4_nl, iq::dequant_iq4_nl, 64, iq::quant_row_iq4_nl_imatrix);
  static const Format iq4_xs = make(Rule::GgmlIQ4_XS, iq::quant_iq4_xs, iq::dequant_iq4_xs, 8, iq::quant_row_iq4_xs_imatrix);
  static const Format tq1_0 = make(Rule::GgmlTQ1_0, iq::quant_tq1_0, iq::dequant_tq1_0, 64, nullptr);
  static const Format tq2_0 = make(Rule::GgmlTQ2_0, iq::quant_tq2_0, iq::dequant_tq2_0, 64, nullptr);
  static const Format q1_0 = make(Rule::GgmlQ1_0, iq::quant_q1_0, iq::dequant_q1_0, 256, nullptr);
  static const Format q2_0 = make(Rule::GgmlQ2_0, iq::quant_q2_0, iq::dequant_q2_0, 512, nullptr);
  switch (r) {
    case Rule::GgmlQ8_0: return q8_0;
    case Rule::GgmlQ4_0: return q4_0;
    case Rule::GgmlQ4_1: return q4_1;
    case Rule::GgmlQ5_0: return q5_0;
    case Rule::GgmlQ5_1: return q5_1;
    case Rule::GgmlQ2_K: return q2_K;
    case Rule::GgmlQ3_K: return q3_K;
    case Rule::GgmlQ4_K: return q4_K;
    case Rule::GgmlQ5_K: return q5_K;
    case Rule::GgmlQ6_K: return q6_K;
    case Rule::GgmlIQ4_NL: return iq4_nl;
    case Rule::GgmlIQ4_XS: return iq4_xs;
    case Rule::GgmlTQ1_0: return tq1_0;
    case Rule::GgmlTQ2_0: return tq2_0;
    case Rule::GgmlQ1_0: return q1_0;
    case Rule::GgmlQ2_0: return q2_0;
    case Rule::Affine:
    case Rule::IntZeroPoint: break;
  }
  // Non-block rules and types without a row throw in traits(), naming the implemented formats.
  throw Error(str("ggml ", traits(r).name, " blocks: not implemented (quantize/dequantize) in this build"));
}

void check_cols(const Format& f, int64_t cols, const char* what) {
  QF_CHECK(cols % f.block == 0, "ggml ", f.name, " ", what, ": row width ", cols,
           " is not a multiple of the block size ", f.block);
}

// float32, contiguous, on the CPU, viewed as [rows, cols].
at::Tensor as_cpu_rows(const at::Tensor& w, const Format& f, const char* what) {
  QF_CHECK(w.defined(), "ggml ", f.name, " ", what, ": undefined tensor");
  QF_CHECK(w.dim() == 2, "ggml ", f.name, " ", what, ": expected a 2-D [rows, cols] tensor, got ", w.dim(),
           "-D ", w.sizes());
  check_cols(f, w.size(1), what);
  return w.detach().to(at::kCPU, at::kFloat).contiguous();
}

// dequantize(quantize(w)) block by block on the CPU (any rule), no bytes materialised.
at::Tensor fake_quant_loop(const at::Tensor& x, const Format& f) {
  auto out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t nblocks = x.numel() / f.block;
  at::parallel_for(0, nblocks, f.grain, [&](int64_t b, int64_t e) {
    uint8_t buf[256];
    for (int64_t i = b; i < e; ++i) {
      f.quant(src + i * f.block, buf);
      f.dequant(buf, dst + i * f.block);
    }
  });
  return out;
}

bool has_aten_path(Rule r) { return r == Rule::GgmlQ8_0 || r == Rule::GgmlQ4_0 || r == Rule::GgmlQ4_1; }

// q8_0 / q4_0 / q4_1 as elementwise ATen ops on [n_blocks, 32] (runs on any device). Each op is
// one IEEE float32 operation of the reference; divisions by a non-power-of-two constant use a
// 0-dim tensor on x's device so CUDA does not turn them into a multiply by the reciprocal.
at::Tensor fake_quant_aten(const at::Tensor& w, Rule r) {
  auto x = w.reshape({-1, kQK});
  auto opts = x.options();
  auto zero = at::zeros({}, opts);
  auto one = at::ones({}, opts);
  auto inverse = [&](const at::Tensor& d) { return at::where(d.eq(0), zero, one.div(d)); };
  auto half = [](const at::Tensor& d) { return d.to(at::kHalf).to(at::kFloat); };
  at::Tensor out;
  switch (r) {
    case Rule::GgmlQ8_0: {
      auto d = x.abs().amax(-1, true).div(at::full({}, 127.f, opts));
      auto v = x.mul(inverse(d));
      // roundf (half away from zero): trunc(|v|) + (frac >= 0.5), sign restored as 0 - q so that
      // zero stays +0 like the int8 code does.
      auto a = v.abs();
      auto q = a.trunc();
      q.add_(a.sub(q).ge(0.5).to(at::kFloat));
      q = at::where(v.lt(0), zero.sub(q), q);
      out = q.mul(half(d));
      break;
    }
    case Rule::GgmlQ4_0: {
      auto a = x.abs();
      auto idx = a.argmax(-1, true);  // first index of the largest |x|, like the strict '<' scan
      auto amax = a.gather(-1, idx);
      auto max = at::where(amax.eq(0), zero, x.gather(-1, idx));  // ggml keeps max = +0 then
      auto d = max.div(-8);  // exact: power of two
      auto q = x.mul(inverse(d)).add(8.5).trunc().clamp_max(15);
      out = q.sub(8).mul(half(d));
      break;
    }
    case Rule::GgmlQ4_1: {
      auto mn = x.amin(-1, true);
      auto mx = x.amax(-1, true);
      auto d = mx.sub(mn).div(at::full({}, 15.f, opts));
      auto q = x.sub(mn).mul(inverse(d)).add(0.5).trunc().clamp_max(15);
      out = q.mul(half(d)).add(half(mn));
      break;
    }
    default:
      TORCH_INTERNAL_ASSERT(false, "fake_quant_aten: not a 32-block rule");
  }
  return out.reshape(w.sizes());
}

// The checks both dequantize paths make: uint8 [rows, bytes] blocks for rows of `cols` values.
void check_blocks(const at::Tensor& blocks, const Format& f, int64_t cols) {
  check_cols(f, cols, "dequantize");
  QF_CHECK(blocks.defined() && blocks.dim() == 2 && blocks.scalar_type() == at::kByte,
           "ggml ", f.name, " dequantize: expected uint8 [rows, bytes] blocks, got ",
           blocks.defined() ? std::string(blocks.toString()) + " " + c10::str(blocks.sizes()) : "undefined");
  const int64_t bytes_per_row = cols / f.block * f.bytes;
  QF_CHECK(blocks.size(1) == bytes_per_row, "ggml ", f.name, " dequantize: ", cols, " columns need ",
           bytes_per_row, " bytes per row, got ", blocks.size(1));
}

// ATen helpers of dequantize_aten over b = uint8 [n_blocks, bytes] (one block per row), on b's device.
// The fp16 field at byte k (little endian, as get_u16) as float32 [n_blocks, 1].
at::Tensor half_field(const at::Tensor& b, int64_t k) {
  return b.slice(1, k, k + 2).contiguous().view(at::kHalf).to(at::kFloat);
}
// n int8 values from byte k as float32 [n_blocks, n].
at::Tensor signed_bytes(const at::Tensor& b, int64_t k, int64_t n) {
  return b.slice(1, k, k + n).contiguous().view(at::kChar).to(at::kFloat);
}
// 16 packed bytes -> uint8 [n_blocks, 32] codes: element j in the low nibble of byte j, j + 16 in its high one.
at::Tensor nibbles_lo_hi(const at::Tensor& qs) { return at::cat({qs.bitwise_and(15), qs.bitwise_right_shift(4)}, 1); }
// q5_0 / q5_1 codes as float32 [n_blocks, 32]: low nibbles from qs (byte qs_at), the fifth bit of
// element e is bit e of the little-endian 32-bit qh (byte qh_at), i.e. bit e % 8 of qh byte e / 8.
at::Tensor q5_codes(const at::Tensor& b, int64_t qh_at, int64_t qs_at) {
  auto shifts = at::arange(8, b.options().dtype(at::kLong)).repeat({4}).to(at::kByte);
  auto fifth = b.slice(1, qh_at, qh_at + 4).repeat_interleave(8, 1).bitwise_right_shift(shifts).bitwise_and(1);
  return nibbles_lo_hi(b.slice(1, qs_at, qs_at + 16)).bitwise_or(fifth.bitwise_left_shift(4)).to(at::kFloat);
}

// q2_K / q3_K qs (64 bytes) -> float32 [n_blocks, 256] 2-bit codes: element 128h + 32j + l is bits
// 2j..2j+1 of byte 32h + l.
at::Tensor two_bit_codes(const at::Tensor& qs) {
  auto shifts = at::arange(4, qs.options().dtype(at::kLong)).mul(2).to(at::kByte).view({1, 1, 4, 1});
  return qs.reshape({-1, 2, 1, 32}).bitwise_right_shift(shifts).bitwise_and(3).reshape({-1, kQKK}).to(at::kFloat);
}
// q4_K / q5_K: get_scale_min_k4's 6-bit scales (or mins) of the 8 sub-blocks from bytes 4..15, as
// float32 [n_blocks, 8].
at::Tensor k4_scales(const at::Tensor& b, bool mins) {
  auto sb = b.slice(1, 4, 16);
  auto lo4 = sb.slice(1, 0, 4), mid4 = sb.slice(1, 4, 8), hi4 = sb.slice(1, 8, 12);
  auto top2 = [](const at::Tensor& v) { return v.bitwise_right_shift(6).bitwise_left_shift(4); };
  if (mins) return at::cat({mid4.bitwise_and(63), hi4.bitwise_right_shift(4).bitwise_or(top2(mid4))}, 1).to(at::kFloat);
  return at::cat({lo4.bitwise_and(63), hi4.bitwise_and(15).bitwise_or(top2(lo4))}, 1).to(at::kFloat);
}

}  // namespace

int64_t block_size(Rule r) { return format_of(r).block; }
int64_t type_size(Rule r) { return format_of(r).bytes; }

at::Tensor quantize(const at::Tensor& w, Rule r) {
  const Format& f = format_of(r);
  auto x = as_cpu_rows(w, f, "quantize");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto out = at::empty({rows, cols / f.block * f.bytes}, x.options().dtype(at::kByte));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows * (cols / f.block), f.grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f.quant(src + i * f.block, dst + i * f.bytes);
  });
  return w.device().is_cpu() ? out : out.to(w.device());
}

at::Tensor quantize(const at::Tensor& w, Rule r, const at::Tensor& imatrix) {
  if (!imatrix.defined()) return quantize(w, r);
  const Format& f = format_of(r);
  auto x = as_cpu_rows(w, f, "quantize");
  const int64_t rows = x.size(0), cols = x.size(1);
  QF_CHECK(imatrix.dim() == 1 && imatrix.size(0) == cols, "ggml ", f.name,
           " quantize: the importance matrix must be one value per input column ([", cols, "]), got ",
           imatrix.sizes());
  auto qw = imatrix.detach().to(at::kCPU, at::kFloat).contiguous();
  QF_CHECK(at::isfinite(qw).all().item<bool>(), "ggml ", f.name,
           " quantize: the importance matrix holds non-finite values (llama-quantize refuses those too)");
  if (!f.quant_imatrix) return quantize(w, r);  // q8_0: ggml ignores the weights
  auto out = at::empty({rows, cols / f.block * f.bytes}, x.options().dtype(at::kByte));
  const float* src = x.data_ptr<float>();
  const float* wp = qw.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t row_bytes = cols / f.block * f.bytes;
  at::parallel_for(0, rows, std::max<int64_t>(1, f.grain * f.block / cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f.quant_imatrix(src + i * cols, wp, cols, dst + i * row_bytes);
  });
  return w.device().is_cpu() ? out : out.to(w.device());
}

at::Tensor dequantize(const at::Tensor& blocks, Rule r, int64_t cols) {
  const Format& f = format_of(r);
  check_blocks(blocks, f, cols);
  // The one CPU/GPU decision for this op: CPU -> the reference loop below; CUDA with a compiled
  // kernel for the rule -> quant/cuda; any other device (CUDA in a build without nvcc, or a rule
  // without a kernel) -> the same arithmetic as ATen ops on that device. All three agree bit for bit.
  if (use_cuda_kernel(blocks) && cuda::has_ggml_kernel(r)) return cuda::dequantize_ggml(blocks, r, cols, at::kFloat);
  if (!blocks.device().is_cpu()) return dequantize_aten(blocks, r, cols);
  auto b = blocks.detach().contiguous();
  const int64_t rows = b.size(0);
  auto out = at::empty({rows, cols}, b.options().dtype(at::kFloat));
  const uint8_t* src = b.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows * (cols / f.block), f.grain, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) f.dequant(src + i * f.bytes, dst + i * f.block);
  });
  return out;
}

at::Tensor dequantize_aten(const at::Tensor& blocks, Rule r, int64_t cols) {
  const Format& f = format_of(r);
  check_blocks(blocks, f, cols);
  const int64_t rows = blocks.size(0);
  auto b = blocks.detach().contiguous().reshape({rows * (cols / f.block), f.bytes});  // one block per row
  at::Tensor x;  // float32 [n_blocks, block]
  switch (r) {
    case Rule::GgmlQ8_0: x = signed_bytes(b, 2, kQK).mul(half_field(b, 0)); break;
    case Rule::GgmlQ4_0: x = nibbles_lo_hi(b.slice(1, 2, 18)).to(at::kFloat).sub(8).mul(half_field(b, 0)); break;
    case Rule::GgmlQ4_1:
      x = nibbles_lo_hi(b.slice(1, 4, 20)).to(at::kFloat).mul(half_field(b, 0)).add(half_field(b, 2));
      break;
    case Rule::GgmlQ5_0: x = q5_codes(b, 2, 6).sub(16).mul(half_field(b, 0)); break;
    case Rule::GgmlQ5_1: x = q5_codes(b, 4, 8).mul(half_field(b, 0)).add(half_field(b, 2)); break;
    case Rule::GgmlQ4_K: {
      // 8 sub-blocks of 32: x = (d * sc) * q - dmin * m, with get_scale_min_k4's 6-bit sc and m.
      auto d1 = half_field(b, 0).mul(k4_scales(b, false)).unsqueeze(-1);
      auto m1 = half_field(b, 2).mul(k4_scales(b, true)).unsqueeze(-1);
      // Each 32-byte run of qs holds sub-block 2c in its low nibbles and 2c+1 in its high ones.
      auto qs = b.slice(1, 16, 144).reshape({-1, 4, 32});
      auto q = at::stack({qs.bitwise_and(15), qs.bitwise_right_shift(4)}, 2).reshape({-1, 8, 32}).to(at::kFloat);
      x = d1.mul(q).sub(m1).reshape({-1, kQKK});
      break;
    }
    case Rule::GgmlQ2_K: {
      // 16 sub-blocks of 16: x = (d * (sc & 15)) * q - dmin * (sc >> 4). Element 128h + 32j + l is
      // bits 2j..2j+1 of qs byte 32h + l.
      auto sc = b.slice(1, 0, 16);
      auto dl = half_field(b, 80).mul(sc.bitwise_and(15).to(at::kFloat)).unsqueeze(-1);
      auto ml = half_field(b, 82).mul(sc.bitwise_right_shift(4).to(at::kFloat)).unsqueeze(-1);
      x = dl.mul(two_bit_codes(b.slice(1, 16, 80)).reshape({-1, 16, 16})).sub(ml).reshape({-1, kQKK});
      break;
    }
    case Rule::GgmlQ3_K: {
      // 16 sub-blocks of 16: x = (d * (sc - 32)) * (q - 4) with 6-bit sc (low nibbles in bytes 96..103,
      // top 2 bits of sub-block j at bits 2(j/4) of byte 104 + j%4); element e's third bit is bit
      // e/32 of hmask byte e%32, and the reference subtracts 4 where that bit is clear.
      auto s = b.slice(1, 96, 108);
      auto lo = at::cat({s.slice(1, 0, 8).bitwise_and(15), s.slice(1, 0, 8).bitwise_right_shift(4)}, 1);
      auto hi = s.slice(1, 8, 12).repeat({1, 4}).bitwise_right_shift(
          at::arange(4, b.options().dtype(at::kLong)).mul(2).repeat_interleave(4).to(at::kByte)).bitwise_and(3);
      auto sc = lo.bitwise_or(hi.bitwise_left_shift(4)).to(at::kFloat).sub(32);
      auto dl = half_field(b, 108).mul(sc).unsqueeze(-1);
      auto hbit = b.slice(1, 0, 32).unsqueeze(1).bitwise_right_shift(
          at::arange(8, b.options().dtype(at::kLong)).to(at::kByte).view({1, 8, 1})).bitwise_and(1);
      auto q = two_bit_codes(b.slice(1, 32, 96)).add(hbit.reshape({-1, kQKK}).to(at::kFloat).mul(4)).sub(4);  // exact
      x = dl.mul(q.reshape({-1, 16, 16})).reshape({-1, kQKK});
      break;
    }
    case Rule::GgmlQ5_K: {
      // As q4_K, with 5-bit codes: element 64c + 32k + l is nibble k of qs byte 32c + l (bytes
      // 48..175) plus 16 * bit 2c + k of qh byte l (bytes 16..47).
      auto d1 = half_field(b, 0).mul(k4_scales(b, false)).unsqueeze(-1);
      auto m1 = half_field(b, 2).mul(k4_scales(b, true)).unsqueeze(-1);
      auto qs = b.slice(1, 48, 176).reshape({-1, 4, 32});
      auto low = at::stack({qs.bitwise_and(15), qs.bitwise_right_shift(4)}, 2);  // [n, 4, 2, 32]
      auto fifth = b.slice(1, 16, 48).view({-1, 1, 1, 32}).bitwise_right_shift(
          at::arange(8, b.options().dtype(at::kLong)).to(at::kByte).view({1, 4, 2, 1})).bitwise_and(1);
      auto q = low.bitwise_or(fifth.bitwise_left_shift(4)).reshape({-1, 8, 32}).to(at::kFloat);
      x = d1.mul(q).sub(m1).reshape({-1, kQKK});
      break;
    }
    case Rule::GgmlQ6_K: {
      // Two halves of 128; in each, quarter k of 32 takes its low 4 bits from ql (bytes 0..31 for
      // even k, 32..63 for odd k; low nibble for k < 2) and its top 2 bits from qh >> 2k.
      // 16 sub-blocks of 16: x = (d * sc) * (q - 32).
      auto ql = b.slice(1, 0, 128).reshape({-1, 2, 64});
      auto qh = b.slice(1, 128, 192).reshape({-1, 2, 32});
      auto a = ql.slice(2, 0, 32), c = ql.slice(2, 32, 64);
      auto low = at::stack({a.bitwise_and(15), c.bitwise_and(15), a.bitwise_right_shift(4), c.bitwise_right_shift(4)}, 2);
      auto high = at::stack({qh.bitwise_and(3), qh.bitwise_right_shift(2).bitwise_and(3),
                             qh.bitwise_right_shift(4).bitwise_and(3), qh.bitwise_right_shift(6)}, 2);
      auto q = low.bitwise_or(high.bitwise_left_shift(4)).to(at::kFloat).sub(32).reshape({-1, 16, 16});
      auto d_sc = half_field(b, 208).mul(signed_bytes(b, 192, 16)).unsqueeze(-1);
      x = d_sc.mul(q).reshape({-1, kQKK});
      break;
    }
    case Rule::GgmlIQ4_NL:
    case Rule::GgmlIQ4_XS:
    case Rule::GgmlTQ1_0:
    case Rule::GgmlTQ2_0:
    case Rule::GgmlQ1_0:
    case Rule::GgmlQ2_0: x = iq::dequantize_blocks_aten(b, r); break;
    case Rule::Affine:
    case Rule::IntZeroPoint: TORCH_INTERNAL_ASSERT(false, "format_of accepted a rule without an ATen dequantizer");
  }
  return x.reshape({rows, cols});
}

at::Tensor fake_quant(const at::Tensor& w, Rule r) {
  const Format& f = format_of(r);
  QF_CHECK(w.defined() && w.dim() >= 1, "ggml ", f.name, " fake_quant: expected a [rows, cols] tensor");
  check_cols(f, w.size(-1), "fake_quant");
  auto x = w.detach().to(at::kFloat).contiguous();
  // Off the CPU, q8_0/q4_0/q4_1 stay on the device as ATen ops. On the CPU the fused block loop is
  // faster than that chain of ATen ops (measured 1.5-5x), and the K-quants only exist as the loop.
  if (has_aten_path(r) && !x.is_cpu()) return fake_quant_aten(x, r);
  auto out = fake_quant_loop(x.cpu(), f);
  return x.is_cpu() ? out : out.to(x.device());
}

bool is_simple(Rule r) {
  return r == Rule::GgmlQ8_0 || r == Rule::GgmlQ4_0 || r == Rule::GgmlQ4_1 || r == Rule::GgmlQ5_0 || r == Rule::GgmlQ5_1;
}

at::Tensor pack_simple(Rule r, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m) {
  const Format& f = format_of(r);
  QF_CHECK(is_simple(r), "ggml pack_simple: ", f.name, " is not a single-scale 32-element format");
  check_cols(f, codes.size(1), "pack_simple");
  const bool with_min = r == Rule::GgmlQ4_1 || r == Rule::GgmlQ5_1;
  const int64_t rows = codes.size(0), nb = codes.size(1) / kQK;
  QF_CHECK(d.size(0) == rows && d.size(1) == nb && (!with_min || (m.defined() && m.sizes() == d.sizes())),
           "ggml pack_simple: scales must be [", rows, ", ", nb, "]");
  auto c = codes.to(at::kInt).contiguous();
  auto dh = d.to(at::kHalf).contiguous();
  auto mh = with_min ? m.to(at::kHalf).contiguous() : dh;
  auto out = at::zeros({rows, nb * f.bytes}, at::kByte);
  const int32_t* cp = c.data_ptr<int32_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dh.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mh.data_ptr<at::Half>());
  uint8_t* op = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < rows * nb; ++i) {
    const int32_t* q = cp + i * kQK;
    uint8_t* y = op + i * f.bytes;
    put_u16(y, dp[i]);
    int off = 2;
    if (with_min) put_u16(y + 2, mp[i]), off = 4;
    if (r == Rule::GgmlQ8_0) {
      for (int j = 0; j < kQK; ++j) y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
    } else if (r == Rule::GgmlQ4_0 || r == Rule::GgmlQ4_1) {
      for (int j = 0; j < kQK / 2; ++j) y[off + j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + kQK / 2] & 0xF) << 4));
    } else {
      int qi[kQK];
      for (int j = 0; j < kQK; ++j) qi[j] = q[j];
      put_q5(qi, y + off, y + off + 4);
    }
  }
  return out;
}

namespace detail {
// Test hook (declared in tests/quant/ggml_blocks_test.cpp): the device (ATen) path on any tensor.
at::Tensor fake_quant_vectorized(const at::Tensor& w, Rule r) {
  const Format& f = format_of(r);
  QF_CHECK(has_aten_path(r), "ggml ", f.name, ": the vectorised fake quant covers q8_0/q4_0/q4_1 only");
  check_cols(f, w.size(-1), "fake_quant");
  return fake_quant_aten(w.detach().to(at::kFloat).contiguous(), r);
}
}  // namespace detail

}  // namespace qf::quant::ggml
