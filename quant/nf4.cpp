// NF4 codec and Nf4Linear. See nf4.h for the invariants.
// What "bit-exact with bitsandbytes 0.50 on CPU" took (each checked on ~10^6 values, see tests/interop):
//  - 4-bit step: bitsandbytes' torch reference (backends/default): x * (1/absmax) in fp32, clamp to
//    [-1, 1], then the count of fp32 midpoints (code[i] + code[i+1]) / 2 strictly below it.
//  - 8-bit step (double quant): its C kernel does NOT search the code directly; it rounds
//    ((x * (1/absmax) + 1) * 0.5 * 65535 + 0.5) down to a 16-bit grid index and reads a 65536-entry
//    table holding the code nearest to each grid point. A nearest-code search differs from it on
//    ~0.2% of values (those within half a grid step of a midpoint), so that table is rebuilt here.
// Contraction stays off so (a + 1) * 0.5 * 65535 + 0.5 is never fused into an FMA.
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant/nf4.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <ostream>

#include "core/error.h"
#include "quant/cuda/dequant.h"

namespace qf::quant {

const std::array<float, 16> kNf4Code = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

namespace {

// create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) with bitsandbytes' own fp32 steps:
// for exponent i = 0..6, the midpoints of an fp32 linspace(0.1, 1) of 2^i + 1 (signed) or
// 2^(i+1) + 1 (unsigned) points, times 10^(i-6) in fp32 (and negated when signed); then 0 and 1; sorted.
std::array<float, 256> build_dynamic_map(bool is_signed) {
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    auto b = at::linspace(0.1, 1.0, (int64_t{1} << (is_signed ? i : i + 1)) + 1, at::kFloat);
    auto means = (b.slice(0, 0, -1) + b.slice(0, 1)) / 2.0;
    const double scale = std::pow(10.0, -6 + i);
    for (double sign : {1.0, -1.0}) {
      if (sign < 0 && !is_signed) continue;
      auto v = (means * (sign * scale)).contiguous();
      data.insert(data.end(), v.data_ptr<float>(), v.data_ptr<float>() + v.numel());
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  QF_CHECK(data.size() == 256, "dynamic map has ", data.size(), " entries");
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

// 65536-entry nearest-code table over the grid v_j = j / 65535 * 2 - 1 (ties to the lower code).
std::vector<uint8_t> build_grid_lut(const float* code) {
  std::vector<uint8_t> lut(65536);
  for (int j = 0; j < 65536; ++j) {
    const float v = static_cast<float>(j) / 65535.0f * 2.0f - 1.0f;
    int idx = static_cast<int>(std::upper_bound(code, code + 256, v) - code) - 1;
    idx = std::clamp(idx, 0, 255);
    if (idx < 255 && std::fabs(v - code[idx + 1]) < std::fabs(v - code[idx])) ++idx;
    lut[j] = static_cast<uint8_t>(idx);
  }
  return lut;
}

float to_float(float v) { return v; }
float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
float to_float(c10::Half v) { return static_cast<float>(v); }

// Nearest NF4 code by the fp32 midpoints (bucketize semantics: x equal to a midpoint goes low).
struct Nf4Bounds {
  float b[15];
  Nf4Bounds() {
    for (int i = 0; i < 15; ++i) b[i] = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
  }
  uint8_t code_of(float s) const {
    uint8_t q = 0;
    for (int i = 0; i < 15; ++i) q += b[i] < s;
    return q;
  }
};

template <typename T>
void quantize_4bit(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  static const Nf4Bounds bounds;
  const int64_t nblocks = (n + bs - 1) / bs;
  // Even blocksize: blocks never split a byte, so blocks are independent.
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * bs, e = std::min(n, s + bs);
      float am = 0.f;
      for (int64_t i = s; i < e; ++i) am = std::max(am, std::fabs(to_float(x[i])));
      absmax[b] = am;
      const float inv = 1.0f / std::max(am, 1e-38f);
      for (int64_t i = s; i < e; i += 2) {
        const float v0 = std::clamp(to_float(x[i]) * inv, -1.0f, 1.0f);
        const float v1 = i + 1 < e ? std::clamp(to_float(x[i + 1]) * inv, -1.0f, 1.0f) : 0.0f;
        packed[i / 2] = static_cast<uint8_t>((bounds.code_of(v0) << 4) | bounds.code_of(v1));
      }
    }
  });
}

template <typename T>
void dequantize_4bit(const uint8_t* packed, const float* scales, int64_t n, int64_t bs, T* out) {
  // Per block: the 16 products code * scale (fp32, then one cast: the same values as per element),
  // then a table lookup per nibble, with no division or conversion in the inner loop (3x faster
  // than per element; QLoRA dequantizes every base weight three times per checkpointed step).
  const int64_t nblocks = (n + bs - 1) / bs;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 32768 / bs), [&](int64_t b0, int64_t b1) {
    T tbl[16];
    for (int64_t b = b0; b < b1; ++b) {
      const float s = scales[b];
      for (int k = 0; k < 16; ++k) tbl[k] = static_cast<T>(kNf4Code[k] * s);
      const int64_t i0 = b * bs, m = std::min(n, i0 + bs) - i0;  // bs is even: a byte never straddles blocks
      const uint8_t* pk = packed + i0 / 2;
      T* o = out + i0;
      int64_t j = 0;
      for (; j + 1 < m; j += 2) {
        const uint8_t v = pk[j / 2];
        o[j] = tbl[v >> 4];
        o[j + 1] = tbl[v & 15];
      }
      if (j < m) o[j] = tbl[pk[j / 2] >> 4];
    }
  });
}

