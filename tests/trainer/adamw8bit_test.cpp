// AdamW8bit (trainer/adamw8bit.h): blockwise 8-bit state codec, the update's independence of the chunk
// size, 32-bit state below min_8bit_size, resume through the Trainer continuing the identical loss
// curve, a clear error when trainer.optim.name changes between runs, and dist.zero refused.
// (Bit-exactness against bitsandbytes itself: tests/interop/test_bnb_adamw8bit.py.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>

#include "quant/nf4.h"
#include "tests/test_util.h"
#include "trainer/adamw8bit.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"

using namespace qf;
using namespace qf::trainer;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// The tiny model of tests/trainer/trainer_test.cpp: its 400 x 32 embedding (12800 elements) gets
// 8-bit state, its 32 x 64 projections (2048) fp32 state.
RunConfig tiny_cfg(const std::string& dir, const std::vector<std::string>& extra) {
  {
    std::ofstream o(dir + "/corpus.txt");
    std::ifstream in(std::string(QFORGE_SOURCE_DIR) + "/data/corpora/kjv.txt");
    std::string line;
    int n = 0;
    while (n < 1500 && std::getline(in, line)) o << line << "\n", ++n;
    for (; n < 1500; ++n) o << "line " << n << " of the fallback corpus with words " << (n * 7919) % 1000 << "\n";
  }
  std::string yaml = R"(
run: {name: t, out_dir: OUT/run, seed: 7, threads: 1}
tokenizer: {path: OUT/tok.model, train: {enabled: true, sources: [OUT/corpus.txt], vocab_size: 400}}
model: {dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 64}
data: {sources: [{path: OUT/corpus.txt, split: line}], seq_len: 32, val_fraction: 0.05, cache_dir: OUT/cache}
trainer: {max_steps: 8, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 1,
          optim: {lr: 0.003, name: adamw8bit}, schedule: {warmup_steps: 2}}
)";
  for (size_t p; (p = yaml.find("OUT")) != std::string::npos;) yaml.replace(p, 3, dir);
  YAML::Node root = YAML::Load(yaml);
  cfg::Problems pr;
  for (auto& o : extra) cfg::apply_override(root, o, &pr);
  pr.throw_if_any();
  return parse_run_config(root, "<test>");
}

TrainResult run(const RunConfig& c) {
  Trainer t(c);
  t.setup();
  auto r = t.train();
  t.cleanup();
  return r;
}

}  // namespace

TEST(AdamW8bitCodec, DynamicMapsAndRoundTrip) {
  // The signed map is the one NF4's double quantization uses; the unsigned one spans [0, 1].
  const auto& s = dynamic_map(true);
  const auto& u = dynamic_map(false);
  EXPECT_EQ(std::vector<float>(s.begin(), s.end()),
            std::vector<float>(quant::dynamic_map_signed().begin(), quant::dynamic_map_signed().end()));
  EXPECT_EQ(u.front(), 0.0f);
  EXPECT_EQ(u.back(), 1.0f);
  EXPECT_TRUE(std::is_sorted(u.begin(), u.end()));

  at::manual_seed(0);
  auto x = at::randn({7, 100}) * at::logspace(-3, 1, 700).view({7, 100});  // 3 blocks, the last partial
  auto y = at::randn({1000});
  y.slice(0, 256, 512).zero_();  // an all-zero block
  for (bool is_signed : {true, false}) {
    auto in = is_signed ? x : x.abs();
    auto q = quantize_blockwise8(in, is_signed);
    ASSERT_EQ(q.codes.scalar_type(), at::kByte);
    ASSERT_EQ(q.codes.sizes(), in.sizes());
    ASSERT_EQ(q.absmax.numel(), 3);  // ceil(700 / 256)
    auto flat = in.reshape(-1);
    for (int64_t b = 0; b < 3; ++b)
      EXPECT_EQ(q.absmax[b].item<float>(), flat.slice(0, b * 256, std::min<int64_t>(700, b * 256 + 256)).abs().max().item<float>());
    // The dynamic map's worst relative step is ~1.4% near 1 (and codes sit near zero for tiny values):
    // every value comes back within 2% of its block's absmax.
    auto dq = dequantize_blockwise8(q.codes, q.absmax, is_signed);
    auto scale = q.absmax.repeat_interleave(256).slice(0, 0, 700).view(in.sizes());
    EXPECT_LE(((dq - in).abs() / scale).max().item<float>(), 0.02f) << (is_signed ? "signed" : "unsigned");
    // An all-zero block: absmax 0, code 0, dequantized to zero.
    auto z = quantize_blockwise8(is_signed ? y : y.abs(), is_signed);
    EXPECT_EQ(z.absmax[1].item<float>(), 0.0f);
    EXPECT_TRUE(z.codes.slice(0, 256, 512).eq(0).all().item<bool>());
    EXPECT_TRUE(dequantize_blockwise8(z.codes, z.absmax, is_signed).slice(0, 256, 512).eq(0).all().item<bool>());
    // bitsandbytes' CPU search puts an exact 0 in a non-zero block on code 131 (signed) / 7 (unsigned).
    auto one_zero = at::zeros({256});
    one_zero[5] = 1.0f;
    EXPECT_EQ(quantize_blockwise8(one_zero, is_signed).codes[0].item<int>(), is_signed ? 131 : 7);
  }
}

