// Exports of LoRA on the served base (peft.base <llama.cpp type>):
//  - `--format gguf` writes every decoder linear in the base's type: exact merge -> quantize(W + s·BA),
//    whose blocks dequantize to the weight the exact-merge forward used; an unwrapped block base -> its
//    own blocks; the model is left as it was;
//  - `--format gguf-lora` writes base.gguf with the bases' own blocks (no merge) and adapter.gguf with
//    llama.cpp's adapter keys, A as is, B with the Q/K rows permuted as the base's, alpha = s·r; the
//    model's slots hold the LoRA layers again afterwards; no adapters / exact-merge adapters are refused.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "core/gguf_file.h"
#include "data/tokenizer.h"
#include "export/gguf_export.h"
#include "models/transformer.h"
#include "peft/lora.h"
#include "quant/block_linear.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_more.h"
#include "quant/ggml_types.h"
#include "tests/export/fake_tokenizer.h"
#include "tests/export/gguf_test_file.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;

namespace {

// tiny_llama with LoRA r4 on q_proj/k_proj/down_proj over a q4_0 base on every decoder linear, B non-zero.
std::shared_ptr<models::CausalLM> model(bool exact) {
  at::manual_seed(4);
  auto m = models::build_model(qf::testing::tiny_llama());
  m->init_weights(4);
  peft::LoraConfig c;
  c.enabled = true;
  c.r = 4;
  c.alpha = 8;
  c.base = peft::BaseFormat::Blocks;
  c.block_rule = quant::Rule::GgmlQ4_0;
  c.exact_merge = exact;
  c.target_modules = {"q_proj", "k_proj", "down_proj"};
  peft::apply_lora(*m, c, "lm_head");
  at::NoGradGuard ng;
  auto g = at::detail::createCPUGenerator(9);
  for (auto& [n, l] : peft::lora_layers(*m)) l->lora_B->weight.copy_(at::randn(l->lora_B->weight.sizes(), g) * 0.1);
  m->eval();
  return m;
}

std::shared_ptr<gguf_in::File> open(const std::string& path) { return qf::testing::open_gguf(path); }

at::Tensor bytes_of(const gguf_in::File& f, const std::string& name) { return qf::testing::gguf_tensor_bytes(f, name); }

// convert_hf_to_gguf.py's Q/K row permutation (rotate-half -> interleaved), as the exporter applies it.
at::Tensor permute(const at::Tensor& rows, int64_t heads) {
  const int64_t n = rows.size(0);
  return rows.reshape({heads, 2, n / heads / 2, -1}).transpose(1, 2).reshape({n, -1}).contiguous();
}

}  // namespace

TEST(ServedBaseExport, GgufHoldsTheRequantizedMergeAndTheOwnBlocks) {
  qf::testing::TmpDir dir("qf_served_export");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = model(/*exact=*/true);
  auto r = exporter::export_gguf(*m, tok, dir / "m.gguf", "f32", "tiny", false);
  EXPECT_TRUE(r.exact);
  auto f = open(dir / "m.gguf");
  const auto slots = models::linear_slots(*m);
  auto find = [&](const std::string& n) {
    for (auto& s : slots)
      if (s.name == n) return s.slot->get();
    return std::shared_ptr<models::LinearBase>();
  };
  // down_proj (adapted, exact merge): quantize(W + s·BA), decoding to the trained weight
  auto l = std::dynamic_pointer_cast<peft::LoraLinear>(find("model.layers.1.mlp.down_proj"));
  ASSERT_TRUE(l);
  at::NoGradGuard ng;
  const auto want = quant::ggml::quantize(l->merged_weight(), quant::Rule::GgmlQ4_0);
  EXPECT_TRUE(at::equal(bytes_of(*f, "blk.1.ffn_down.weight"), want.reshape({-1})));
  EXPECT_TRUE(at::equal(quant::ggml::dequantize(want, quant::Rule::GgmlQ4_0, l->in_features), l->effective_weight()));
  // up_proj (no adapter): its own blocks
  auto b = std::dynamic_pointer_cast<quant::BlockLinear>(find("model.layers.0.mlp.up_proj"));
  ASSERT_TRUE(b);
  EXPECT_TRUE(at::equal(bytes_of(*f, "blk.0.ffn_up.weight"), b->weight.reshape({-1})));
  EXPECT_EQ(f->tensor("blk.0.ffn_up.weight")->type, quant::ggml::traits(quant::Rule::GgmlQ4_0).gguf_id);
}

