// Model invariants: causal masking, RoPE vs transformers' reference values, KV cache == full
// forward, GQA == MHA with duplicated KV heads, HF parameter names, linear-slot swapping.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "models/generate.h"
#include "models/transformer.h"

using namespace qf::models;

namespace {

ModelConfig tiny(Family f = Family::Llama) {
  ModelConfig c;
  c.family = f;
  c.vocab_size = 97;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = f == Family::Llama ? 2 : 0;
  c.max_seq_len = 64;
  c.tie_embeddings = f == Family::Gpt2;
  c.init_std = 0.2;  // larger weights make attention patterns non-trivial
  return c;
}

at::Tensor ids(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  auto g = at::detail::createCPUGenerator(seed);
  return at::randint(V, {B, T}, g, at::kLong);
}

class BothFamilies : public ::testing::TestWithParam<Family> {};

TEST_P(BothFamilies, CausalMaskingFutureTokensDoNotChangePastLogits) {
  auto m = build_model(tiny(GetParam()));
  at::NoGradGuard ng;
  auto x = ids(2, 16, 97, 1);
  auto y = x.clone();
  y.index_put_({at::indexing::Slice(), 10}, (x.index({at::indexing::Slice(), 10}) + 1) % 97);
  auto a = m->forward(x), b = m->forward(y);
  auto s = at::indexing::Slice(0, 10);
  EXPECT_TRUE(at::allclose(a.index({at::indexing::Slice(), s}), b.index({at::indexing::Slice(), s}), 0, 0));
  EXPECT_FALSE(at::allclose(a.index({at::indexing::Slice(), 10}), b.index({at::indexing::Slice(), 10})));
}

TEST_P(BothFamilies, KVCacheIncrementalEqualsFullForward) {
  auto m = build_model(tiny(GetParam()));
  at::NoGradGuard ng;
  auto x = ids(2, 20, 97, 2);
  auto full = m->forward(x);
  auto cache = m->make_cache(2, 32);
  // prompt of 7 tokens, then a chunk of 5 (masked prefill with past > 0), then one at a time
  std::vector<at::Tensor> parts;
  parts.push_back(m->forward(x.narrow(1, 0, 7), &cache));
  parts.push_back(m->forward(x.narrow(1, 7, 5), &cache));
  for (int64_t t = 12; t < 20; ++t) parts.push_back(m->forward(x.narrow(1, t, 1), &cache));
  EXPECT_EQ(cache.length, 20);
  auto inc = at::cat(parts, 1);
  EXPECT_TRUE(at::allclose(inc, full, 1e-5, 1e-5)) << (inc - full).abs().max().item<double>();
}

TEST_P(BothFamilies, GreedyGenerationMatchesArgmaxOfFullForward) {
  auto m = build_model(tiny(GetParam()));
  SamplingConfig s;
  s.temperature = 0;
  s.max_new_tokens = 12;
  std::vector<int64_t> prompt{5, 17, 3, 42};
  auto out = generate(*m, prompt, s, -1);
  ASSERT_EQ(out.size(), 12u);
  at::NoGradGuard ng;
  std::vector<int64_t> seq = prompt;
  for (size_t i = 0; i < out.size(); ++i) {
    auto logits = m->forward(at::tensor(seq, at::kLong).unsqueeze(0));
    int64_t want = logits[0][-1].argmax().item<int64_t>();
    EXPECT_EQ(out[i], want) << "step " << i;
    seq.push_back(want);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, BothFamilies, ::testing::Values(Family::Llama, Family::Gpt2),
                         [](const auto& i) { return i.param == Family::Llama ? std::string("llama") : std::string("gpt2"); });

// Reference attention written out by hand: softmax(QK^T/sqrt(d) + causal mask) V with repeated KV heads.
TEST(Llama, SdpaPathEqualsNaiveAttention) {
  auto c = tiny();
  c.n_layers = 1;
  auto m = build_model(c);
  at::NoGradGuard ng;
  auto x = ids(1, 9, 97, 3);
  auto ref_logits = [&]() {
    auto p = m->named_parameters();
    auto W = [&](const std::string& n) { return p[n]; };
    auto h = at::embedding(W("model.embed_tokens.weight"), x);
    auto rms = [&](const at::Tensor& v, const at::Tensor& w) { return w * (v * at::rsqrt(v.pow(2).mean(-1, true) + c.norm_eps)); };
    const int64_t T = 9, H = c.n_heads, KV = c.kv_heads(), D = c.hdim();
    auto a = rms(h, W("model.layers.0.input_layernorm.weight"));
    auto q = at::linear(a, W("model.layers.0.self_attn.q_proj.weight")).view({1, T, H, D}).transpose(1, 2);
    auto k = at::linear(a, W("model.layers.0.self_attn.k_proj.weight")).view({1, T, KV, D}).transpose(1, 2);
    auto v = at::linear(a, W("model.layers.0.self_attn.v_proj.weight")).view({1, T, KV, D}).transpose(1, 2);
    auto [cos, sin] = rope_cos_sin(c, 0, T, q.options());
    q = apply_rope(q, cos, sin);
    k = apply_rope(k, cos, sin);
    k = k.repeat_interleave(H / KV, 1);
    v = v.repeat_interleave(H / KV, 1);
    auto sc = at::matmul(q, k.transpose(-1, -2)) / std::sqrt((double)D);
    sc = sc.masked_fill(at::ones({T, T}, at::kBool).triu(1), -INFINITY);
    auto o = at::matmul(at::softmax(sc, -1), v).transpose(1, 2).reshape({1, T, H * D});
    h = h + at::linear(o, W("model.layers.0.self_attn.o_proj.weight"));
    auto b = rms(h, W("model.layers.0.post_attention_layernorm.weight"));
    auto g = at::linear(b, W("model.layers.0.mlp.gate_proj.weight"));
    auto u = at::linear(b, W("model.layers.0.mlp.up_proj.weight"));
    h = h + at::linear(at::silu(g) * u, W("model.layers.0.mlp.down_proj.weight"));
    h = rms(h, W("model.norm.weight"));
    return at::linear(h, W("lm_head.weight"));
  }();
  auto got = m->forward(x);
  EXPECT_TRUE(at::allclose(got, ref_logits, 1e-5, 1e-5)) << (got - ref_logits).abs().max().item<double>();
}

TEST(Llama, GqaEqualsMhaWithDuplicatedKvHeads) {
  auto cg = tiny();  // 4 heads, 2 kv heads
  auto cm = cg;
  cm.n_kv_heads = 4;
  auto g = build_model(cg), m = build_model(cm);
  at::NoGradGuard ng;
  auto pg = g->named_parameters(), pm = m->named_parameters();
  const int64_t D = cg.hdim();
  for (auto& p : pm) {
    const auto& n = p.key();
    if (n.find("k_proj.weight") != std::string::npos || n.find("v_proj.weight") != std::string::npos) {
      // kv head j serves query heads 2j, 2j+1: duplicate its rows per query-head group
      auto w = pg[n].view({2, D, cg.dim}).repeat_interleave(2, 0).reshape({4 * D, cg.dim});
      p.value().copy_(w);
    } else {
      p.value().copy_(pg[n]);
    }
  }
  auto x = ids(2, 12, 97, 4);
  EXPECT_TRUE(at::allclose(g->forward(x), m->forward(x), 1e-5, 1e-5));
}

TEST(Llama, GroupsOfOneIsMha) {
  auto c = tiny();
  c.n_kv_heads = 4;
  auto a = build_model(c);
  c.n_kv_heads = 0;
  auto b = build_model(c);
  at::NoGradGuard ng;
  auto x = ids(1, 8, 97, 5);
  EXPECT_TRUE(at::equal(a->forward(x), b->forward(x)));
}

TEST(Llama, HuggingFaceParameterNames) {
  auto c = tiny();
  c.qkv_bias = true;  // Qwen2
  auto m = build_model(c);
  auto p = m->named_parameters();
  for (const char* n : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.o_proj.weight",
                        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                        "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(p.contains(n)) << n;
  EXPECT_FALSE(p.contains("model.layers.0.self_attn.o_proj.bias"));
  auto g = build_model(tiny(Family::Gpt2));
  auto pg = g->named_parameters();
  for (const char* n : {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                        "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.ln_2.bias",
                        "transformer.ln_f.weight"})
    EXPECT_TRUE(pg.contains(n)) << n;
  EXPECT_FALSE(pg.contains("lm_head.weight"));  // tied to wte
}

TEST(Llama, LinearSlotsAreSwappableByName) {
  auto m = build_model(tiny());
  auto slots = linear_slots(*m);
  ASSERT_EQ(slots.size(), 2u * 7u + 1u);  // 7 projections per layer + lm_head
  EXPECT_EQ(slots[0].name, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(slots.back().name, "lm_head");
  at::NoGradGuard ng;
  auto x = ids(1, 6, 97, 6);
  auto before = m->forward(x);
  auto old = slots[0].slot->get();
  auto repl = std::make_shared<DenseLinear>(old->in_features, old->out_features, false);
  repl->weight.copy_(old->effective_weight() * 2);
  slots[0].slot->replace(repl);
  EXPECT_EQ(m->named_modules()["model.layers.0.self_attn.q_proj"].get(), repl.get());
  EXPECT_FALSE(at::allclose(m->forward(x), before));
  auto wrong = std::make_shared<DenseLinear>(3, 5, false);
  EXPECT_THROW(slots[0].slot->replace(wrong), qf::Error);
}

TEST(Llama, Bf16ForwardRunsAndIsClose) {
  auto c = tiny();
  auto m = build_model(c);
  c.dtype = DType::BF16;
  auto mb = build_model(c);
  at::NoGradGuard ng;
  auto x = ids(1, 10, 97, 7);
  auto a = m->forward(x), b = mb->forward(x);
  EXPECT_EQ(b.scalar_type(), at::kBFloat16);
  EXPECT_LT((a - b.to(at::kFloat)).abs().max().item<double>(), 0.1 * a.abs().max().item<double>());
}

TEST(Sampling, TopKAndTopPFilters) {
  auto l = at::log(at::tensor({0.5, 0.25, 0.15, 0.1}, at::kFloat));
  auto k2 = filter_logits(l.clone(), 2, 1.0);
  EXPECT_TRUE(std::isinf(k2[2].item<float>()) && std::isinf(k2[3].item<float>()));
  EXPECT_FALSE(std::isinf(k2[1].item<float>()));
  auto p = filter_logits(l.clone(), 0, 0.7);  // 0.5 < 0.7, 0.75 >= 0.7 -> keep two
  EXPECT_FALSE(std::isinf(p[1].item<float>()));
  EXPECT_TRUE(std::isinf(p[2].item<float>()));
  auto p1 = filter_logits(l.clone(), 0, 1e-6);  // the top token always survives
  EXPECT_FALSE(std::isinf(p1[0].item<float>()));
  EXPECT_TRUE(std::isinf(p1[1].item<float>()));
}

// Golden cos/sin from transformers' LlamaRotaryEmbedding (tests/golden/gen_rope.py).
TEST(Rope, MatchesTransformersReference) {
  std::ifstream f(std::string(QFORGE_SOURCE_DIR) + "/tests/golden/rope.json");
  ASSERT_TRUE(f.good()) << "tests/golden/rope.json missing; run tests/golden/gen_rope.py";
  auto j = nlohmann::json::parse(f);
  for (auto& cse : j["cases"]) {
    ModelConfig c;
    c.dim = cse["head_dim"].get<int64_t>();
    c.n_heads = 1;
    c.rope_theta = cse["theta"].get<double>();
    std::string type = cse["type"];
    c.rope_scaling = type == "llama3" ? RopeScaling::Llama3 : type == "linear" ? RopeScaling::Linear : RopeScaling::None;
    if (cse.contains("factor")) c.rope_factor = cse["factor"].get<double>();
    if (cse.contains("low_freq_factor")) c.rope_low_freq_factor = cse["low_freq_factor"].get<double>();
    if (cse.contains("high_freq_factor")) c.rope_high_freq_factor = cse["high_freq_factor"].get<double>();
    if (cse.contains("original_max_position_embeddings"))
      c.rope_original_max_seq_len = cse["original_max_position_embeddings"].get<int64_t>();
    auto inv_ref = at::tensor(cse["inv_freq"].get<std::vector<double>>(), at::kDouble);
    auto inv = rope_inv_freq(c).to(at::kDouble);
    EXPECT_TRUE(at::allclose(inv, inv_ref, 1e-6, 0)) << type << "\n" << inv << inv_ref;
    auto pos = cse["positions"].get<std::vector<int64_t>>();
    auto cos_ref = cse["cos"].get<std::vector<std::vector<double>>>();
    auto sin_ref = cse["sin"].get<std::vector<std::vector<double>>>();
    for (size_t i = 0; i < pos.size(); ++i) {
      auto [cs, sn] = rope_cos_sin(c, pos[i], 1, at::TensorOptions().dtype(at::kFloat));
      auto cr = at::tensor(cos_ref[i], at::kDouble), sr = at::tensor(sin_ref[i], at::kDouble);
      EXPECT_TRUE(at::allclose(cs[0].to(at::kDouble), cr, 0, 2e-4)) << type << " pos " << pos[i];
      EXPECT_TRUE(at::allclose(sn[0].to(at::kDouble), sr, 0, 2e-4)) << type << " pos " << pos[i];
    }
  }
}

}  // namespace
