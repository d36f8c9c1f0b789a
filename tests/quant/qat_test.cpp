// QAT parity suite (torchao's test_qat.py shape): disabled fake quant == plain Linear (fwd + bwd),
// STE gradient == mask * upstream, LSQ gradients == finite differences of the STE surrogate,
// convert == fake quant (weights bit-identical, logits 1e-5), converted checkpoints round-trip,
// prepare errors name the layer and numbers.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "core/error.h"
#include "models/transformer.h"
#include "quant/affine.h"
#include "quant/cuda/dequant.h"
#include "quant/ggml_blocks.h"
#include "quant/fake_quant.h"
#include "quant/qat.h"
#include "models/state.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::quant;

namespace {

models::ModelConfig tiny() { return qf::testing::tiny_llama(); }

QatConfig qat(const std::string& preset, const std::string& act = "") {
  QatConfig q;
  q.enabled = true;
  QuantRule r;
  r.pattern = "model.layers.*";
  r.weight = QuantSpec::preset_named(preset);
  if (!act.empty()) r.activation = QuantSpec::preset_named(act);
  q.rules.push_back(r);
  return q;
}

at::Tensor ids() {
  auto g = at::detail::createCPUGenerator(3);
  return at::randint(64, {2, 12}, g, at::kLong);
}

TEST(FakeQuant, DisabledEqualsPlainLinearForwardAndBackward) {
  auto a = models::build_model(tiny());
  auto b = models::build_model(tiny());
  prepare(*b, qat("q4_0"));
  set_qat_step(*b, 0, /*enable_after=*/10);  // delayed: not yet enabled
  auto x = ids();
  auto la = a->forward(x).sum(), lb = b->forward(x).sum();
  EXPECT_TRUE(at::equal(a->forward(x), b->forward(x)));
  la.backward();
  lb.backward();
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (auto& p : pa) EXPECT_TRUE(at::equal(p.value().grad(), pb[p.key()].grad())) << p.key();
  set_qat_step(*b, 10, 10);
  EXPECT_FALSE(at::equal(a->forward(x), b->forward(x)));
}

TEST(FakeQuant, SteGradientIsMaskTimesUpstream) {
  auto g = at::detail::createCPUGenerator(5);
  auto x = at::randn({8, 64}, g).mul_(0.5).requires_grad_(true);
  // Static per-tensor int4 with a clipping range smaller than the data, so some values clip.
  auto spec = QuantSpec::preset_named("int4-g32");
  auto up = at::randn({8, 64}, g);
  auto y = fake_quant_ste(x, spec);
  (y * up).sum().backward();
  auto qp = choose_qparams(x.detach(), spec);
  auto [fq, mask] = fake_quant_affine(x.detach(), qp, spec);
  EXPECT_TRUE(at::equal(y.detach(), fq));
  EXPECT_TRUE(at::equal(x.grad(), up * mask.to(at::kFloat)));
  // ggml formats never clip: identity gradient.
  auto x2 = x.detach().clone().requires_grad_(true);
  (fake_quant_ste(x2, QuantSpec::preset_named("q4_0")) * up).sum().backward();
  EXPECT_TRUE(at::equal(x2.grad(), up));
}

TEST(FakeQuant, LsqGradientsMatchFiniteDifferences) {
  auto g = at::detail::createCPUGenerator(7);
  auto x = at::randn({4, 32}, g, at::kDouble);
  auto up = at::randn({4, 32}, g, at::kDouble);
  const int64_t qmin = -8, qmax = 7, block = 16;
  auto s0 = at::full({4, 2}, 0.15, at::kDouble).requires_grad_(true);
  auto b0 = at::full({4, 2}, 0.05, at::kDouble).requires_grad_(true);
  auto xr = x.clone().requires_grad_(true);
  (lsq_fake_quant(xr, s0, b0, qmin, qmax, block) * up).sum().backward();
  // STE surrogate around (s0, b0): round(v) -> round(v0) + (v - v0), clamp decided at v0.
  auto v0 = ((x.reshape({4, 2, 16}) - b0.detach().unsqueeze(-1)) / s0.detach().unsqueeze(-1));
  auto r0 = at::round(v0);
  auto inside = (v0 >= qmin) & (v0 <= qmax);
  auto F = [&](const at::Tensor& s, const at::Tensor& b) {
    auto v = (x.reshape({4, 2, 16}) - b.unsqueeze(-1)) / s.unsqueeze(-1);
    auto q = at::where(inside, r0 + (v - v0), at::clamp(r0, qmin, qmax));
    return ((q * s.unsqueeze(-1) + b.unsqueeze(-1)).reshape({4, 32}) * up).sum().item<double>();
  };
  const double h = 1e-6, gscale = 1.0 / std::sqrt(double(block) * qmax);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      auto sp = s0.detach().clone(), sm = s0.detach().clone();
      sp[i][j] += h;
      sm[i][j] -= h;
      double fd = (F(sp, b0.detach()) - F(sm, b0.detach())) / (2 * h);
      EXPECT_NEAR(s0.grad()[i][j].item<double>(), fd * gscale, 1e-6 * std::max(1.0, std::abs(fd))) << i << "," << j;
      auto bp = b0.detach().clone(), bm = b0.detach().clone();
      bp[i][j] += h;
      bm[i][j] -= h;
      double fdb = (F(s0.detach(), bp) - F(s0.detach(), bm)) / (2 * h);
      EXPECT_NEAR(b0.grad()[i][j].item<double>(), fdb * gscale, 1e-6 * std::max(1.0, std::abs(fdb))) << i << "," << j;
    }
  EXPECT_TRUE(at::equal(xr.grad(), up * inside.reshape({4, 32}).to(at::kDouble)));
}

