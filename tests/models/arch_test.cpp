// Architecture specs (models/arch.h) against the models they describe: every parameter a built model
// has is named by its family's spec and every name the spec implies exists; PTQ groups and AWQ
// pairs name real linears, each quantizable linear once; config.json round-trips through the spec.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

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

namespace {

// A config.json of `arch` with the common keys and `extra`.
std::string hf_json(const std::string& arch, const std::string& extra) {
  return R"({"architectures": [")" + arch +
         R"("], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "ffn_dim": 48)" + (extra.empty() ? "" : ", " + extra) + "}";
}

TEST(Arch, UnsupportedFamilyOptionsAreRefusedNamingTheKey) {
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"Gemma3ForCausalLM", R"("use_bidirectional_attention": true)", "use_bidirectional_attention"},
      {"Gemma2ForCausalLM", R"("hidden_activation": "relu")", "hidden_activation"},
      {"Gemma2ForCausalLM", R"("rope_scaling": {"rope_type": "linear", "factor": 2.0})", "rope_scaling"},
      {"Phi3ForCausalLM", R"("rope_scaling": {"type": "yarn", "factor": 2.0})", "rope_scaling"},
      {"Phi3ForCausalLM", R"("rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})",
       "short_factor"},
      {"OPTForCausalLM", R"("enable_bias": false)", "enable_bias"},
      {"OPTForCausalLM", R"("activation_function": "gelu")", "activation_function"},
      {"Qwen3ForCausalLM", R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})", "rope_scaling"},
      {"Qwen2ForCausalLM", R"("use_sliding_window": true, "sliding_window": 8, "layer_types": ["x", "y"])", "layer_types"},
      {"LlamaForCausalLM", R"("mlp_bias": true)", "mlp_bias"},
  };
  for (auto& [arch, extra, key] : cases) {
    try {
      parse_hf_config(hf_json(arch, extra), "m/config.json");
      ADD_FAILURE() << arch << " with " << extra << " was accepted";
    } catch (const qf::InputError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("m/config.json"), std::string::npos) << m;
      EXPECT_NE(m.find(key), std::string::npos) << arch << ": " << m;
    }
  }
}

TEST(Arch, FamilyWindowsAndOptionsReadAsTransformersBuildsThem) {
  auto g2 = parse_hf_config(hf_json("Gemma2ForCausalLM", R"("sliding_window": 16)"), "c.json").config;
  EXPECT_EQ(g2.family, Family::Gemma2);
  EXPECT_EQ(g2.sliding_window, 16);
  EXPECT_EQ(g2.sliding_layers, std::vector<int64_t>{0});  // even layers windowed
  EXPECT_DOUBLE_EQ(g2.attn_softcap, 50.0);                 // Gemma2Config's defaults
  EXPECT_DOUBLE_EQ(g2.final_softcap, 30.0);
  EXPECT_EQ(g2.hdim(), 256);
  auto g3 = parse_hf_config(hf_json("Gemma3ForCausalLM", R"("num_hidden_layers": 7, "head_dim": 8)"), "c.json").config;
  EXPECT_EQ(g3.sliding_layers, (std::vector<int64_t>{0, 1, 2, 3, 4, 6}));  // every 6th layer is global
  EXPECT_DOUBLE_EQ(g3.attn_softcap, 0.0);
  EXPECT_DOUBLE_EQ(g3.rope_local_theta, 10000.0);
  EXPECT_TRUE(g3.qk_norm);
  auto q2 = parse_hf_config(hf_json("Qwen2ForCausalLM", R"("use_sliding_window": false, "sliding_window": 8)"), "c.json").config;
  EXPECT_EQ(q2.sliding_window, 0);  // use_sliding_window false: full attention
  auto m = parse_hf_config(hf_json("MistralForCausalLM", R"("sliding_window": null)"), "c.json").config;
  EXPECT_EQ(m.sliding_window, 0);
  auto opt = parse_hf_config(hf_json("OPTForCausalLM", R"("word_embed_proj_dim": 16, "do_layer_norm_before": false)"), "c.json").config;
  EXPECT_EQ(opt.family, Family::Opt);
  EXPECT_EQ(opt.embed_width(), 16);
  EXPECT_TRUE(opt.post_norm);
  EXPECT_EQ(opt.ffn(), 48);
}

}  // namespace