at::Tensor as_cpu_contiguous(const at::Tensor& t, const char* what) {
  QF_CHECK(t.defined(), what, ": undefined tensor");
  return t.device().is_cpu() ? t.contiguous() : t.cpu().contiguous();
}

// nf4_dequantize's output dtypes (bitsandbytes' and the CUDA kernel's).
void check_out_dtype(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw Error(str("nf4_dequantize: output dtype ", c10::toString(dtype), " is not fp32/bf16/fp16"));
}

}  // namespace

const std::array<float, 256>& dynamic_map_signed() {
  static const std::array<float, 256> map = build_dynamic_map(true);
  return map;
}

const std::array<float, 256>& dynamic_map_unsigned() {
  static const std::array<float, 256> map = build_dynamic_map(false);
  return map;
}

void check_nf4_blocksize(int64_t blocksize, const std::string& key) {
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    throw ConfigError({str(key, ": ", blocksize, " is not an NF4 block size; expected a power of two in [32, 4096] "
                                                 "(bitsandbytes' set: 32, 64, ..., 4096)")});
}

void quantize_blockwise8(const float* x, int64_t n, int64_t bs, uint8_t* q, float* absmax) {
  static const std::vector<uint8_t> lut = build_grid_lut(dynamic_map_signed().data());
  for (int64_t s = 0; s < n; s += bs) {
    const int64_t e = std::min(n, s + bs);
    float am = 0.f;
    for (int64_t i = s; i < e; ++i) am = std::max(am, std::fabs(x[i]));
    absmax[s / bs] = am;
    const float inv = 1.0f / am;
    for (int64_t i = s; i < e; ++i) {
      // An all-zero block (0 * inf = NaN) stores the code nearest 0, as every grid point there does.
      float v = am > 0.f ? std::clamp(x[i] * inv, -1.0f, 1.0f) : 0.0f;
      q[i] = lut[static_cast<uint16_t>((v + 1.0f) * 0.5f * 65535.0f + 0.5f)];
    }
  }
}

int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

int64_t Nf4Tensor::bytes() const {
  int64_t b = packed.numel() + absmax.numel() * absmax.element_size();
  if (double_quant) b += nested_absmax.numel() * 4 + 4;
  return b;
}

