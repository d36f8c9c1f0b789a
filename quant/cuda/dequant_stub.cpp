// Build without the CUDA toolkit: no kernels. cuda_kernels_built() is false, so the dispatch in
// ggml::dequantize and nf4_dequantize takes the portable ATen path on every device and never calls
// the entry points below.
#include <c10/util/Exception.h>

#include "quant/cuda/dequant.h"

namespace qf::quant {
bool cuda_kernels_built() { return false; }

namespace cuda {
at::Tensor dequantize_ggml(const at::Tensor&, Rule, int64_t, at::ScalarType) {
  TORCH_INTERNAL_ASSERT(false, "dequantize_ggml called in a build without CUDA kernels (dispatch checks use_cuda_kernel)");
}
at::Tensor dequantize_nf4(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, at::ScalarType) {
  TORCH_INTERNAL_ASSERT(false, "dequantize_nf4 called in a build without CUDA kernels (dispatch checks use_cuda_kernel)");
}
}  // namespace cuda
}  // namespace qf::quant