class ConvertParity : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(ConvertParity, ConvertedEqualsFakeQuant) {
  auto [wp, ap] = GetParam();
  auto c = tiny();
  if (wp == "int4-g128-asym" || wp == "int4-g128-zp") c.dim = 128, c.ffn_dim = 256;  // groups of 128 need 128-wide inputs
  auto m = models::build_model(c);
  auto rep = prepare(*m, qat(wp, ap));
  EXPECT_EQ(rep.n_swapped, 2 * 7);
  at::NoGradGuard ng;
  auto x = ids();
  auto y_fq = m->forward(x);
  std::map<std::string, at::Tensor> w_fq;
  for (auto& ns : models::linear_slots(*m)) w_fq[ns.name] = ns.slot->get()->effective_weight().clone();
  EXPECT_EQ(convert(*m), 14);
  for (auto& ns : models::linear_slots(*m)) {
    if (!w_fq.count(ns.name) || ns.name == "lm_head") continue;
    auto w = ns.slot->get()->effective_weight();
    EXPECT_TRUE(at::equal(w, w_fq[ns.name])) << wp << " " << ns.name;
  }
  auto y_q = m->forward(x);
  double rel = ((y_q - y_fq).abs().max() / y_fq.abs().max()).item<double>();
  EXPECT_LT(rel, 1e-5) << wp;
}

INSTANTIATE_TEST_SUITE_P(Presets, ConvertParity,
                         ::testing::Values(std::make_pair("q4_0", ""), std::make_pair("q8_0", ""), std::make_pair("q4_1", ""),
                                           std::make_pair("int4-g32", ""), std::make_pair("int4-g128-asym", ""),
                                           std::make_pair("int4-g128-zp", ""), std::make_pair("int4-g32-zp", ""),
                                           std::make_pair("int3-g32-zp", "int8-per-token"),
                                           std::make_pair("int8-per-channel", ""), std::make_pair("int4-g32", "int8-per-token"),
                                           std::make_pair("fp8-e4m3", ""), std::make_pair("fp8-e5m2", "")),
                         [](const auto& i) {
                           std::string n = i.param.first + (i.param.second.empty() ? "" : "_" + i.param.second);
                           for (auto& c : n)
                             if (!isalnum((unsigned char)c)) c = '_';
                           return n;
                         });