TEST(ServedBaseExport, GgufLoraWritesTheUnmergedBaseAndLlamaCppsAdapter) {
  qf::testing::TmpDir dir("qf_served_export");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = model(/*exact=*/false);
  const auto before = models::linear_slots(*m);
  std::vector<std::shared_ptr<models::LinearBase>> modules;
  for (auto& s : before) modules.push_back(s.slot->get());
  auto r = exporter::export_gguf_lora(*m, tok, dir / "out", "f32", "tiny", false);
  EXPECT_EQ(r.n_adapters, 6);
  EXPECT_DOUBLE_EQ(r.alpha, 8.0);  // s * r = 2 * 4
  const auto after = models::linear_slots(*m);
  for (size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i].slot->get(), modules[i]) << after[i].name;
  auto base = open(dir / "out/base.gguf");
  auto ad = open(dir / "out/adapter.gguf");
  EXPECT_EQ(ad->get_string("general.type"), "adapter");
  EXPECT_EQ(ad->get_string("adapter.type"), "lora");
  EXPECT_EQ(ad->get_string("general.architecture"), "llama");
  EXPECT_DOUBLE_EQ(ad->get_float("adapter.lora.alpha"), 8.0);
  EXPECT_EQ(ad->tensors().size(), 12u);
  const auto& c = m->cfg;
  for (auto& [name, l] : peft::lora_layers(*m)) {
    const std::string layer = name.substr(13, 1);  // "model.layers.N..."
    const std::string g = "blk." + layer + "." +
                          (name.find("q_proj") != std::string::npos   ? "attn_q"
                           : name.find("k_proj") != std::string::npos ? "attn_k"
                                                                      : "ffn_down") + ".weight";
    // the base: the layer's own blocks, Q/K rows permuted like any llama GGUF
    auto* blk = dynamic_cast<quant::BlockLinear*>(l->base.get());
    ASSERT_TRUE(blk) << name;
    const int64_t heads = g.find("attn_q") != std::string::npos ? c.n_heads : g.find("attn_k") != std::string::npos ? c.kv_heads() : 0;
    EXPECT_TRUE(at::equal(bytes_of(*base, g), (heads ? permute(blk->weight, heads) : blk->weight).reshape({-1}))) << g;
    // the adapter: A as is, B permuted with the base's rows
    const auto a = ad->f32_values(g + ".lora_a"), bv = ad->f32_values(g + ".lora_b");
    EXPECT_EQ(ad->tensor(g + ".lora_a")->shape(), (std::vector<int64_t>{4, l->in_features})) << g;
    EXPECT_EQ(ad->tensor(g + ".lora_b")->shape(), (std::vector<int64_t>{l->out_features, 4})) << g;
    auto want_b = heads ? permute(l->lora_B->weight.detach(), heads) : l->lora_B->weight.detach();
    EXPECT_TRUE(at::equal(at::tensor(a).to(at::kFloat).reshape({4, -1}), l->lora_A->weight.detach())) << g;
    EXPECT_TRUE(at::equal(at::tensor(bv).to(at::kFloat).reshape({l->out_features, 4}), want_b)) << g;
  }
}

TEST(ServedBaseExport, GgufLoraRefusesExactMergeAndModelsWithoutAdapters) {
  qf::testing::TmpDir dir("qf_served_export");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto exact = model(/*exact=*/true);
  try {
    exporter::export_gguf_lora(*exact, tok, dir / "x", "f32", "tiny", false);
    FAIL() << "an exact-merge adapter was exported unmerged";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("exact-merge"), std::string::npos) << e.what();
  }
  at::manual_seed(1);
  auto plain = models::build_model(qf::testing::tiny_llama());
  EXPECT_THROW(exporter::export_gguf_lora(*plain, tok, dir / "y", "f32", "tiny", false), InputError);
}
