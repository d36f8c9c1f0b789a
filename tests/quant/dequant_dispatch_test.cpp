// One CPU/GPU dispatch per dequant op (ggml::dequantize, nf4_dequantize). Their portable ATen path
// (what a build without nvcc runs on a GPU) equals the CPU reference bit for bit for every
// llama.cpp block type and for NF4; checked on the CPU, so it runs on every machine. On a CUDA device
// the dispatch (kernel, or the fallback in a build without kernels), the portable path, and the
// converted-layer call sites (unpack_weight, Nf4Linear::materialize) equal the CPU reference too.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "models/linear.h"
#include "quant/cuda/dequant.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_types.h"
#include "quant/nf4.h"
#include "quant/qat.h"
#include "quant/spec.h"

using namespace qf;
using namespace qf::quant;

namespace {

// Same dtype, shape and bit pattern (so +0 / -0 and every rounding count).
::testing::AssertionResult bits_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || !a.sizes().equals(b.sizes()))
    return ::testing::AssertionFailure() << a.toString() << " " << a.sizes() << " vs " << b.toString() << " "
                                         << b.sizes();
  auto as_int = [](const at::Tensor& t) {
    auto c = t.cpu().contiguous();
    return c.element_size() == 4 ? c.view(at::kInt) : c.view(at::kShort);
  };
  auto differ = as_int(a).ne(as_int(b));
  const int64_t n = differ.sum().item<int64_t>();
  if (n == 0) return ::testing::AssertionSuccess();
  const int64_t first = differ.reshape({-1}).nonzero()[0][0].item<int64_t>();
  return ::testing::AssertionFailure() << n << " of " << a.numel() << " values differ; first at flat index " << first
                                       << ": " << a.cpu().reshape({-1})[first].item<double>() << " vs "
                                       << b.cpu().reshape({-1})[first].item<double>();
}

std::vector<Rule> block_rules() {
  std::vector<Rule> out;
  for (const auto& t : ggml::type_table())
    if (t.rule != Rule::Affine) out.push_back(t.rule);
  return out;
}

std::string name_of(Rule r) { return ggml::traits(r).name; }

// Byte offsets of each block's fp16 fields (d, and m / dmin where the format has one).
std::vector<int64_t> half_fields(Rule r) {
  switch (r) {
    case Rule::GgmlQ4_1:
    case Rule::GgmlQ5_1:
    case Rule::GgmlQ4_K:
    case Rule::GgmlQ5_K: return {0, 2};
    case Rule::GgmlQ2_K: return {80, 82};
    case Rule::GgmlQ3_K: return {108};
    case Rule::GgmlTQ1_0: return {52};
    case Rule::GgmlTQ2_0: return {64};
    case Rule::GgmlQ6_K: return {208};
    default: return {0};
  }
}

constexpr int64_t kRows = 6, kCols = 512;  // a multiple of both block sizes (32, 256)

// Two inputs per rule: blocks quantized from weights (with an all-zero row, a constant row and a
// wide-range row), and random bytes (every code and scale bit pattern) whose fp16 fields are kept
// finite by clearing the top exponent bit.
std::vector<at::Tensor> block_inputs(Rule r) {
  auto g = at::detail::createCPUGenerator(17);
  auto w = at::randn({kRows, kCols}, g);
  w[1].zero_();
  w[2].fill_(0.375f);
  w[3].mul_(1000.f);
  auto quantized = ggml::quantize(w, r);
  const int64_t bytes = ggml::type_size(r), per_row = kCols / ggml::block_size(r);
  auto raw = at::randint(0, 256, {kRows, per_row * bytes}, g, at::kByte);
  auto blocks = raw.view({kRows, per_row, bytes});
  for (int64_t k : half_fields(r)) blocks.select(2, k + 1).bitwise_and_(0xBF);
  return {quantized, raw};
}

Nf4Tensor to_device(Nf4Tensor t, const at::Device& dev) {
  t.packed = t.packed.to(dev);
  t.absmax = t.absmax.to(dev);
  if (t.nested_absmax.defined()) t.nested_absmax = t.nested_absmax.to(dev);
  return t;
}

struct Nf4Case {
  std::vector<int64_t> shape;
  int64_t blocksize;
  bool double_quant;
};
// Full blocks; an odd element count whose last block is partial; one partial block.
const std::vector<Nf4Case> kNf4Cases = {{{96, 320}, 64, true}, {{96, 320}, 64, false}, {{7, 37}, 32, true},
                                        {{3, 50}, 4096, false}};
const std::vector<at::ScalarType> kNf4Dtypes = {at::kFloat, at::kBFloat16, at::kHalf};

Nf4Tensor nf4_input(const Nf4Case& c) {
  auto g = at::detail::createCPUGenerator(23);
  return nf4_quantize(at::randn(c.shape, g), c.blocksize, c.double_quant);
}

std::string describe(const Nf4Case& c, at::ScalarType dt) {
  return c10::str(c.shape, " blocksize ", c.blocksize, c.double_quant ? " double-quant " : " ", c10::toString(dt));
}

}  // namespace