TEST(Convert, LsqAfterTrainingStepsStillExact) {
  auto m = models::build_model(tiny());
  auto q = qat("int4-g32");
  q.rules[0].weight.learn = Learn::Lsq;
  q.rules[0].weight.dynamic = false;
  prepare(*m, q);
  std::vector<at::Tensor> params;
  for (auto& p : m->parameters()) params.push_back(p);
  bool has_scale = false;
  for (auto& p : m->named_parameters()) has_scale |= p.key().find("weight_fake_quant.scale") != std::string::npos;
  ASSERT_TRUE(has_scale);
  auto x = ids();
  for (int i = 0; i < 3; ++i) {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    m->forward(x).pow(2).mean().backward();
    at::NoGradGuard ng;
    for (auto& p : params)
      if (p.grad().defined()) p.sub_(p.grad() * 1e-2);
  }
  at::NoGradGuard ng;
  auto y_fq = m->forward(x);
  convert(*m);
  auto y_q = m->forward(x);
  EXPECT_LT(((y_q - y_fq).abs().max() / y_fq.abs().max()).item<double>(), 1e-5);
}

TEST(Convert, ConvertedCheckpointRoundTrips) {
  auto m = models::build_model(tiny());
  prepare(*m, qat("q4_0", "int8-per-token"));
  convert(*m);
  auto state = models::model_state(*m);
  bool has_q = false;
  for (auto& [n, t] : state) has_q |= n == "model.layers.0.self_attn.q_proj.qweight";
  EXPECT_TRUE(has_q);
  auto m2 = models::build_model(tiny());
  m2->init_weights(99);
  prepare(*m2, qat("q4_0", "int8-per-token"));
  convert(*m2);
  models::load_model_state(*m2, state, "<mem>");
  at::NoGradGuard ng;
  EXPECT_TRUE(at::equal(m->forward(ids()), m2->forward(ids())));
  // q4_0 packs 32 weights into 18 bytes: the converted model is much smaller than fp32.
  auto fp = models::build_model(tiny());
  EXPECT_LT(model_bytes(*m), model_bytes(*fp) / 2);
}

// Integer-zero-point weights (AutoAWQ / GPTQ asym): convert stores codes in [0, 15], fp16 scales and
// integer zero points; a converted checkpoint loads back bit for bit, and the packed bytes count
// the zero points at 4 bits.
TEST(Convert, IntegerZeroPointCheckpointRoundTrips) {
  auto m = models::build_model(tiny());
  prepare(*m, qat("int4-g32-zp"));
  at::NoGradGuard ng;
  auto y_fq = m->forward(ids());
  convert(*m);
  auto y_q = m->forward(ids());
  EXPECT_LT(((y_q - y_fq).abs().max() / y_fq.abs().max()).item<double>(), 1e-5);
  bool seen = false;
  for (auto& ns : models::linear_slots(*m)) {
    auto q = std::dynamic_pointer_cast<QuantizedLinear>(ns.slot->get());
    if (!q) continue;
    seen = true;
    EXPECT_EQ(q->scales.scalar_type(), at::kHalf);
    auto z = q->zeros;
    EXPECT_TRUE(at::equal(z, at::round(z))) << ns.name;
    EXPECT_GE(z.min().item<float>(), 0.f);
    EXPECT_LE(z.max().item<float>(), 15.f);
    auto codes = q->int_codes();
    EXPECT_GE(codes.min().item<int>(), 0);
    EXPECT_LE(codes.max().item<int>(), 15);
    // (q - z) * s, by hand
    auto s = q->scales.to(at::kFloat).repeat_interleave(32, 1), zz = z.repeat_interleave(32, 1);
    EXPECT_TRUE(at::equal((codes.to(at::kFloat) - zz) * s, q->effective_weight())) << ns.name;
    const int64_t n = q->in_features * q->out_features, groups = n / 32;
    EXPECT_EQ(q->packed_bytes(), n / 2 + groups * 2 + groups / 2 + (q->bias.defined() ? q->bias.numel() * 4 : 0));
  }
  EXPECT_TRUE(seen);
  auto state = models::model_state(*m);
  auto m2 = models::build_model(tiny());
  m2->init_weights(99);
  prepare(*m2, qat("int4-g32-zp"));
  convert(*m2);
  models::load_model_state(*m2, state, "<mem>");
  EXPECT_TRUE(at::equal(m->forward(ids()), m2->forward(ids())));
}

