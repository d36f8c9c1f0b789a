// PTQ: GPTQ's column-by-column quantizers equal round-to-nearest when there is no error to spread
// (H = I), for every format it takes; GPTQ beats RTN on correlated inputs; AWQ's folding leaves
// the float model unchanged; the driver's packed weights survive convert; bad input fails early.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>

#include "models/arch.h"
#include "models/transformer.h"
#include "quant/fake_quant.h"
#include "quant/ggml_blocks.h"
#include "quant/gptq.h"
#include "quant/ptq.h"
#include "tests/tiny_model.h"
#include "data/calibration.h"

using namespace qf;
using namespace qf::quant;

namespace {

at::Tensor correlated_inputs(int64_t n, int64_t d, uint64_t seed) {
  at::manual_seed(seed);
  // A few strong directions plus noise and per-channel scale differences (outlier channels), as
  // activations of a trained model look.
  auto basis = at::randn({8, d});
  auto x = at::matmul(at::randn({n, 8}), basis) + 0.3 * at::randn({n, d});
  auto ch = at::ones({d});
  ch.slice(0, 0, 4).fill_(8.0);
  return x * ch;
}

QuantSpec spec_of(const std::string& name) { return QuantSpec::preset_named(name); }

QatConfig layers_rule(const std::string& preset) {
  QatConfig q;
  q.enabled = true;
  q.rules = {QuantRule{"model.layers.*", spec_of(preset), std::nullopt}};
  return q;
}

}  // namespace

class GptqIdentity : public ::testing::TestWithParam<std::string> {};

