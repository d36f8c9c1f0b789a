// LoRA on an LLM.int8 frozen base (peft.base int8): parsed from YAML with its threshold, every
// non-output linear becomes a quant::Int8LtLinear, a fresh adapter computes exactly the int8 base
// model, gradients reach only the adapters, and the stored weight bytes shrink.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/config.h"
#include "models/transformer.h"
#include "peft/lora.h"
#include "quant/int8_lt.h"
#include "quant/qat.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::quant;

namespace {
std::shared_ptr<models::CausalLM> tiny_model() {
  at::manual_seed(5);
  auto m = models::build_model(qf::testing::tiny_llama());
  m->init_weights(5);
  return m;
}
}  // namespace

TEST(Int8Base, LoraOnAnInt8BaseStartsAtTheBaseAndTrainsOnlyTheAdapter) {
  cfg::Problems problems;
  cfg::Reader rd(YAML::Load("{r: 4, alpha: 8, base: int8, int8_threshold: 3.5}"), "peft", &problems,
                 YAML::Node(YAML::NodeType::Map));
  const auto pc = peft::LoraConfig::from_config(rd);
  ASSERT_TRUE(problems.empty()) << problems.items[0];
  ASSERT_EQ(pc.base, peft::BaseFormat::Int8);
  EXPECT_EQ(pc.int8_threshold, 3.5);
  auto ref = tiny_model();
  auto m = tiny_model();
  auto rep = peft::apply_lora(*m, pc, "lm_head");
  int64_t n = 0;
  for (auto& [name, l] : peft::lora_layers(*m)) {
    auto* q = dynamic_cast<Int8LtLinear*>(l->base.get());
    ASSERT_NE(q, nullptr) << name;
    EXPECT_EQ(q->threshold, 3.5);
    ++n;
  }
  EXPECT_EQ(rep.n_frozen_converted, n);
  // int8 weights (1 byte) + SCB (4 bytes per row) are what the report counts for the bases.
  EXPECT_LT(rep.weight_bytes, quant::model_bytes(*ref));
  // A fresh adapter (B = 0) computes exactly the int8 base model.
  auto ids = at::randint(64, {2, 10}, at::kLong);
  at::Tensor base_logits;
  {
    auto b = tiny_model();
    auto pb = pc;
    pb.target_modules = {"all-linear"};
    for (auto& ns : models::linear_slots(*b))
      if (ns.name != "lm_head")
        ns.slot->replace(peft::frozen_base(pb, ns.slot->get()->effective_weight(), ns.slot->get()->bias_or_undefined()));
    at::NoGradGuard ng;
    base_logits = b->forward(ids);
  }
  {
    at::NoGradGuard ng;
    EXPECT_TRUE(at::equal(m->forward(ids), base_logits));
  }
  // One backward: gradients reach the adapters only.
  auto loss = m->forward(ids).logsumexp(-1).mean();
  loss.backward();
  for (auto& p : m->named_parameters()) {
    const bool lora = p.key().find("lora_") != std::string::npos;
    EXPECT_EQ(p.value().requires_grad(), lora) << p.key();
    if (lora && p.key().find("lora_A") != std::string::npos) EXPECT_TRUE(p.value().grad().defined()) << p.key();
  }
}