// The preset and the explicit spelling (zero_point: int) read back from to_yaml unchanged; an
// integer zero point on a symmetric spec, or with learned scales, is refused naming the key.
TEST(QatConfig, IntegerZeroPointSpecsRoundTripAndAreValidated) {
  const std::string yaml = R"(quant:
  enabled: true
  rules:
    - pattern: "model.layers.*.mlp.*"
      weight: {preset: int4-g128-zp}
    - pattern: "model.layers.*"
      weight: {bits: 3, symmetric: false, granularity: per-group, group_size: 64, scale_dtype: fp16, zero_point: int}
)";
  YAML::Node first, second;
  const auto c = qf::testing::parse_section<QatConfig>(yaml, "quant", &first);
  ASSERT_EQ(c.rules.size(), 2u);
  EXPECT_EQ(c.rules[0].weight.rule, Rule::IntZeroPoint);
  EXPECT_EQ(c.rules[1].weight.rule, Rule::IntZeroPoint);
  EXPECT_EQ(c.rules[1].weight.bits, 3);
  YAML::Node doc;
  doc["quant"] = c.to_yaml();
  const auto again = qf::testing::parse_section<QatConfig>(YAML::Dump(doc), "quant", &second);
  EXPECT_EQ(YAML::Dump(first), YAML::Dump(second));
  EXPECT_EQ(again.rules[0].weight.preset, "int4-g128-zp");
  EXPECT_EQ(again.rules[1].weight.rule, Rule::IntZeroPoint);
  EXPECT_EQ(again.rules[1].weight.describe(), c.rules[1].weight.describe());
  auto expect_error = [](const std::string& y, const std::string& needle) {
    try {
      qf::testing::parse_section<QatConfig>(y, "quant");
      ADD_FAILURE() << "accepted: " << y;
    } catch (const qf::ConfigError& e) {
      std::string all;
      for (auto& p : e.problems) all += p + "\n";
      EXPECT_NE(all.find(needle), std::string::npos) << all;
    }
  };
  expect_error("quant: {rules: [{weight: {bits: 4, symmetric: true, zero_point: int}}]}", "zero_point");
  expect_error("quant: {rules: [{weight: {preset: int4-g32-zp, learn: lsq}}]}", "learn");
  expect_error("quant: {rules: [{weight: {bits: 4, symmetric: false, zero_point: integer}}]}", "float");
}