TEST(AdamW8bitOptimizer, ChunkSizeDoesNotChangeTheUpdateAndSmallParamsKeepFp32State) {
  at::manual_seed(1);
  auto w0 = at::randn({40, 250}) * 0.02;  // 10000 elements: 8-bit, 40 blocks, the last partial
  auto b0 = at::randn({100}) * 0.02;      // fp32 state
  std::vector<std::vector<at::Tensor>> grads;
  for (int t = 0; t < 6; ++t) grads.push_back({at::randn({40, 250}), at::randn({100})});
  auto run_with = [&](int64_t chunk) {
    auto w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
    AdamW8bit opt({w, b}, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    if (chunk) opt.set_chunk_elements(chunk);
    for (auto& g : grads) {
      w.mutable_grad() = g[0].clone();
      b.mutable_grad() = g[1].clone();
      opt.step();
    }
    auto& sw = static_cast<AdamW8bitParamState&>(*opt.state().at(w.unsafeGetTensorImpl()));
    auto& sb = static_cast<AdamW8bitParamState&>(*opt.state().at(b.unsafeGetTensorImpl()));
    EXPECT_TRUE(sw.is_8bit());
    EXPECT_EQ(sw.absmax1().numel(), 40);
    EXPECT_FALSE(sb.is_8bit());
    EXPECT_EQ(sb.state1().scalar_type(), at::kFloat);
    EXPECT_EQ(sw.step(), 6);
    return std::vector<at::Tensor>{w.detach().clone(), b.detach().clone(), sw.state1().clone(), sw.absmax2().clone()};
  };
  auto whole = run_with(0), chunked = run_with(768);
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_TRUE(at::equal(whole[i], chunked[i])) << "tensor " << i;
  EXPECT_FALSE(at::equal(whole[0], w0));  // it moved
  // Close to fp32 AdamW with the same hyperparameters (same direction, 8-bit moments).
  auto w = w0.clone().requires_grad_();
  torch::optim::AdamW ref({w}, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  for (auto& g : grads) {
    w.mutable_grad() = g[0].clone();
    ref.step();
  }
  auto d8 = whole[0] - w0, d32 = w.detach() - w0;
  const double cos = (d8 * d32).sum().item<double>() / (d8.norm().item<double>() * d32.norm().item<double>());
  EXPECT_GT(cos, 0.99);
}

TEST(AdamW8bitTrainer, ResumeContinuesTheIdenticalLossCurveWithSmallerState) {
  qf::testing::TmpDir tmp("qf_adamw8bit");
  auto full = run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a"}));
  auto first = run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=4",
                                       "trainer.schedule.total_steps=8"}));
  // The checkpoint holds 8-bit state: uint8 codes, absmax per 256 elements, steps.
  auto ck = load_checkpoint(resolve_checkpoint(tmp.path + "/b"));
  int n8 = 0;
  for (auto& [k, t] : ck.optimizer) {
    EXPECT_EQ(k.rfind("exp_avg", 0), std::string::npos) << k;
    if (k.rfind("state1/", 0) == 0 && t.scalar_type() == at::kByte) {
      ++n8;
      EXPECT_GE(t.numel(), kAdam8MinSize) << k;
    }
  }
  EXPECT_GE(n8, 1);
  auto second = run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b"}));
  ASSERT_EQ(full.losses.size(), 8u);
  ASSERT_EQ(first.losses.size(), 4u);
  ASSERT_EQ(second.losses.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(first.losses[i], full.losses[i]) << "step " << i + 1;
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(second.losses[i], full.losses[4 + i]) << "step " << 5 + i;
  EXPECT_LT(full.losses.back(), full.losses.front());
  // Optimizer memory against fp32 AdamW on the same model.
  auto adamw = run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/c", "trainer.optim.name=adamw", "trainer.max_steps=2"}));
  EXPECT_LT(full.optim_bytes, adamw.optim_bytes * 6 / 10) << full.optim_bytes << " vs " << adamw.optim_bytes;
}

