// LoRA invariants: a fresh adapter is the identity; merge == unmerged forward on dense, bf16 and NF4
// bases; only adapter weights train; QAT + LoRA in exact-merge mode gives merged-then-converted
// logits == trained fake-quant logits (and the plain mode does not); every bad input is refused
// before the model changes; adapters round-trip through PEFT's directory format.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "models/transformer.h"
#include "peft/adapter.h"
#include "peft/lora.h"
#include "quant/nf4.h"
#include "quant/qat.h"
#include "tests/peft/peft_test_util.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::peft;

namespace {

models::ModelConfig tiny() { return qf::testing::tiny_llama(); }

std::shared_ptr<models::CausalLM> model(uint64_t seed = 5) {
  at::manual_seed(seed);
  auto m = models::build_model(tiny());
  m->init_weights(seed);
  return m;
}

LoraConfig lora(BaseFormat base = BaseFormat::Fp32, std::vector<std::string> targets = {"all-linear"}) {
  LoraConfig c;
  c.enabled = true;
  c.r = 4;
  c.alpha = 8;
  c.base = base;
  c.target_modules = std::move(targets);
  return c;
}

at::Tensor ids() { return qf::testing::lora_ids(); }
at::Tensor logits(models::CausalLM& m) { return qf::testing::lora_logits(m); }
using qf::testing::randomize_b;

quant::QatConfig qat_q4_0() {
  quant::QatConfig q;
  q.enabled = true;
  quant::QuantRule r;
  r.pattern = "model.layers.*";
  r.weight = quant::QuantSpec::preset_named("q4_0");
  q.rules.push_back(r);
  return q;
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max()).item<double>();
}

}  // namespace

TEST(Lora, FreshAdapterIsIdentityAndMergeEqualsForward) {
  for (auto base : {BaseFormat::Fp32, BaseFormat::Bf16, BaseFormat::Nf4}) {
    auto m = model();
    auto before = logits(*m);
    auto rep = apply_lora(*m, lora(base), "lm_head");
    EXPECT_EQ(rep.wrapped.size(), 14u);  // 7 projections x 2 layers; tied model has no lm_head slot
    auto frozen = logits(*m);            // base re-stored (bf16 / NF4) with a zero adapter
    if (base == BaseFormat::Fp32) {
      EXPECT_TRUE(at::equal(frozen, before));
    }
    if (base == BaseFormat::Nf4) {
      EXPECT_GT((frozen - before).abs().max().item<float>(), 1e-4);
    }
    randomize_b(*m);
    auto adapted = logits(*m);
    EXPECT_GT((adapted - frozen).abs().max().item<float>(), 1e-2);
    EXPECT_EQ(merge_lora(*m), 14);
    EXPECT_TRUE(lora_layers(*m).empty());
    EXPECT_LT(max_rel(logits(*m), adapted), base == BaseFormat::Bf16 ? 1e-2 : 1e-5) << base_format_name(base);
  }
}

TEST(Lora, OnlyAdapterWeightsTrainAndTargetsFollowPeftMatching) {
  auto m = model();
  auto rep = apply_lora(*m, lora(BaseFormat::Nf4, {"q_proj", "mlp.down_proj"}), "lm_head");
  EXPECT_EQ(rep.wrapped.size(), 4u);
  EXPECT_EQ(rep.trainable, 2 * (4 * (64 + 64) + 4 * (128 + 64)));
  for (auto& p : m->named_parameters())
    EXPECT_EQ(p.value().requires_grad(), p.key().find(".lora_") != std::string::npos) << p.key();
  randomize_b(*m);
  auto loss = m->forward(ids()).logsumexp(-1).mean();
  loss.backward();
  for (auto& [n, l] : lora_layers(*m)) {
    EXPECT_TRUE(l->lora_A->weight.grad().defined()) << n;
    EXPECT_GT(l->lora_A->weight.grad().abs().sum().item<float>(), 0) << n;
  }
  EXPECT_TRUE(target_matches("all-linear", "model.layers.0.mlp.up_proj", "lm_head"));
  EXPECT_FALSE(target_matches("all-linear", "lm_head", "lm_head"));
  EXPECT_FALSE(target_matches("proj", "model.layers.0.mlp.up_proj", "lm_head"));  // whole components only
  EXPECT_TRUE(target_matches("model.layers.1.*", "model.layers.1.self_attn.o_proj", "lm_head"));
}

