// LLM.int8 invariants (byte- and output-exactness with bitsandbytes is tests/interop/test_bnb_int8.py):
// Int8Params' rounding on hand-checked rows (fp16 cast first, half to even, zero rows), the outlier
// columns of the activations taken out of the int8 product, the input gradient through the
// dequantized weight, no parameters. LoRA on an int8 base: tests/peft/int8_base_test.cpp.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include "core/error.h"
#include "quant/int8_lt.h"
#include "tests/test_util.h"

using namespace qf;
using namespace qf::quant;

TEST(Int8Lt, Int8ParamsRoundingOnHandCheckedRows) {
  // Row 0: absmax 2, x * 127/2 = 63.5 (half to even: 64), -127, 31.75 -> 32. Row 1 all zero: codes 0,
  // SCB 0. Row 2: 1/3 is cast to fp16 (0.333251953125) before the row scale.
  auto w = at::tensor({1.0f, -2.0f, 0.5f, 0.f, 0.f, 0.f, 1.0f / 3, 1.0f, -1.0f}, at::kFloat).view({3, 3});
  auto q = int8_quantize(w);
  EXPECT_EQ(q.cb.scalar_type(), at::kChar);
  EXPECT_EQ(q.scb.scalar_type(), at::kFloat);
  auto cb = q.cb.to(at::kLong);
  EXPECT_EQ(cb[0][0].item<int64_t>(), 64);
  EXPECT_EQ(cb[0][1].item<int64_t>(), -127);
  EXPECT_EQ(cb[0][2].item<int64_t>(), 32);
  EXPECT_TRUE(at::equal(q.cb[1], at::zeros({3}, at::kChar)));
  EXPECT_EQ(q.scb[1].item<float>(), 0.f);
  EXPECT_EQ(cb[2][0].item<int64_t>(), 42);  // 0.333251953125 * 127 = 42.32
  EXPECT_EQ(q.scb[0].item<float>(), 2.f);
  // dequantized: CB * SCB / 127 in fp32, within half a step of the weight
  auto dq = int8_dequantize(q.cb, q.scb);
  EXPECT_LE((dq - w).abs().max().item<float>(), 2.f / 127 / 2 + 1e-3f);
  // beyond float16's range: refused (Int8Params casts to fp16 first)
  EXPECT_THROW(int8_quantize(at::full({2, 2}, 1e6f)), Error);
}

TEST(Int8Lt, OutlierColumnsAreComputedInFloat) {
  auto g = at::detail::createCPUGenerator(2);
  auto w = at::randn({16, 32}, g) * 0.1;
  auto x = at::randn({6, 32}, g);
  x.select(1, 4).fill_(30.0);  // an outlier feature in every row
  Int8LtLinear mixed(w, at::Tensor(), 6.0), all_int8(w, at::Tensor(), 0.0);
  at::NoGradGuard ng;
  auto want = at::linear(x, mixed.materialize(at::kFloat));
  const float e_mixed = (mixed.forward(x) - want).abs().max().item<float>();
  const float e_int8 = (all_int8.forward(x) - want).abs().max().item<float>();
  // Without decomposition the outlier sets every row's scale (30/127 per step), so the other features
  // lose most of their precision; with it they keep theirs (LLM.int8's point).
  EXPECT_LT(e_mixed * 5, e_int8) << e_mixed << " vs " << e_int8;
  EXPECT_LT(e_mixed, 0.05f);
  // The outlier column's codes are zeroed in every row; the row scales ignore it.
  auto q = int8_vectorwise_quant(x.to(at::kHalf), 6.0);
  ASSERT_EQ(q.outlier_cols.numel(), 1);
  EXPECT_EQ(q.outlier_cols[0].item<int64_t>(), 4);
  EXPECT_TRUE(at::equal(q.codes.select(1, 4), at::zeros({6}, at::kChar)));
  EXPECT_LT(q.absmax.max().item<float>(), 6.f);
}

TEST(Int8Lt, InputGradientIsThroughTheDequantizedWeightAndNothingTrains) {
  auto g = at::detail::createCPUGenerator(4);
  auto w = at::randn({12, 20}, g);
  auto b = at::randn({12}, g);
  Int8LtLinear lin(w, b, 6.0);
  EXPECT_TRUE(lin.parameters().empty());
  EXPECT_EQ(lin.named_buffers()["weight"].scalar_type(), at::kChar);
  EXPECT_EQ(lin.named_buffers()["SCB"].numel(), 12);
  auto x = at::randn({2, 3, 20}, g).requires_grad_(true);
  auto up = at::randn({2, 3, 12}, g);
  auto y = lin.forward(x);
  EXPECT_EQ(y.sizes(), at::IntArrayRef({2, 3, 12}));
  EXPECT_FALSE(y.is_view());  // LoRA adds into it in place
  auto gx = torch::autograd::grad({(y * up).sum()}, {x})[0];
  auto wq = lin.weight.to(at::kFloat).mul_(lin.scb.unsqueeze(1).mul(1.0 / 127.0));
  EXPECT_TRUE(at::equal(gx, at::matmul(up.reshape({-1, 12}), wq).view({2, 3, 20})));
  EXPECT_THROW(lin.forward(at::randn({2, 19})), Error);
}

TEST(Cuda, Int8LtOnGpuQuantizesAsOnCpuAndMatchesItsForward) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the int8 CUDA path (at::_int_mm) compiled but not run";
  auto g = at::detail::createCPUGenerator(6);
  auto w = at::randn({64, 96}, g) * 0.1;
  auto cpu_q = int8_quantize(w), gpu_q = int8_quantize(w.cuda());
  EXPECT_TRUE(at::equal(cpu_q.cb, gpu_q.cb.cpu()));
  EXPECT_TRUE(at::equal(cpu_q.scb, gpu_q.scb.cpu()));
  Int8LtLinear lin(w, at::randn({64}, g), 6.0);
  for (int64_t rows : {3, 40}) {  // below and above _int_mm's 16-row minimum on CUDA
    auto x = at::randn({rows, 96}, g);
    x.select(1, 2).fill_(9.0);
    at::Tensor y_cpu;
    {
      at::NoGradGuard ng;
      y_cpu = lin.forward(x);
    }
    auto gpu = std::make_shared<Int8LtLinear>(w.cuda(), lin.bias.cuda(), 6.0);
    auto xg = x.cuda().requires_grad_(true);
    auto y = gpu->forward(xg);
    // The int32 product is exact on both; the fp32 rescale may round differently on the GPU.
    EXPECT_TRUE(at::allclose(y.detach().cpu(), y_cpu, 1e-5, 1e-5)) << rows;
    y.sum().backward();
    EXPECT_TRUE(xg.grad().defined());
  }
}