Nf4Tensor nf4_quantize(const at::Tensor& w, int64_t blocksize, bool double_quant) {
  check_nf4_blocksize(blocksize, "nf4.blocksize");
  auto x = as_cpu_contiguous(w, "nf4_quantize");
  Nf4Tensor t;
  t.blocksize = blocksize;
  t.double_quant = double_quant;
  t.shape = x.sizes().vec();
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  t.packed = at::empty({(n + 1) / 2}, at::kByte);
  auto absmax = at::empty({nblocks}, at::kFloat);
  auto* pk = t.packed.data_ptr<uint8_t>();
  auto* am = absmax.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: quantize_4bit(x.data_ptr<float>(), n, blocksize, pk, am); break;
    case at::kBFloat16: quantize_4bit(x.data_ptr<c10::BFloat16>(), n, blocksize, pk, am); break;
    case at::kHalf: quantize_4bit(x.data_ptr<c10::Half>(), n, blocksize, pk, am); break;
    default: throw InputError(str("nf4_quantize: dtype ", c10::toString(x.scalar_type()), " is not fp32/bf16/fp16"));
  }
  if (!double_quant) {
    t.absmax = absmax;
    return t;
  }
  // offset = mean of the fp32 scales (torch's reduction, as bitsandbytes calls it), then 8-bit
  // blockwise quantization of (absmax - offset) with the signed dynamic map.
  t.offset = absmax.mean().item<float>();
  auto centered = (absmax - t.offset).contiguous();
  t.absmax = at::empty({nblocks}, at::kByte);
  t.nested_absmax = at::empty({(nblocks + t.nested_blocksize - 1) / t.nested_blocksize}, at::kFloat);
  quantize_blockwise8(centered.data_ptr<float>(), nblocks, t.nested_blocksize, t.absmax.data_ptr<uint8_t>(),
                      t.nested_absmax.data_ptr<float>());
  return t;
}

at::Tensor nf4_scales(const Nf4Tensor& t) {
  if (!t.double_quant) return t.absmax.to(at::kFloat);
  auto q = as_cpu_contiguous(t.absmax, "nf4 absmax");
  auto nested = as_cpu_contiguous(t.nested_absmax, "nf4 nested_absmax");
  const int64_t n = q.numel();
  auto out = at::empty({n}, at::kFloat);
  const auto& code = dynamic_map_signed();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* np = nested.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // bitsandbytes: dequantize_blockwise (code[q] * nested absmax) then += offset, both in fp32.
  const int64_t nb = t.nested_blocksize;
  for (int64_t g = 0; g * nb < n; ++g) {
    const float a = np[g];
    for (int64_t i = g * nb, e = std::min(n, i + nb); i < e; ++i) op[i] = code[qp[i]] * a + t.offset;
  }
  return out;
}

at::Tensor nf4_dequantize(const Nf4Tensor& t, at::ScalarType dtype) {
  QF_CHECK(t.packed.defined(), "nf4 packed: undefined tensor");
  check_out_dtype(dtype);
  // The one CPU/GPU decision for this op: CPU -> the reference loop below; CUDA with the kernels
  // compiled -> quant/cuda; any other device (CUDA in a build without nvcc) -> nf4_dequantize_aten.
  if (!t.packed.device().is_cpu()) {
    if (!use_cuda_kernel(t.packed)) return nf4_dequantize_aten(t, dtype);
    auto scales = nf4_scales(t).to(t.packed.device());
    return cuda::dequantize_nf4(t.packed, scales, t.blocksize, 1, t.numel(), dtype).view(t.shape);
  }
  auto scales = nf4_scales(t);
  auto packed = t.packed.contiguous();
  const int64_t n = t.numel();
  QF_CHECK(packed.numel() == (n + 1) / 2, "nf4: ", packed.numel(), " packed bytes for ", n, " values");
  auto out = at::empty(t.shape, at::TensorOptions().dtype(dtype));
  const auto* pk = packed.data_ptr<uint8_t>();
  const auto* sc = scales.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: dequantize_4bit(pk, sc, n, t.blocksize, out.data_ptr<float>()); break;
    case at::kBFloat16: dequantize_4bit(pk, sc, n, t.blocksize, out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: dequantize_4bit(pk, sc, n, t.blocksize, out.data_ptr<c10::Half>()); break;
    default: TORCH_INTERNAL_ASSERT(false, "check_out_dtype let ", c10::toString(dtype), " through");
  }
  return out;
}