TEST(Embedding, FakeQuantTableFeedsLookupAndTiedHeadAndConvertsExactly) {
  for (bool tied : {true, false}) {
    auto c = tiny();
    c.tie_embeddings = tied;
    auto m = models::build_model(c);
    auto fp = models::build_model(c);
    auto q = qat("q4_0");
    q.embedding = QuantSpec::preset_named("q8_0");
    auto rep = prepare(*m, q);
    EXPECT_EQ(rep.n_swapped, 15);
    EXPECT_TRUE(std::dynamic_pointer_cast<FakeQuantEmbedding>(m->token_embedding().get()));
    EXPECT_TRUE(m->named_parameters().contains("model.embed_tokens.weight"));  // HF name kept
    auto x = ids();
    // Gradients reach the float table through the STE.
    m->forward(x).sum().backward();
    EXPECT_TRUE(m->named_parameters()["model.embed_tokens.weight"].grad().defined());
    at::NoGradGuard ng;
    auto table_fq = m->token_embedding().get()->table().clone();
    EXPECT_TRUE(at::equal(table_fq, fake_quant_values(m->named_parameters()["model.embed_tokens.weight"],
                                                      QuantSpec::preset_named("q8_0"))));
    auto y_fq = m->forward(x);
    EXPECT_EQ(convert(*m), 15);
    EXPECT_TRUE(std::dynamic_pointer_cast<QuantizedEmbedding>(m->token_embedding().get()));
    EXPECT_TRUE(at::equal(m->token_embedding().get()->table(), table_fq));
    auto y_q = m->forward(x);
    EXPECT_LT(((y_q - y_fq).abs().max() / y_fq.abs().max()).item<double>(), 1e-5) << tied;
    // The converted checkpoint stores the packed table, not the float one.
    auto state = models::model_state(*m);
    bool packed = false, fl = false;
    for (auto& [n, t] : state) packed |= n == "model.embed_tokens.qweight", fl |= n == "model.embed_tokens.weight";
    EXPECT_TRUE(packed);
    EXPECT_FALSE(fl);
    auto m2 = models::build_model(c);
    prepare(*m2, q);
    convert(*m2);
    models::load_model_state(*m2, state, "<mem>");
    EXPECT_TRUE(at::equal(m2->forward(x), y_q));
    EXPECT_LT(model_bytes(*m), model_bytes(*fp) / 3);
  }
}

TEST(Prepare, ErrorsNameLayerAndNumbers) {
  auto c = tiny();
  c.dim = 48;  // q4_0 blocks of 32 do not divide 48
  c.ffn_dim = 64;
  c.n_heads = 4;
  auto m = models::build_model(c);
  try {
    prepare(*m, qat("q4_0"));
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("model.layers.0.self_attn.q_proj"), std::string::npos) << w;
    EXPECT_NE(w.find("32"), std::string::npos) << w;
    EXPECT_NE(w.find("48"), std::string::npos) << w;
  }
  auto m3 = models::build_model(c);
  auto qe = qat("q8_0");
  qe.rules.clear();
  qe.embedding = QuantSpec::preset_named("q4_k");  // 256-blocks do not divide 48
  try {
    prepare(*m3, qe);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("quant.embedding: block size 256"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens"), std::string::npos) << e.what();
  }
  auto m2 = models::build_model(tiny());
  auto q = qat("q4_0");
  q.rules[0].pattern = "model.layerz.*";
  try {
    prepare(*m2, q);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("quant.rules[0].pattern: 'model.layerz.*' matches no linear module"), std::string::npos)
        << e.what();
  }
}

TEST(Prepare, ExcludesLmHeadAndEmbeddingsByDefault) {
  auto c = tiny();
  auto m = models::build_model(c);
  auto q = qat("q8_0");
  q.rules[0].pattern = "*";
  auto rep = prepare(*m, q);
  EXPECT_EQ(rep.n_swapped, 14);  // lm_head untouched
  for (auto& ns : models::linear_slots(*m))
    if (ns.name == "lm_head") {
      EXPECT_FALSE(std::dynamic_pointer_cast<FakeQuantLinear>(ns.slot->get()));
    }
}

TEST(FakeQuant, Bf16ModelRuns) {
  auto c = tiny();
  c.dtype = models::DType::BF16;
  auto m = models::build_model(c);
  prepare(*m, qat("q4_0"));
  at::NoGradGuard ng;
  auto y = m->forward(ids());
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::isfinite(y).all().item<bool>());
}

