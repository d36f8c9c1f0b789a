// NF4 invariants (bit-exactness with bitsandbytes is tests/interop/test_bnb_nf4.py): packing order,
// error bound, dynamic map, double quant close to plain absmax, Nf4Linear == linear on the
// dequantized weight (forward and input gradient) without parameters, bad block sizes named.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "core/error.h"
#include "models/linear.h"
#include "quant/cuda/dequant.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

using namespace qf;
using namespace qf::quant;

TEST(Nf4, HighNibbleFirstAndExactCodeValues) {
  // Every NF4 code value (times a block scale of 2) quantizes to itself, in order.
  auto w = at::empty({64});
  for (int i = 0; i < 64; ++i) w[i] = kNf4Code[i % 16] * 2.0f;
  auto t = nf4_quantize(w, 64, false);
  auto pk = t.packed;
  EXPECT_EQ(pk.numel(), 32);
  EXPECT_EQ(pk[0].item<uint8_t>(), 0x01);  // codes 0 (high nibble) and 1 (low nibble)
  EXPECT_EQ(pk[7].item<uint8_t>(), 0xEF);
  EXPECT_FLOAT_EQ(t.absmax[0].item<float>(), 2.0f);
  EXPECT_TRUE(at::equal(nf4_dequantize(t), w));
}

TEST(Nf4, ErrorBoundedByHalfTheWidestCodeGap) {
  auto g = at::detail::createCPUGenerator(1);
  auto w = at::randn({96, 200}, g);
  auto a = nf4_quantize(w, 64, false), b = nf4_quantize(w, 64, true);
  auto per_elem = [&](const at::Tensor& s) { return s.repeat_interleave(64).slice(0, 0, w.numel()); };
  auto s_true = per_elem(nf4_scales(a));
  // The widest gap between neighbouring codes is -1 .. -0.696 (0.304), so |error| <= 0.152 * absmax;
  // with double quant the dequantized scale's own error |s' - s| adds on top.
  for (auto* t : {&a, &b}) {
    auto err = (nf4_dequantize(*t) - w).abs().reshape(-1);
    auto bound = s_true * 0.1520f + (per_elem(nf4_scales(*t)) - s_true).abs() + 1e-6f;
    EXPECT_TRUE((err <= bound).all().item<bool>()) << "double_quant=" << t->double_quant;
  }
  // 8-bit dynamic codes of (absmax - mean) keep the scales within ~1%.
  EXPECT_LT(((nf4_scales(a) - nf4_scales(b)).abs() / nf4_scales(a)).max().item<float>(), 0.02f);
  EXPECT_EQ(b.absmax.scalar_type(), at::kByte);
  EXPECT_LT(b.bytes(), a.bytes());
  EXPECT_EQ(b.bytes(), 96 * 200 / 2 + 300 + 2 * 4 + 4);  // codes + 8-bit scales + nested + offset
}

TEST(Nf4, DynamicMapIsBitsandbytesShape) {
  const auto& m = dynamic_map_signed();
  EXPECT_TRUE(std::is_sorted(m.begin(), m.end()));
  EXPECT_FLOAT_EQ(m[255], 1.0f);
  EXPECT_NEAR(m[0], -0.99296875f, 1e-7);
  EXPECT_EQ(std::count(m.begin(), m.end(), 0.0f), 1);
}

TEST(Nf4, BlocksizeMustBeAPowerOfTwoIn32To4096) {
  auto w = at::randn({4, 64});
  for (int64_t bs : {16, 48, 8192})
    EXPECT_NE(qf::testing::config_error_of([&] { nf4_quantize(w, bs); }).find("not an NF4 block size"), std::string::npos)
        << bs;
}

TEST(Nf4Linear, ForwardAndInputGradientEqualDenseOnDequantizedWeightNoParameters) {
  models::DenseLinear d(64, 48, true);
  auto g = at::detail::createCPUGenerator(2);
  {
    at::NoGradGuard ng;
    d.weight.copy_(at::randn({48, 64}, g) * 0.1);
    d.bias.copy_(at::randn({48}, g));
  }
  Nf4Linear q(d, 64, true);
  EXPECT_TRUE(q.parameters().empty());
  auto w = q.effective_weight();
  auto x1 = at::randn({3, 5, 64}, g).requires_grad_(true);
  auto x2 = x1.detach().clone().requires_grad_(true);
  auto y1 = q.forward(x1);
  auto y2 = at::linear(x2, w, d.bias.detach());
  EXPECT_TRUE(at::allclose(y1, y2, 1e-6, 1e-6));
  y1.pow(2).sum().backward();
  y2.pow(2).sum().backward();
  EXPECT_TRUE(at::allclose(x1.grad(), x2.grad(), 1e-5, 1e-5));
  // bf16 compute: dequantized straight into bf16.
  auto yb = q.forward(x1.detach().to(at::kBFloat16));
  EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
}

TEST(Cuda, Nf4DequantKernelMatchesCpuAndNf4LinearRunsOnGpu) {
  if (!cuda_kernels_built()) GTEST_SKIP() << "built without the CUDA toolkit: no CUDA kernels to run";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the NF4 CUDA kernel compiled but not run";
  auto g = at::detail::createCPUGenerator(12);
  auto w = at::randn({96, 320}, g);
  auto t = nf4_quantize(w, 64, true);
  auto cpu = nf4_dequantize(t);
  auto gpu = cuda::dequantize_nf4(t.packed.cuda(), nf4_scales(t).cuda(), 64, 96, 320, at::kFloat).cpu();
  EXPECT_TRUE(at::equal(cpu, gpu));
  auto gpu_bf16 = cuda::dequantize_nf4(t.packed.cuda(), nf4_scales(t).cuda(), 64, 96, 320, at::kBFloat16).cpu();
  EXPECT_TRUE(at::equal(cpu.to(at::kBFloat16), gpu_bf16));
  models::DenseLinear d(320, 96, false);
  {
    at::NoGradGuard ng;
    d.weight.copy_(w);
  }
  auto q = std::make_shared<Nf4Linear>(d, 64, true);
  auto x = at::randn({4, 320}, g);
  auto y_cpu = q->forward(x);
  q->to(at::kCUDA);
  EXPECT_TRUE(at::allclose(q->forward(x.cuda()).cpu(), y_cpu, 1e-4, 1e-4));
}
