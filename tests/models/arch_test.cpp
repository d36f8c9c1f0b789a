// Architecture specs (models/arch.h) against the models they describe: every parameter a built model
// has is named by its family's spec and every name the spec implies exists; PTQ groups and AWQ
// pairs name real linears, each quantizable linear once; config.json round-trips through the spec.
#include <gtest/gtest.h>

#include <set>

#include "models/arch.h"
#include "models/hf.h"
#include "models/hf_config.h"
#include "models/transformer.h"

using namespace qf::models;

namespace {

ModelConfig tiny(Family f, bool tied, bool bias) {
  ModelConfig c;
  c.family = f;
  c.vocab_size = 50;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.max_seq_len = 32;
  c.tie_embeddings = tied;
  c.qkv_bias = bias;
  c.qk_norm = f == Family::Qwen3 || f == Family::Gemma3;
  return c;
}

// Every parameter name the spec implies for `c`.
std::set<std::string> expected_names(const ArchSpec& a, const ModelConfig& c) {
  std::set<std::string> n{a.embed + ".weight", a.final_norm + ".weight"};
  if (!a.positions.empty()) n.insert(a.positions + ".weight");
  if (!c.tie_embeddings) n.insert(a.lm_head + ".weight");
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = a.layer_prefix(i) + ".";
    for (auto& t : a.layer_tensors) n.insert(p + t.name);
    for (auto& l : a.linears) n.insert(p + l.name + ".weight");
  }
  return n;
}

class EachFamily : public ::testing::TestWithParam<const ArchSpec*> {};

TEST_P(EachFamily, ModelParameterNamesAreTheSpecs) {
  const ArchSpec& a = *GetParam();
  for (bool tied : {true, false}) {
    if (a.tied_always && !tied) continue;
    auto c = tiny(a.family, tied, false);
    auto m = build_model(c);
    std::set<std::string> got;
    for (auto& p : m->named_parameters()) got.insert(p.key());
    auto want = expected_names(a, c);
    for (auto& w : want) EXPECT_TRUE(got.count(w)) << a.name << ": the spec names " << w << ", the model has no such parameter";
    for (auto& g : got) {
      if (want.count(g)) continue;
      // Biases of linears and norms the spec lists by weight.
      const bool bias_of_spec = g.size() > 5 && g.compare(g.size() - 5, 5, ".bias") == 0 &&
                                (want.count(g.substr(0, g.size() - 5) + ".weight") > 0);
      EXPECT_TRUE(bias_of_spec) << a.name << ": parameter " << g << " is not named by the spec";
    }
    EXPECT_EQ(m->token_embedding_name(), a.embed);
    EXPECT_EQ(m->layer_prefix(1), a.layers + ".1");
    // The linear slots of a layer are exactly the spec's linears.
    std::set<std::string> slots, spec_linears;
    for (auto& ns : linear_slots(m->layer(0))) slots.insert(ns.name);
    for (auto& l : a.linears) spec_linears.insert(l.name);
    EXPECT_EQ(slots, spec_linears) << a.name;
  }
}

TEST_P(EachFamily, PtqGroupsAndAwqPairsNameRealLinears) {
  const ArchSpec& a = *GetParam();
  std::multiset<std::string> grouped;
  for (auto& g : a.ptq_groups)
    for (auto& n : g) {
      EXPECT_NE(a.linear(n), nullptr) << a.name << ": PTQ group names unknown linear " << n;
      grouped.insert(n);
    }
  for (auto& l : a.linears) EXPECT_EQ(grouped.count(l.name), 1u) << a.name << ": " << l.name << " must be in one PTQ group";
  auto m = build_model(tiny(a.family, true, false));
  auto params = m->layer(0).named_parameters();
  for (auto& p : a.awq_pairs) {
    if (p.prev_is_norm)
      EXPECT_TRUE(params.contains(p.prev + ".weight")) << a.name << ": AWQ pair's norm " << p.prev << " is not in a layer";
    else
      EXPECT_NE(a.linear(p.prev), nullptr) << a.name << ": AWQ pair's prev " << p.prev;
    for (auto& n : p.linears) EXPECT_NE(a.linear(n), nullptr) << a.name << ": AWQ pair names unknown linear " << n;
  }
  // Each per-layer tensor has a GGUF name when the family has a llama.cpp architecture.
  if (!a.gguf_arch.empty()) {
    for (auto& t : a.layer_tensors) EXPECT_FALSE(t.gguf.empty()) << t.name;
    for (auto& l : a.linears) EXPECT_FALSE(l.gguf.empty()) << l.name;
  }
}

TEST_P(EachFamily, ConfigJsonRoundTripsThroughTheSpec) {
  const ArchSpec& a = *GetParam();
  auto c = tiny(a.family, true, false);
  c.ffn_dim = 40;
  c.norm_eps = 1e-5;
  auto j = hf_config_json(c, "float32");
  auto back = parse_hf_config(j.dump(), "config.json").config;
  EXPECT_EQ(back.family, c.family);
  EXPECT_EQ(back.dim, c.dim);
  EXPECT_EQ(back.n_layers, c.n_layers);
  EXPECT_EQ(back.n_heads, c.n_heads);
  EXPECT_EQ(back.ffn(), c.ffn());
  EXPECT_EQ(back.max_seq_len, c.max_seq_len);
  EXPECT_DOUBLE_EQ(back.norm_eps, c.norm_eps);
  EXPECT_EQ(back.tie_embeddings, c.tie_embeddings);
  EXPECT_EQ(arch_for_hf(j["architectures"][0].get<std::string>()), &a);
}

INSTANTIATE_TEST_SUITE_P(Specs, EachFamily, ::testing::ValuesIn(arch_specs()),
                         [](const auto& info) { return info.param->name; });

TEST(Arch, ConvOneDWeightsAreThoseOfTheSpec) {
  const ArchSpec& g = arch_spec(Family::Gpt2);
  EXPECT_TRUE(g.is_conv1d_weight(g.layer_prefix(3) + "." + g.linears[0].name + ".weight"));
  EXPECT_FALSE(g.is_conv1d_weight(g.layer_prefix(3) + "." + g.linears[0].name + ".bias"));
  EXPECT_FALSE(g.is_conv1d_weight(g.embed + ".weight"));
  const ArchSpec& l = arch_spec(Family::Llama);
  EXPECT_FALSE(l.has_conv1d());
  EXPECT_FALSE(l.is_conv1d_weight(l.layer_prefix(0) + "." + l.linears[0].name + ".weight"));
}

TEST(Arch, UnknownArchitectureIsRefusedNamingTheSupportedOnes) {
  try {
    parse_hf_config(R"({"architectures": ["FooForCausalLM"], "vocab_size": 8})", "x/config.json");
    FAIL() << "expected an InputError";
  } catch (const qf::InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("FooForCausalLM"), std::string::npos) << m;
    EXPECT_NE(m.find(hf_architectures_list()), std::string::npos) << m;
  }
}

}  // namespace