TEST(FakeQuant, ObserversFreezeAndMatchConvert) {
  for (auto type : {ObserverType::MinMax, ObserverType::MovingAverage, ObserverType::Mse, ObserverType::Percentile}) {
    auto m = models::build_model(tiny());
    auto q = qat("int8-per-channel");
    q.observer.type = type;
    q.observer.freeze_after = 2;
    prepare(*m, q);
    auto x = ids();
    for (int step = 0; step < 4; ++step) {
      set_qat_step(*m, step, 0);
      m->forward(x);
    }
    at::NoGradGuard ng;
    auto y_fq = m->forward(x);
    convert(*m);
    EXPECT_LT(((m->forward(x) - y_fq).abs().max() / y_fq.abs().max()).item<double>(), 1e-5) << (int)type;
  }
}

TEST(Cuda, GgmlDequantKernelMatchesCpu) {
  if (!cuda_kernels_built()) GTEST_SKIP() << "built without the CUDA toolkit: no CUDA kernels to run";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: CUDA quant kernels compiled but not run";
  auto g = at::detail::createCPUGenerator(11);
  auto w = at::randn({96, 256}, g);
  for (auto rule : {Rule::GgmlQ8_0, Rule::GgmlQ4_0, Rule::GgmlQ4_1}) {
    auto blocks = ggml::quantize(w, rule);
    auto cpu = ggml::dequantize(blocks, rule, 256);
    auto gpu = cuda::dequantize_ggml(blocks.cuda(), rule, 256, at::kFloat).cpu();
    EXPECT_TRUE(at::equal(cpu, gpu)) << (int)rule;
    auto gpu_bf16 = cuda::dequantize_ggml(blocks.cuda(), rule, 256, at::kBFloat16).cpu();
    EXPECT_TRUE(at::equal(cpu.to(at::kBFloat16), gpu_bf16)) << (int)rule;
  }
}

}  // namespace

// QatConfig::to_yaml is what from_config reads back (qforge quantize writes its output run's recipe
// with it): every key of a rich quant section, defaults filled, resolves identically after a round
// trip, so a key renamed on one side only fails here rather than in `qforge train OUT/config.yaml`.
TEST(QatConfig, ToYamlReadsBackToTheSameResolvedSection) {
  qf::testing::TmpDir tmp;
  qf::testing::write_text(tmp.path + "/calib.yaml", "data: {sources: []}\n");
  const std::string yaml = std::string(R"(quant:
  enabled: true
  rules:
    - pattern: "model.layers.*.mlp.*"
      weight: {preset: q4_k}
    - pattern: "model.layers.*"
      weight: {bits: 4, symmetric: false, granularity: per-group, group_size: 64, scale_dtype: fp16, learn: lsq+}
      activation: {preset: int8-per-token}
    - pattern: "*"
      weight: {kind: fp8-e5m2, granularity: per-tensor}
  embedding: {preset: q8_0}
  exclude: [lm_head, model.norm]
  fake_quant_after_steps: 7
  observer: {type: percentile, averaging_constant: 0.05, percentile: 99.5, freeze_after: 11}
  convert_at_end: false
  init: awq
  calib: {samples: 9, batch_size: 3, data: )") + tmp.path + R"(/calib.yaml}
  gptq: {damp: 0.02, block_size: 64, act_order: true, static_groups: false, true_sequential: false}
  awq: {grid: 10, duo_scaling: true, clip: false, max_shrink: 0.25, tokens: 1024, clip_tokens: 128}
)";
  YAML::Node first, second;
  const auto c = qf::testing::parse_section<QatConfig>(yaml, "quant", &first);
  YAML::Node doc;
  doc["quant"] = c.to_yaml();
  const auto again = qf::testing::parse_section<QatConfig>(YAML::Dump(doc), "quant", &second);
  EXPECT_EQ(YAML::Dump(first), YAML::Dump(second));
  EXPECT_EQ(YAML::Dump(c.to_yaml()), YAML::Dump(again.to_yaml()));
  ASSERT_EQ(again.rules.size(), 3u);
  EXPECT_EQ(again.rules[1].weight.learn, qf::quant::Learn::LsqPlus);
  EXPECT_EQ(again.observer.type, qf::quant::ObserverType::Percentile);
  EXPECT_EQ(again.init.method, qf::quant::PtqMethod::Awq);
}