TEST(DequantDispatch, GgmlPortablePathEqualsCpuReferenceForEveryBlockType) {
  const auto rules = block_rules();
  ASSERT_GE(rules.size(), 10u);  // q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k, and any newer row
  for (Rule r : rules) {
    for (const auto& blocks : block_inputs(r)) {
      auto ref = ggml::dequantize(blocks, r, kCols);
      auto aten = ggml::dequantize_aten(blocks, r, kCols);
      EXPECT_TRUE(bits_equal(aten, ref)) << name_of(r);
    }
  }
}

TEST(DequantDispatch, GgmlPortablePathChecksItsInputLikeTheReference) {
  auto blocks = ggml::quantize(at::randn({2, 64}), Rule::GgmlQ4_0);
  EXPECT_THROW(ggml::dequantize_aten(blocks, Rule::GgmlQ4_0, 96), Error);          // 96 columns need 54 bytes
  EXPECT_THROW(ggml::dequantize_aten(blocks, Rule::GgmlQ4_0, 48), Error);          // not a multiple of 32
  EXPECT_THROW(ggml::dequantize_aten(blocks.to(at::kInt), Rule::GgmlQ4_0, 64), Error);  // not uint8
  auto empty = ggml::dequantize_aten(blocks.slice(0, 0, 0), Rule::GgmlQ4_0, 64);
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 64}));
}

TEST(DequantDispatch, Nf4PortablePathEqualsCpuReference) {
  for (const auto& c : kNf4Cases) {
    auto t = nf4_input(c);
    for (auto dt : kNf4Dtypes) EXPECT_TRUE(bits_equal(nf4_dequantize_aten(t, dt), nf4_dequantize(t, dt))) << describe(c, dt);
  }
  // Random bytes: every code in both nibbles.
  auto t = nf4_input(kNf4Cases[0]);
  t.packed = at::randint(0, 256, t.packed.sizes(), at::detail::createCPUGenerator(5), at::kByte);
  EXPECT_TRUE(bits_equal(nf4_dequantize_aten(t), nf4_dequantize(t)));
  EXPECT_THROW(nf4_dequantize_aten(t, at::kDouble), Error);
  EXPECT_THROW(nf4_dequantize(t, at::kDouble), Error);
}

TEST(DequantDispatchCuda, GgmlOnGpuEqualsCpuReference) {
  if (!torch::cuda::is_available())
    GTEST_SKIP() << "no CUDA device: the GPU branch of ggml::dequantize ("
                 << (cuda_kernels_built() ? "kernels compiled" : "ATen fallback, no kernels") << ") is not run";
  const at::Device gpu(at::kCUDA, 0);
  for (Rule r : block_rules()) {
    const auto spec = QuantSpec::preset_named(name_of(r));
    for (const auto& blocks : block_inputs(r)) {
      auto ref = ggml::dequantize(blocks, r, kCols);
      auto on_gpu = ggml::dequantize(blocks.to(gpu), r, kCols);
      EXPECT_TRUE(on_gpu.is_cuda()) << name_of(r);
      EXPECT_TRUE(bits_equal(on_gpu, ref)) << name_of(r) << " dispatch";
      EXPECT_TRUE(bits_equal(ggml::dequantize_aten(blocks.to(gpu), r, kCols), ref)) << name_of(r) << " portable";
      // The converted layer's call site (QuantizedLinear / QuantizedEmbedding).
      auto unpacked = unpack_weight(PackedStorage{blocks.to(gpu)}, spec, kRows, kCols);
      EXPECT_TRUE(unpacked.is_cuda()) << name_of(r);
      EXPECT_TRUE(bits_equal(unpacked, ref)) << name_of(r) << " unpack_weight";
    }
  }
}

TEST(DequantDispatchCuda, Nf4OnGpuEqualsCpuReference) {
  if (!torch::cuda::is_available())
    GTEST_SKIP() << "no CUDA device: the GPU branch of nf4_dequantize ("
                 << (cuda_kernels_built() ? "kernel compiled" : "ATen fallback, no kernels") << ") is not run";
  const at::Device gpu(at::kCUDA, 0);
  for (const auto& c : kNf4Cases) {
    auto t = nf4_input(c);
    auto tg = to_device(t, gpu);
    for (auto dt : kNf4Dtypes) {
      auto ref = nf4_dequantize(t, dt);
      auto on_gpu = nf4_dequantize(tg, dt);
      EXPECT_TRUE(on_gpu.is_cuda()) << describe(c, dt);
      EXPECT_TRUE(bits_equal(on_gpu, ref)) << describe(c, dt) << " dispatch";
      EXPECT_TRUE(bits_equal(nf4_dequantize_aten(tg, dt), ref)) << describe(c, dt) << " portable";
    }
  }
  // QLoRA's base layer on the GPU: materialize goes through the same dispatch.
  auto g = at::detail::createCPUGenerator(29);
  models::DenseLinear d(320, 96, false);
  {
    at::NoGradGuard ng;
    d.weight.copy_(at::randn({96, 320}, g));
  }
  Nf4Linear layer(d, 64, true);
  auto ref = layer.materialize(at::kBFloat16);
  layer.to(gpu);
  auto on_gpu = layer.materialize(at::kBFloat16);
  EXPECT_TRUE(on_gpu.is_cuda());
  EXPECT_TRUE(bits_equal(on_gpu, ref));
}
