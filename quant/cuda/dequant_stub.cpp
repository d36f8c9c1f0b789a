// Build without the CUDA toolkit: the GPU path reports that it is unavailable.
#include "core/error.h"
#include "quant/cuda/dequant.h"

namespace qf::quant::cuda {
bool compiled_with_cuda() { return false; }
at::Tensor dequantize_ggml(const at::Tensor&, Rule, int64_t, at::ScalarType) {
  throw Error("qforge was built without CUDA (no nvcc at configure time); GPU dequantization is unavailable");
}
at::Tensor dequantize_nf4(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, at::ScalarType) {
  throw Error("qforge was built without CUDA (no nvcc at configure time); GPU NF4 dequantization is unavailable");
}
}  // namespace qf::quant::cuda