TEST(AdamW8bitTrainer, SwitchingOptimizerOnResumeIsAClearError) {
  qf::testing::TmpDir tmp("qf_adamw8bit");
  run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a", "trainer.max_steps=2"}));
  const std::string file = "/optimizer.safetensors";
  auto e = error_of([&] { run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a", "trainer.optim.name=adamw"})); });
  EXPECT_NE(e.find(file + ": holds adamw8bit optimizer state"), std::string::npos) << e;
  EXPECT_NE(e.find("this run's trainer.optim.name is adamw."), std::string::npos) << e;
  EXPECT_NE(e.find("Set trainer.optim.name: adamw8bit"), std::string::npos) << e;
  EXPECT_NE(e.find("or delete "), std::string::npos) << e;

  run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=2", "trainer.optim.name=adamw"}));
  e = error_of([&] { run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b"})); });
  EXPECT_NE(e.find(file + ": holds adamw optimizer state"), std::string::npos) << e;
  EXPECT_NE(e.find("this run's trainer.optim.name is adamw8bit."), std::string::npos) << e;
  // Deleting the file, as advised, resumes with fresh 8-bit moments.
  const std::string ck = resolve_checkpoint(tmp.path + "/b");
  ASSERT_EQ(std::remove((ck + file).c_str()), 0);
  auto r = run(tiny_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=3"}));
  EXPECT_EQ(r.start_step, 2);
  EXPECT_EQ(r.end_step, 3);
}

TEST(AdamW8bitConfig, NamesAreCheckedAndZeroIsRefused) {
  qf::testing::TmpDir tmp("qf_adamw8bit");
  auto e = error_of([&] { tiny_cfg(tmp.path, {"trainer.optim.name=adam8"}); });
  EXPECT_NE(e.find("trainer.optim.name"), std::string::npos) << e;
  EXPECT_NE(e.find("adamw8bit"), std::string::npos) << e;
  e = error_of([&] { tiny_cfg(tmp.path, {"dist.zero=1"}); });
  EXPECT_NE(e.find("dist.zero"), std::string::npos) << e;
  EXPECT_NE(e.find("trainer.optim.name: adamw8bit"), std::string::npos) << e;
  EXPECT_EQ(tiny_cfg(tmp.path, {"dist.zero=1", "trainer.optim.name=adamw"}).dist.zero, 1);
  EXPECT_EQ(tiny_cfg(tmp.path, {}).trainer.optim.name, OptimName::AdamW8bit);
}
