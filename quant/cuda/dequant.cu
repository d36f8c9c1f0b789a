// CUDA dequantization kernels (see dequant.h). One thread per output element for llama.cpp blocks,
// read straight from ggml's byte layout; one thread per packed byte for NF4.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/error.h"
#include "quant/cuda/dequant.h"

namespace qf::quant {

bool cuda_kernels_built() { return true; }

}  // namespace qf::quant

namespace qf::quant::cuda {
namespace {

__device__ __forceinline__ float half_at(const uint8_t* p) {
  __half_raw r;
  r.x = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__half(r));
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls launch(T{}) with T the CUDA element type for `out_type` (float, __half, __nv_bfloat16),
// then checks that the kernel launched.
template <class F>
void launch_for(at::ScalarType out_type, const char* what, F&& launch) {
  if (out_type == at::kFloat)
    launch(float{});
  else if (out_type == at::kHalf)
    launch(__half{});
  else if (out_type == at::kBFloat16)
    launch(__nv_bfloat16{});
  else
    QF_CHECK(false, what, ": unsupported output dtype ", c10::toString(out_type));
  cudaError_t e = cudaGetLastError();
  QF_CHECK(e == cudaSuccess, what, ": kernel launch failed: ", cudaGetErrorString(e));
}

// rule: 0 = q8_0 (34 B), 1 = q4_0 (18 B), 2 = q4_1 (20 B); 32 values per block.
template <typename T>
__global__ void dequant_kernel(const uint8_t* __restrict__ blocks, T* __restrict__ out, int64_t rows, int64_t cols,
                               int rule, int type_size) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols, b = c / 32;
  const int j = static_cast<int>(c % 32);
  const uint8_t* blk = blocks + (r * (cols / 32) + b) * type_size;
  float v;
  if (rule == 0) {
    v = half_at(blk) * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
  } else if (rule == 1) {
    const uint8_t q = j < 16 ? (blk[2 + j] & 0x0F) : (blk[2 + j - 16] >> 4);
    v = (static_cast<int>(q) - 8) * half_at(blk);
  } else {
    const uint8_t q = j < 16 ? (blk[4 + j] & 0x0F) : (blk[4 + j - 16] >> 4);
    v = q * half_at(blk) + half_at(blk + 2);
  }
  out[i] = from_float<T>(v);
}

}  // namespace

at::Tensor dequantize_ggml(const at::Tensor& blocks, Rule rule, int64_t cols, at::ScalarType out_type) {
  QF_CHECK(blocks.is_cuda() && blocks.scalar_type() == at::kByte, "dequantize_ggml: expected uint8 CUDA blocks");
  QF_CHECK(has_ggml_kernel(rule), "dequantize_ggml: only q8_0, q4_0 and q4_1 have a CUDA kernel");
  const int r = rule == Rule::GgmlQ8_0 ? 0 : rule == Rule::GgmlQ4_0 ? 1 : 2;
  QF_CHECK(cols % 32 == 0, "dequantize_ggml: width ", cols, " is not a multiple of 32");
  const int type_size = r == 0 ? 34 : r == 1 ? 18 : 20;
  const int64_t rows = blocks.size(0);
  QF_CHECK(blocks.size(1) == cols / 32 * type_size, "dequantize_ggml: blocks have ", blocks.size(1), " bytes per row, expected ",
           cols / 32 * type_size);
  auto src = blocks.contiguous();
  auto out = at::empty({rows, cols}, blocks.options().dtype(out_type));
  const int64_t n = rows * cols;
  const int threads = 256;
  const int64_t grid = (n + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n == 0) return out;
  launch_for(out_type, "dequantize_ggml", [&](auto tag) {
    using T = decltype(tag);
    dequant_kernel<T><<<grid, threads, 0, stream>>>(src.data_ptr<uint8_t>(), reinterpret_cast<T*>(out.data_ptr()), rows,
                                                    cols, r, type_size);
  });
  return out;
}

}  // namespace qf::quant::cuda

namespace qf::quant::cuda {
namespace {

__constant__ float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// One thread per packed byte (two outputs): element 2p in the high nibble, 2p+1 in the low one.
template <typename T>
__global__ void nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales, T* __restrict__ out,
                           int64_t n, int64_t blocksize) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t i = 2 * p;
  if (i >= n) return;
  const uint8_t b = packed[p];
  const float s = scales[i / blocksize];
  out[i] = from_float<T>(kNf4[b >> 4] * s);
  if (i + 1 < n) out[i + 1] = from_float<T>(kNf4[b & 15] * s);
}

}  // namespace

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t rows,
                          int64_t cols, at::ScalarType out_type) {
  QF_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte, "dequantize_nf4: expected uint8 CUDA bytes");
  QF_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat, "dequantize_nf4: expected fp32 CUDA scales");
  const int64_t n = rows * cols;
  QF_CHECK(packed.numel() == (n + 1) / 2, "dequantize_nf4: ", packed.numel(), " bytes for ", n, " values");
  QF_CHECK(scales.numel() == (n + blocksize - 1) / blocksize, "dequantize_nf4: ", scales.numel(), " scales for ", n,
           " values in blocks of ", blocksize);
  auto src = packed.contiguous();
  auto sc = scales.contiguous();
  auto out = at::empty({rows, cols}, packed.options().dtype(out_type));
  if (n == 0) return out;
  const int threads = 256;
  const int64_t grid = ((n + 1) / 2 + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* s = sc.data_ptr<float>();
  launch_for(out_type, "dequantize_nf4", [&](auto tag) {
    using T = decltype(tag);
    nf4_kernel<T><<<grid, threads, 0, stream>>>(src.data_ptr<uint8_t>(), s, reinterpret_cast<T*>(out.data_ptr()), n,
                                                blocksize);
  });
  return out;
}

}  // namespace qf::quant::cuda