TEST(Lora, BadConfigurationsAreRefusedBeforeAnythingChanges) {
  auto m = model();
  auto before = logits(*m);
  auto c = lora();
  c.r = 65;
  auto err = qf::testing::config_error_of([&] { apply_lora(*m, c, "lm_head"); });
  EXPECT_NE(err.find("peft.r: 65 is larger than layer model.layers.0.self_attn.q_proj's width (in 64, out 64)"),
            std::string::npos) << err;
  err = qf::testing::config_error_of([&] { apply_lora(*m, lora(BaseFormat::Nf4, {"qproj"}), "lm_head"); });
  EXPECT_NE(err.find("'qproj' matches no linear layer"), std::string::npos) << err;
  auto s = lora();
  s.modules_to_save = {"model.final_norm"};  // no such module
  EXPECT_NE(qf::testing::config_error_of([&] { apply_lora(*m, s, "lm_head"); }).find("names no module"), std::string::npos);
  EXPECT_TRUE(lora_layers(*m).empty());
  for (auto& p : m->parameters()) EXPECT_TRUE(p.requires_grad());
  EXPECT_TRUE(at::equal(logits(*m), before));
  // NF4 storage of a fake-quant layer is refused too.
  quant::prepare(*m, qat_q4_0());
  err = qf::testing::config_error_of([&] { apply_lora(*m, lora(BaseFormat::Nf4), "lm_head"); });
  EXPECT_NE(err.find("which fake-quantizes"), std::string::npos) << err;
}

TEST(QatLora, ExactMergeThenConvertReproducesTheTrainedFakeQuantModel) {
  for (bool exact : {true, false}) {
    auto m = model();
    quant::prepare(*m, qat_q4_0());
    auto c = lora();
    c.exact_merge = exact;
    apply_lora(*m, c, "lm_head");
    randomize_b(*m);
    auto trained = logits(*m);  // what training optimised (fake quant on)
    merge_lora(*m);
    EXPECT_EQ(quant::convert(*m), 14);
    const double d = max_rel(logits(*m), trained);
    if (exact) {
      EXPECT_LT(d, 1e-5) << "merged + converted must be the trained model";
    } else {
      EXPECT_GT(d, 1e-3) << "plain QAT + LoRA merges W + s*BA, which the quantizer never saw";
    }
  }
}

TEST(Adapter, SaveLoadRoundTripAndShapeMismatchLeavesTheModelUntouched) {
  qf::testing::TmpDir tmp("qf_lora");
  auto a = model();
  auto c = lora(BaseFormat::Fp32, {"q_proj", "v_proj"});
  apply_lora(*a, c, "lm_head");
  randomize_b(*a);
  save_adapter(*a, c, tmp / "adapter", "test-base", false);
  auto want = logits(*a);

  auto b = model();  // same base weights
  auto info = load_adapter(*b, tmp / "adapter");
  EXPECT_EQ(info.modules.size(), 4u);
  EXPECT_EQ(info.r, 4);
  EXPECT_TRUE(at::allclose(logits(*b), want, 1e-6, 1e-6));

  // Same adapter into a model of another width: refused, naming the tensor, nothing wrapped.
  auto cfg = tiny();
  cfg.dim = 32;
  cfg.ffn_dim = 64;
  auto other = models::build_model(cfg);
  try {
    load_adapter(*other, tmp / "adapter");
    FAIL() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("q_proj.lora_A.weight' has shape [4, 64], expected [4, 32]"),
              std::string::npos) << e.what();
  }
  EXPECT_TRUE(lora_layers(*other).empty());

  // Config-level refusals.
  std::ofstream(tmp / "adapter/adapter_config.json") << R"({"peft_type": "IA3", "r": 4, "lora_alpha": 8})";
  EXPECT_THROW(read_adapter_config(tmp / "adapter"), InputError);
  std::ofstream(tmp / "adapter/adapter_config.json") << "{not json";
  EXPECT_THROW(read_adapter_config(tmp / "adapter"), InputError);
}

// Issue 16: a key of the wrong JSON type in adapter_config.json is an InputError naming the file
// and the key, what was expected and what was found (not nlohmann's "[json.exception...]" text).
TEST(Adapter, MistypedAdapterConfigNamesFileAndKey) {
  qf::testing::TmpDir tmp("qf_adapter_cfg");
  const std::string dir = tmp / "adapter";
  fs::ensure_dir(dir);
  const std::string ok = R"("peft_type": "LORA", "r": 4, "lora_alpha": 8)";
  for (const auto& [cfg, want] : std::vector<std::pair<std::string, std::string>>{
           {R"({"peft_type": 1, "r": 4, "lora_alpha": 8})", "adapter_config.json: 'peft_type': expected a string, found a number"},
           {"{" + ok + R"(, "use_dora": "no"})", "adapter_config.json: 'use_dora': expected a boolean, found a string"},
           {"{" + ok + R"(, "modules_to_save": ["lm_head", 3]})",
            "adapter_config.json: 'modules_to_save[1]': expected a string, found a number"},
           {"{" + ok + R"(, "bias": null})", "adapter_config.json: 'bias': expected a string, found null"},
           {R"({"peft_type": "LORA", "r": "4", "lora_alpha": 8})", "adapter_config.json: 'r' must be a positive integer"},
           {"{" + ok + ",}", "adapter_config.json: not valid JSON (line 1, column "}}) {
    fs::write_atomic(dir + "/adapter_config.json", cfg);
    try {
      read_adapter_config(dir);
      ADD_FAILURE() << "accepted " << cfg;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(dir + "/" + want), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find("[json.exception"), std::string::npos) << e.what();
    }
  }
}