TEST_P(GptqIdentity, EqualsRoundToNearestBitForBit) {
  const auto spec = spec_of(GetParam());
  at::manual_seed(7);
  auto W = at::randn({24, 256}) * 0.05;
  W.select(0, 3).mul_(20);  // a row of outliers
  GptqConfig cfg;
  cfg.damp = 0.0;
  for (bool act_order : {false, true}) {
    cfg.act_order = cfg.static_groups = act_order;
    auto qw = gptq_quantize(W, at::eye(256), spec, cfg, "w");
    ASSERT_TRUE(at::equal(qw.weight, fake_quant_values(W, spec))) << spec.describe();
    if (spec.is_ggml()) {
      ASSERT_TRUE(at::equal(qw.packed.qweight, ggml::quantize(W, spec.rule))) << "block bytes differ from llama.cpp's";
    } else {
      // The same bytes convert() would pack from the float weight.
      auto fq = std::make_shared<FakeQuantizer>(spec, ObserverConfig{}, false);
      auto ref = std::make_shared<torch::nn::Module>();
      auto p = register_packed(*ref, 24, 256, spec);
      pack_weight(p, W, *fq);
      ASSERT_TRUE(at::equal(qw.packed.qweight, p.qweight));
      ASSERT_TRUE(at::equal(qw.packed.scales, p.scales));
      ASSERT_TRUE(at::equal(qw.packed.zeros, p.zeros));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, GptqIdentity,
                         ::testing::Values("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "int4-g32", "int4-g128",
                                           "int4-g128-asym", "int4-g128-zp", "int4-g32-zp", "int3-g128", "int3-g128-asym",
                                           "int3-g128-zp", "int8-per-channel"),
                         [](const auto& i) {
                           std::string n = i.param;
                           for (auto& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

TEST(Gptq, BeatsRoundToNearestOnCorrelatedInputs) {
  auto X = correlated_inputs(2048, 128, 3);
  auto H = at::matmul(X.t(), X) * (2.0 / 2048);
  at::manual_seed(11);
  auto W = at::randn({64, 128}) * 0.05;
  for (const char* name : {"q4_0", "int4-g32", "int3-g128-asym", "int4-g32-zp", "int8-per-channel"}) {
    const auto spec = spec_of(name);
    const double rtn = output_error(W, fake_quant_values(W, spec), H);
    for (bool act_order : {false, true}) {
      GptqConfig cfg;
      cfg.act_order = cfg.static_groups = act_order;
      cfg.block_size = 32;  // several lazy blocks
      auto qw = gptq_quantize(W, H, spec, cfg, "w");
      const double err = output_error(W, qw.weight, H);
      EXPECT_LT(err, 0.7 * rtn) << name << " act_order " << act_order << ": gptq " << err << " rtn " << rtn;
      EXPECT_TRUE(at::equal(unpack_weight(qw.packed, spec, 64, 128), qw.weight));
    }
  }
}

TEST(Gptq, DeadInputsAndDampeningEscalation) {
  auto X = correlated_inputs(512, 64, 5);
  X.select(1, 10).zero_();  // an input that is always zero
  auto H = at::matmul(X.t(), X);
  at::manual_seed(2);
  auto W = at::randn({16, 64});
  GptqConfig cfg;
  auto qw = gptq_quantize(W, H, spec_of("int4-g32"), cfg, "w");
  EXPECT_TRUE(at::all(qw.weight.select(1, 10) == 0).item<bool>()) << "a dead input's weights become 0";
  // Rank-1 H without dampening: the Cholesky fails, dampening grows until it works.
  auto v = at::randn({64, 1});
  auto H1 = at::matmul(v, v.t());
  cfg.damp = 0.0;
  EXPECT_THROW(gptq_quantize(W, H1, spec_of("int4-g32"), cfg, "w"), Error) << "damp 0 cannot grow";
  cfg.damp = 1e-9;
  auto q1 = gptq_quantize(W, H1, spec_of("int4-g32"), cfg, "w");
  EXPECT_GT(q1.damp, 1e-9);
  // Not positive definite at any dampening: a clear error naming the layer.
  try {
    gptq_quantize(W, -at::eye(64), spec_of("int4-g32"), GptqConfig{}, "model.layers.3.mlp.up_proj");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.3.mlp.up_proj"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not positive definite"), std::string::npos) << e.what();
  }
}

TEST(Gptq, RefusesFormatsItCannotQuantizeColumnByColumn) {
  EXPECT_NE(gptq_unsupported(spec_of("q4_k")), "");
  EXPECT_NE(gptq_unsupported(spec_of("q6_k")), "");
  EXPECT_NE(gptq_unsupported(spec_of("fp8-e4m3")), "");
  EXPECT_EQ(gptq_unsupported(spec_of("q4_0")), "");
  auto m = models::build_model(qf::testing::tiny_llama());
  try {
    check_ptq(*m, layers_rule("q4_k"), PtqMethod::Gptq);
    FAIL() << "expected a ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(check_ptq(*m, layers_rule("q4_0"), PtqMethod::Gptq));
  EXPECT_THROW(check_ptq(*m, layers_rule("q4_k"), PtqMethod::Awq), ConfigError) << "256-blocks do not divide 64 inputs";
}

TEST(Ptq, CalibrationSetTooSmallIsAConfigError) {
  data::PackedSet s;
  s.tokens = at::zeros({5, 17}, at::kLong);
  s.loss_mask = at::ones({5, 17}, at::kBool);
  EXPECT_EQ(data::calibration_tokens(s, 5, "x").sizes(), (std::vector<int64_t>{5, 16}));
  try {
    data::calibration_tokens(s, 6, "the run's training split");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("quant.calib.samples"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("only 5"), std::string::npos) << e.what();
  }
}

namespace {
// A model whose norm parameters (names containing `norm_key`) are non-trivial, so folding has
// something to divide.
std::shared_ptr<models::CausalLM> with_random_norms(const models::ModelConfig& c, uint64_t seed, const std::string& norm_key) {
  auto m = models::build_model(c);
  m->init_weights(seed);
  for (auto& p : m->named_parameters())
    if (p.key().find(norm_key) != std::string::npos) {
      at::NoGradGuard ng;
      p.value().uniform_(0.5, 1.5);
    }
  m->eval();
  return m;
}
std::shared_ptr<models::CausalLM> tiny(int64_t kv_heads) {
  auto c = qf::testing::tiny_llama(64, 32, 0.1);
  c.n_kv_heads = kv_heads;
  return with_random_norms(c, 5, "layernorm");
}
at::Tensor calib(int64_t n) {
  at::manual_seed(9);
  return at::randint(0, 64, {n, 32}, at::kLong);
}
}  // namespace

TEST(Awq, FoldingKeepsTheFloatModel) {
  for (int64_t kv : {4, 2}) {  // MHA (v_proj -> o_proj folds) and GQA (it cannot)
    auto m = tiny(kv);
    auto ids = calib(4);
    at::NoGradGuard ng;
    auto before = m->forward(ids);
    PtqConfig p;
    p.method = PtqMethod::Awq;
    p.awq.clip = false;
    p.calib.batch_size = 4;
    auto r = run_ptq(*m, layers_rule("int3-g32-asym"), p, calib(16), false);
    auto after = m->forward(ids);
    EXPECT_TRUE(at::allclose(before, after, 1e-4, 1e-4)) << "kv " << kv << ": max diff "
                                                         << (before - after).abs().max().item<double>();
    EXPECT_EQ(r.linears.size(), 14u);
    EXPECT_LE(r.mean_err(), 1.05 * r.mean_err_rtn()) << "the scale search includes s = 1 (RTN)";
  }
}

TEST(Ptq, GptqWeightsSurviveConvert) {
  auto m = tiny(2);
  PtqConfig p;
  p.method = PtqMethod::Gptq;
  p.gptq.static_groups = true;  // the grid RTN finds on the original weights (what QAT's fake quant recomputes)
  auto q = layers_rule("q4_0");
  auto r = run_ptq(*m, q, p, calib(32), false);
  EXPECT_EQ(r.packed.size(), 14u);
  EXPECT_LT(r.mean_err(), r.mean_err_rtn());
  auto ids = calib(2);
  at::NoGradGuard ng;
  // The float weights are now QAT's latent weights: inside GPTQ's rounding bins, so fake quant (QAT's
  // first forward) reproduces GPTQ's codes (static groups: the grid is the one rounding finds).
  int64_t same = 0, total = 0;
  for (auto& ns : models::linear_slots(*m)) {
    auto it = r.packed.find(ns.name);
    if (it == r.packed.end()) continue;
    auto w = ns.slot->get()->effective_weight();
    auto gq = unpack_weight(it->second, q.rules[0].weight, w.size(0), w.size(1));
    same += (fake_quant_values(w, q.rules[0].weight) == gq).sum().item<int64_t>();
    total += w.numel();
  }
  // Only the pinned block extremes (whose original value fixes the grid) may differ.
  EXPECT_GT(static_cast<double>(same) / static_cast<double>(total), 0.98) << same << " of " << total;
  prepare(*m, q);
  auto fake = m->forward(ids);
  convert(*m);
  apply_packed(*m, r);
  for (auto& ns : models::linear_slots(*m)) {
    auto it = r.packed.find(ns.name);
    if (it == r.packed.end()) continue;
    auto ql = std::dynamic_pointer_cast<QuantizedLinear>(ns.slot->get());
    ASSERT_TRUE(ql);
    EXPECT_TRUE(at::equal(ql->qweight, it->second.qweight));
  }
  EXPECT_TRUE(at::isfinite(fake).all().item<bool>());
}

TEST(Ptq, Gpt2FoldsIntoLayerNormsAndQuantizesItsConv1dLinears) {
  auto c = qf::testing::tiny_llama(64, 32, 0.1);
  c.family = models::Family::Gpt2;
  c.n_kv_heads = 0;
  c.tie_embeddings = true;
  auto m = with_random_norms(c, 3, ".ln_");  // weights and biases of ln_1 / ln_2
  QatConfig q;
  q.enabled = true;
  q.rules = {QuantRule{"transformer.h.*", spec_of("int4-g32"), std::nullopt}};
  auto ids = calib(2);
  at::NoGradGuard ng;
  auto before = m->forward(ids);
  PtqConfig p;
  p.method = PtqMethod::Awq;
  p.awq.clip = false;
  auto r = run_ptq(*m, q, p, calib(16), false);
  EXPECT_EQ(r.linears.size(), 8u);  // c_attn, attn.c_proj, c_fc, mlp.c_proj per block
  EXPECT_TRUE(at::allclose(before, m->forward(ids), 1e-4, 1e-4)) << "ln_1/ln_2 folding keeps the float model";
  p.method = PtqMethod::Gptq;
  auto g = run_ptq(*m, q, p, calib(16), false);
  EXPECT_EQ(g.packed.size(), 8u);
  EXPECT_LT(g.mean_err(), g.mean_err_rtn());
  prepare(*m, q);
  convert(*m);
  apply_packed(*m, g);
  for (auto& ns : models::linear_slots(*m)) {
    if (auto it = g.packed.find(ns.name); it != g.packed.end()) {
      EXPECT_TRUE(at::equal(ns.slot->get()->effective_weight(),
                            unpack_weight(it->second, q.rules[0].weight, ns.slot->get()->out_features,
                                          ns.slot->get()->in_features)));
    }
  }
}

TEST(Gptq, ActOrderWithoutStaticGroupsKeepsAColumnGroupMap) {
  auto X = correlated_inputs(2048, 128, 4);
  auto H = at::matmul(X.t(), X) * (2.0 / 2048);
  at::manual_seed(12);
  auto W = at::randn({64, 128}) * 0.05;
  GptqConfig cfg;
  cfg.act_order = true;
  const auto spec = spec_of("int4-g32");
  auto qw = gptq_quantize(W, H, spec, cfg, "w");
  ASSERT_TRUE(qw.packed.g_idx.defined());
  EXPECT_EQ(at::bincount(qw.packed.g_idx.to(at::kLong)).sizes(), (std::vector<int64_t>{4}));
  EXPECT_TRUE(at::all(at::bincount(qw.packed.g_idx.to(at::kLong)) == 32).item<bool>()) << "32 columns per group";
  EXPECT_FALSE(at::equal(qw.packed.g_idx, at::arange(128, at::kInt).div(32, "floor").to(at::kInt)))
      << "columns 0..3 (the loud ones) come first, so groups are not contiguous";
  EXPECT_TRUE(at::equal(unpack_weight(qw.packed, spec, 64, 128), qw.weight));
  EXPECT_LT(output_error(W, qw.weight, H), 0.7 * output_error(W, fake_quant_values(W, spec), H));
  // llama.cpp blocks cannot take a column map: act-order runs with static groups there.
  auto q40 = gptq_quantize(W, H, spec_of("q4_0"), cfg, "w");
  EXPECT_FALSE(q40.packed.g_idx.defined());
  // The map survives convert: a QuantizedLinear with it dequantizes to GPTQ's weight.
  auto ql = std::make_shared<QuantizedLinear>(128, 64, false, spec, std::nullopt);
  {
    at::NoGradGuard ng;
    ql->qweight.copy_(qw.packed.qweight), ql->scales.copy_(qw.packed.scales), ql->zeros.copy_(qw.packed.zeros);
  }
  ql->set_g_idx(qw.packed.g_idx);
  EXPECT_TRUE(at::equal(ql->effective_weight(), qw.weight));
  EXPECT_EQ(ql->packed_bytes(), 64 * 64 + 64 * 4 * 4 + 128 * 4);
}

// Every family's AWQ pairs fold into what feeds them (Gemma's norms as 1 + w, OPT's fc1 through
// ReLU, Phi-3's fused projections) without changing the float model, and the folds are not all
// trivial (some scale moved a weight), so a wrong fold would show.
TEST(Awq, FoldingKeepsTheFloatModelOfEveryFamily) {
  for (const auto* a : models::arch_specs()) {
    auto c = qf::testing::tiny_llama(64, 32, 0.1);
    c.family = a->family;
    c.n_kv_heads = a->positions.empty() ? 2 : 0;
    c.qk_norm = a->family == models::Family::Qwen3 || a->family == models::Family::Gemma3;
    c.tie_embeddings = a->tied_always;
    if (a->family == models::Family::Gemma2 || a->family == models::Family::Gemma3) {
      c.sliding_window = 8;
      c.sliding_layers = {0};
    }
    auto m = models::build_model(c);
    {
      at::NoGradGuard ng;  // salient input channels, as trained models have: 4 norm channels x 4
      for (auto& p : m->named_parameters())
        if (p.value().dim() == 1 && p.key().size() > 7 && p.key().compare(p.key().size() - 7, 7, ".weight") == 0)
          p.value().narrow(0, 0, 4).add_(3.0);
    }
    auto ids = calib(4);
    at::NoGradGuard ng;
    auto before = m->forward(ids);
    std::map<std::string, at::Tensor> w0;
    for (auto& p : m->named_parameters()) w0[p.key()] = p.value().clone();
    PtqConfig p;
    p.method = PtqMethod::Awq;
    p.awq.clip = false;
    p.calib.batch_size = 4;
    QatConfig q;
    q.enabled = true;
    q.rules = {QuantRule{a->layers + ".*", spec_of("int4-g32"), std::nullopt}};
    run_ptq(*m, q, p, calib(16), false);
    auto after = m->forward(ids);
    double moved = 0;
    for (auto& p : m->named_parameters()) moved = std::max(moved, (p.value() - w0[p.key()]).abs().max().item<double>());
    EXPECT_GT(moved, 1e-3) << a->name << ": every AWQ scale stayed 1; the test would not see a wrong fold";
    EXPECT_TRUE(at::allclose(before, after, 1e-4, 1e-4))
        << a->name << ": folding changed the float model, max diff " << (before - after).abs().max().item<double>();
  }
}