at::Tensor nf4_dequantize_aten(const Nf4Tensor& t, at::ScalarType dtype) {
  QF_CHECK(t.packed.defined(), "nf4 packed: undefined tensor");
  check_out_dtype(dtype);
  const auto dev = t.packed.device();
  const int64_t n = t.numel();
  auto packed = t.packed.reshape({-1});
  QF_CHECK(packed.numel() == (n + 1) / 2, "nf4: ", packed.numel(), " packed bytes for ", n, " values");
  // Element 2p in the high nibble of byte p, 2p + 1 in the low one; then code value * block scale in
  // fp32 and one cast, as dequantize_4bit.
  auto codes = at::stack({packed.bitwise_right_shift(4), packed.bitwise_and(15)}, 1).reshape({-1}).slice(0, 0, n);
  auto table = at::from_blob(const_cast<float*>(kNf4Code.data()), {16}, at::kFloat).to(dev, at::kFloat, false, true);
  auto scales = nf4_scales(t).to(dev).repeat_interleave(t.blocksize).slice(0, 0, n);
  return table.index_select(0, codes.to(at::kLong)).mul(scales).to(dtype).reshape(t.shape);
}

Nf4Linear::Nf4Linear(models::LinearBase& dense, int64_t bs, bool dq)
    : Nf4Linear(dense.effective_weight(), dense.bias_or_undefined(), bs, dq) {}

Nf4Linear::Nf4Linear(const at::Tensor& weight_in, const at::Tensor& b, int64_t bs, bool dq)
    : FrozenLinear(weight_in.size(1), weight_in.size(0)), blocksize(bs), double_quant(dq) {
  QF_CHECK(weight_in.dim() == 2, "Nf4Linear: weight must be [out, in], got ", weight_in.sizes());
  auto w = weight_in.detach();
  auto t = nf4_quantize(w, blocksize, double_quant);
  const auto dev = w.device();
  weight = register_buffer("weight", t.packed.to(dev));
  absmax = register_buffer("absmax", t.absmax.to(dev));
  if (double_quant) {
    nested_absmax = register_buffer("nested_absmax", t.nested_absmax.to(dev));
    offset = register_buffer("offset", at::full({1}, t.offset, at::kFloat).to(dev));
  }
  if (b.defined()) bias = register_buffer("bias", b.detach().clone());
}

Nf4Linear::Nf4Linear(const Nf4Tensor& t, const at::Tensor& b)
    : FrozenLinear(t.shape.at(1), t.shape.at(0)), blocksize(t.blocksize), double_quant(t.double_quant) {
  QF_CHECK(t.shape.size() == 2 && t.packed.numel() == (t.numel() + 1) / 2 && t.nested_blocksize == 256,
           "Nf4Linear: inconsistent packed state");
  const auto dev = t.packed.device();
  weight = register_buffer("weight", t.packed.reshape({-1}).contiguous());
  absmax = register_buffer("absmax", t.absmax.reshape({-1}).contiguous().to(dev));
  if (double_quant) {
    nested_absmax = register_buffer("nested_absmax", t.nested_absmax.reshape({-1}).to(at::kFloat).contiguous().to(dev));
    offset = register_buffer("offset", at::full({1}, t.offset, at::kFloat).to(dev));
  }
  if (b.defined()) bias = register_buffer("bias", b.detach().clone());
}

Nf4Tensor Nf4Linear::state() const {
  Nf4Tensor t;
  t.packed = weight;
  t.absmax = absmax;
  t.nested_absmax = nested_absmax;
  t.offset = double_quant ? offset.cpu().item<float>() : 0.f;
  t.blocksize = blocksize;
  t.double_quant = double_quant;
  t.shape = {out_features, in_features};
  return t;
}

at::Tensor Nf4Linear::materialize(at::ScalarType dtype) const { return nf4_dequantize(state(), dtype); }

void Nf4Linear::pretty_print(std::ostream& s) const {
  s << "qf::Nf4Linear(in=" << in_features << ", out=" << out_features << ", blocksize=" << blocksize
    << (double_quant ? ", double_quant" : "") << (bias.defined() ? ", bias" : "") << ")";
}

}  // namespace qf::quant
