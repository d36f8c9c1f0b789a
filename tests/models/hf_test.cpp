// Hugging Face checkpoint import (models/hf.*) without Python: a directory written by hand from a
// qforge model loads back to identical logits (single file and sharded), `model.from` resolves the
// architecture from config.json and refuses disagreeing keys; transformers itself is checked in
// tests/interop/test_hf_models.py.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "models/hf.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::models;

namespace {

ModelConfig tiny() { return qf::testing::tiny_llama(96, 64); }

std::vector<std::pair<std::string, at::Tensor>> state(torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value().detach().to(at::kBFloat16));
  return out;
}

void write_config(const std::string& dir, const ModelConfig& c) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}}, {"vocab_size", c.vocab_size},
                      {"hidden_size", c.dim},                  {"intermediate_size", c.ffn_dim},
                      {"num_hidden_layers", c.n_layers},       {"num_attention_heads", c.n_heads},
                      {"num_key_value_heads", c.n_kv_heads},   {"max_position_embeddings", c.max_seq_len},
                      {"rms_norm_eps", c.norm_eps},            {"tie_word_embeddings", false}};
  fs::write_atomic(dir + "/config.json", j.dump());
}

}  // namespace

TEST(HfImport, SingleAndShardedDirectoriesLoadToIdenticalLogits) {
  qf::testing::TmpDir tmp("qf_hf");
  at::manual_seed(1);
  auto m = build_model(tiny());
  m->init_weights(1);
  {
    at::NoGradGuard ng;  // bf16 round trip so the checkpoint (bf16) and reference agree exactly
    for (auto& p : m->parameters()) p.copy_(p.to(at::kBFloat16).to(at::kFloat));
  }
  auto ids = at::arange(20, at::kLong).reshape({2, 10}) % 96;
  at::NoGradGuard ng;
  auto want = m->forward(ids);
  // single file
  fs::ensure_dir(tmp / "one");
  write_config(tmp / "one", tiny());
  st::save(tmp / "one/model.safetensors", state(*m));
  auto a = load_hf_model(tmp / "one", false);
  EXPECT_TRUE(at::equal(a->forward(ids), want));
  // two shards + index
  fs::ensure_dir(tmp / "two");
  write_config(tmp / "two", tiny());
  auto all = state(*m);
  std::vector<std::pair<std::string, at::Tensor>> s1(all.begin(), all.begin() + all.size() / 2),
      s2(all.begin() + all.size() / 2, all.end());
  st::save(tmp / "two/model-00001-of-00002.safetensors", s1);
  st::save(tmp / "two/model-00002-of-00002.safetensors", s2);
  nlohmann::json idx;
  for (auto& [n, t] : s1) idx["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (auto& [n, t] : s2) idx["weight_map"][n] = "model-00002-of-00002.safetensors";
  fs::write_atomic(tmp / "two/model.safetensors.index.json", idx.dump());
  auto b = load_hf_model(tmp / "two", false);
  EXPECT_TRUE(at::equal(b->forward(ids), want));
  // a missing weight: refused before anything is copied, naming it
  st::save(tmp / "two/model-00002-of-00002.safetensors",
           std::vector<std::pair<std::string, at::Tensor>>(s2.begin(), s2.end() - 1));
  nlohmann::json idx2 = idx;
  idx2["weight_map"].erase(s2.back().first);
  fs::write_atomic(tmp / "two/model.safetensors.index.json", idx2.dump());
  try {
    load_hf_model(tmp / "two", false);
    FAIL() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("weight '" + s2.back().first + "' is missing"), std::string::npos) << e.what();
  }
}

TEST(HfImport, ModelFromTakesTheArchitectureAndRefusesDisagreeingKeys) {
  qf::testing::TmpDir tmp("qf_hf");
  write_config(tmp.path, tiny());
  st::save(tmp / "model.safetensors", {});  // the weights are not read while parsing the config
  YAML::Node res;
  auto c = qf::testing::parse_section<ModelConfig>("model: {from: " + tmp.path + "}", "model", &res);
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.kv_heads(), 2);
  EXPECT_EQ(c.vocab_size, 96);
  EXPECT_EQ(res["model"]["dim"].as<int64_t>(), 64);  // the snapshot records the imported shape
  auto err = qf::testing::config_error_of(
      [&] { qf::testing::parse_section<ModelConfig>("model: {from: " + tmp.path + ", dim: 128}", "model"); });
  EXPECT_NE(err.find("model.dim: 128 disagrees with"), std::string::npos) << err;
  fs::write_atomic(tmp / "config.json", R"({"architectures": ["BertModel"]})");
  err = qf::testing::config_error_of(
      [&] { qf::testing::parse_section<ModelConfig>("model: {from: " + tmp.path + "}", "model"); });
  EXPECT_NE(err.find("architecture 'BertModel' is not supported"), std::string::npos) << err;
}

// Issue 16: config.json values that cannot describe a model are errors naming the file and key.
TEST(HfImport, InconsistentOrMistypedConfigIsAnErrorNamingTheKey) {
  qf::testing::TmpDir tmp("qf_hf_bad");
  auto c = tiny();
  fs::ensure_dir(tmp / "m");
  st::save(tmp / "m/model.safetensors", {{"x", at::zeros({1})}});
  const auto expect_error = [&](const nlohmann::json& patch, const std::string& want) {
    write_config(tmp / "m", c);
    auto j = nlohmann::json::parse(fs::read_file(tmp / "m/config.json"));
    j.merge_patch(patch);
    fs::write_atomic(tmp / "m/config.json", j.dump());
    try {
      read_hf_checkpoint(tmp / "m");
      ADD_FAILURE() << "accepted " << patch.dump();
    } catch (const qf::InputError& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find("[json.exception"), std::string::npos) << e.what();
    }
  };
  ASSERT_EQ(c.n_heads % 3, 1);  // 3 KV heads do not divide the tiny model's 4 query heads
  expect_error({{"num_key_value_heads", 3}}, "'num_key_value_heads' is 3, which does not divide num_attention_heads");
  expect_error({{"hidden_act", 3}}, "config.json: 'hidden_act': expected a string, found a number");
  expect_error({{"rope_scaling", {{"rope_type", 7}}}}, "config.json: 'rope_scaling.rope_type': expected a string, found a number");
  // Found by fuzz_hf_config (undefined behaviour before): a float where an integer belongs, a size
  // whose multiples overflow int64, a scaling factor that is not positive.
  expect_error({{"rope_scaling", {{"rope_type", "llama3"}, {"original_max_position_embeddings", 1e300}}}},
               "'original_max_position_embeddings' must be a positive integer");
  expect_error({{"hidden_size", int64_t{1} << 62}}, "'hidden_size' must be a positive integer (at most 2147483647)");
  expect_error({{"rope_scaling", {{"rope_type", "linear"}, {"factor", -2.0}}}}, "'factor' must be a positive number");
  expect_error({{"rope_scaling", "linear"}}, "'rope_scaling' must be an object");
}
