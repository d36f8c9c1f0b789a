// LoRA on the served base: llama.cpp blocks (quant::BlockLinear, `peft.base: <type>`) and a quantized
// checkpoint's packed ints (models::PackedIntLinear, `peft.base: packed`).
//  - every block type of the table: the blocks are ggml::quantize's bytes, the forward is
//    x · dequantize(blocks)^T + b, the base gets no gradient;
//  - apply_lora on a block base: a fresh adapter changes nothing; only A, B train; exact merge
//    trains against fq(W + s·BA) and merge + re-quantize reproduces the trained layer bit for bit;
//  - a rebuilt checkpoint (install_saved_bases + state load) is the trained model;
//  - per-linear types: peft.base mix (peft.mixture) gives each linear llama-quantize's type (role, layer,
//    GQA rules, width fallbacks; impossible widths refused naming the layer), exact merge re-quantizes
//    each into its own type, checkpoints rebuild each type; peft.base gguf keeps whatever a GGUF tensor
//    is stored as (F16 as F16) and refuses float sources and types qforge cannot quantize (IQ2_XXS);
//  - the packed int layout decodes exactly as dequantize_linear of GPTQ (v1/v2, g_idx, 8-bit), AWQ
//    and compressed-tensors (pack-quantized with/without zero points, int8) parts.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "core/error.h"
#include "models/hf_quantized.h"
#include "models/packed_linear.h"
#include "models/state.h"
#include "models/transformer.h"
#include "peft/lora.h"
#include "quant/block_linear.h"
#include "quant/fake_quant.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_types.h"
#include "tests/peft/peft_test_util.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::peft;

namespace {

// Widths 256 / 512 so that the 256-value K-quant blocks tile every linear.
models::ModelConfig wide() {
  auto c = qf::testing::tiny_llama();
  c.dim = 256;
  c.ffn_dim = 512;
  return c;
}

std::shared_ptr<models::CausalLM> model(uint64_t seed = 5) {
  at::manual_seed(seed);
  auto m = models::build_model(wide());
  m->init_weights(seed);
  return m;
}

LoraConfig lora(const std::string& type, bool exact = false) {
  LoraConfig c;
  c.enabled = true;
  c.r = 4;
  c.alpha = 8;
  c.base = BaseFormat::Blocks;
  c.block_rule = quant::ggml::traits_by_name(type)->rule;
  c.exact_merge = exact;
  return c;
}

using qf::testing::lora_logits;
using qf::testing::randomize_b;
at::Tensor logits(models::CausalLM& m) { return lora_logits(m); }

std::vector<std::string> block_types() {
  std::vector<std::string> v;
  for (const auto& t : quant::ggml::type_table())
    if (t.block > 1) v.push_back(t.name);
  return v;
}

}  // namespace

TEST(BlockBase, EveryTypeHoldsQuantizeBytesAndForwardsDequantized) {
  auto g = at::detail::createCPUGenerator(1);
  const auto w = at::randn({8, 512}, g) * 0.05, b = at::randn({8}, g), x = at::randn({3, 512}, g);
  for (const auto& name : block_types()) {
    const auto rule = quant::ggml::traits_by_name(name)->rule;
    quant::BlockLinear l(w, b, rule);
    EXPECT_TRUE(at::equal(l.weight, quant::ggml::quantize(w, rule))) << name;
    const auto deq = quant::ggml::dequantize(l.weight, rule, 512);
    EXPECT_TRUE(at::equal(l.effective_weight(), deq)) << name;
    EXPECT_TRUE(l.parameters().empty()) << name;
    auto xi = x.clone().requires_grad_(true);
    auto y = l.forward(xi);
    EXPECT_TRUE(at::allclose(y, at::linear(x, deq, b), 1e-5, 1e-5)) << name;
    y.sum().backward();
    EXPECT_TRUE(at::allclose(xi.grad(), at::ones({3, 8}).matmul(deq), 1e-5, 1e-5)) << name;
    // adopted blocks: the same module from the bytes
    quant::BlockLinear again(rule, l.weight, 512, b);
    EXPECT_TRUE(at::equal(again.effective_weight(), deq)) << name;
    EXPECT_TRUE(at::equal(l.packed()->qweight, l.weight)) << name;
    EXPECT_EQ(l.stored_bytes(), l.weight.numel() + 8 * 4) << name;
  }
}

TEST(BlockBase, BadBlocksAreRefused) {
  const auto r = quant::ggml::traits_by_name("q4_k")->rule;
  EXPECT_THROW(quant::BlockLinear(r, at::zeros({4, 144}, at::kByte), 100, {}), Error);  // 100 is not whole blocks
  EXPECT_THROW(quant::BlockLinear(r, at::zeros({4, 140}, at::kByte), 256, {}), Error);  // bytes of one row
  EXPECT_THROW(quant::BlockLinear(r, at::zeros({4, 144}, at::kInt), 256, {}), Error);
  EXPECT_THROW(quant::BlockLinear(at::zeros({4, 96}), {}, r), Error);
}

TEST(BlockBase, ConfigSpellsEveryTypeAndChecksWidths) {
  for (const auto& name : block_types()) {
    auto c = qf::testing::parse_section<LoraConfig>("peft: {r: 4, base: " + name + "}", "peft");
    EXPECT_EQ(c.base, BaseFormat::Blocks);
    EXPECT_EQ(base_name(c), name);
  }
  auto p = qf::testing::parse_section<LoraConfig>("peft: {r: 4, base: packed}", "peft");
  EXPECT_EQ(p.base, BaseFormat::Packed);
  const auto err = qf::testing::config_error_of([] { qf::testing::parse_section<LoraConfig>("peft: {base: q9_9}", "peft"); });
  EXPECT_NE(err.find("q4_k"), std::string::npos) << err;
  // q4_k's 256-value blocks do not tile tiny_llama's 64-wide layers: one ConfigError naming them
  at::manual_seed(1);
  auto narrow = models::build_model(qf::testing::tiny_llama());
  const auto e = qf::testing::config_error_of([&] { apply_lora(*narrow, lora("q4_k"), "lm_head"); });
  EXPECT_NE(e.find("256-value blocks"), std::string::npos) << e;
  EXPECT_NE(e.find("model.layers.0.self_attn.q_proj"), std::string::npos) << e;
  EXPECT_TRUE(std::dynamic_pointer_cast<models::DenseLinear>(models::linear_slots(*narrow)[0].slot->get()));
}

TEST(BlockBase, FreshAdapterIsTheDequantizedModelAndOnlyAdaptersTrain) {
  for (const std::string type : {"q4_0", "q4_k", "q6_k"}) {
    auto m = model(), ref = model();
    auto rep = apply_lora(*m, lora(type), "lm_head");
    EXPECT_EQ(rep.n_frozen_converted, 14);
    EXPECT_EQ(rep.base_weights, 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256));  // q, o; k, v; mlp
    // the reference: every frozen linear replaced by its dequantized blocks
    {
      at::NoGradGuard ng;
      for (auto& ns : models::linear_slots(*ref)) {
        if (ns.name == "lm_head") continue;
        auto* d = static_cast<models::DenseLinear*>(ns.slot->get().get());
        d->weight.copy_(quant::ggml::fake_quant(d->weight, quant::ggml::traits_by_name(type)->rule));
      }
    }
    EXPECT_TRUE(at::allclose(logits(*m), logits(*ref), 1e-4, 1e-4)) << type;
    int64_t trainable = 0;
    for (auto& p : m->named_parameters())
      if (p.value().requires_grad()) {
        EXPECT_NE(p.key().find("lora_"), std::string::npos) << p.key();
        ++trainable;
      }
    EXPECT_EQ(trainable, 28);
    EXPECT_NE(rep.summary().find("frozen base:"), std::string::npos);
  }
}

TEST(BlockBase, ExactMergeTrainsAgainstTheRequantizedMerge) {
  for (const std::string type : {"q4_0", "q4_k", "q8_0"}) {
    auto m = model();
    apply_lora(*m, lora(type, /*exact=*/true), "lm_head");
    randomize_b(*m, 0.05);
    auto [name, l] = lora_layers(*m)[0];
    auto* blk = dynamic_cast<quant::BlockLinear*>(l->base.get());
    ASSERT_TRUE(blk && l->exact) << type;
    // forward == x · fq(deq + s·BA)^T, and the gradient reaches A and B through the STE
    auto g = at::detail::createCPUGenerator(2);
    auto x = at::randn({2, 5, 256}, g);
    auto y = l->forward(x);
    const auto want_w = quant::fake_quant_values(blk->effective_weight() + l->delta().detach(), blk->spec());
    EXPECT_TRUE(at::allclose(y, at::linear(x, want_w), 1e-5, 1e-5)) << type;
    y.pow(2).sum().backward();
    EXPECT_TRUE(l->lora_B->weight.grad().defined() && l->lora_B->weight.grad().abs().sum().item<double>() > 0) << type;
    // merge: the blocks of W + s·BA dequantize to exactly the weight the forward used
    at::NoGradGuard ng;
    EXPECT_TRUE(at::equal(l->effective_weight(), want_w)) << type;
    auto packed = blk->packed(l->merged_weight());
    EXPECT_TRUE(at::equal(packed->effective_weight(), want_w)) << type;
    const auto before = logits(*m);
    EXPECT_EQ(merge_lora(*m), 14);
    auto merged_layer = std::dynamic_pointer_cast<models::DenseLinear>(models::linear_slots(*m)[0].slot->get());
    ASSERT_TRUE(merged_layer) << type;
    EXPECT_TRUE(at::equal(merged_layer->weight, want_w)) << type;
    EXPECT_TRUE(at::allclose(logits(*m), before, 1e-5, 1e-5)) << type;
  }
}

TEST(BlockBase, PlainMergeMovesTheModelWhenRequantized) {
  auto m = model();
  apply_lora(*m, lora("q4_0"), "lm_head");
  randomize_b(*m, 0.05);
  auto [name, l] = lora_layers(*m)[0];
  auto* blk = static_cast<quant::BlockLinear*>(l->base.get());
  at::NoGradGuard ng;
  const auto merged = l->merged_weight();  // deq + s·BA, float
  const auto requant = blk->packed(merged)->effective_weight();
  EXPECT_FALSE(at::equal(requant, merged));  // what exact_merge exists for
  EXPECT_TRUE(std::dynamic_pointer_cast<models::DenseLinear>(l->merged()));
}

TEST(BlockBase, SavedRunRebuildsBitForBit) {
  for (const bool exact : {false, true}) {
    auto m = model();
    auto cfg = lora("q4_k", exact);
    apply_lora(*m, cfg, "lm_head");
    randomize_b(*m, 0.05);
    const auto state = models::model_state(*m);
    auto m2 = model(77);  // other weights: everything must come from the state
    EXPECT_EQ(install_saved_bases(*m2, cfg, state), 14);
    apply_lora(*m2, cfg, "lm_head");
    models::load_model_state(*m2, state, "saved");
    EXPECT_TRUE(at::equal(logits(*m2), logits(*m))) << exact;
  }
}

namespace {

// A [out, in] layer's codes, zero points and scales for group size 32, packed as `method` stores them.
struct IntParts {
  models::HfQuant q;
  std::map<std::string, at::Tensor> t;
};

IntParts gptq_parts(int bits, bool v2, bool g_idx, int64_t out, int64_t in) {
  auto g = at::detail::createCPUGenerator(4);
  const int64_t groups = in / 32, top = (int64_t{1} << bits) - 1;
  auto u = at::randint(0, top + 1, {out, in}, g, at::kLong);
  auto z = at::randint(0, top + 1, {groups, out}, g, at::kLong);
  IntParts p;
  p.q.method = models::HfQuantMethod::Gptq;
  p.q.bits = bits;
  p.q.group_size = 32;
  p.q.zeros_v2 = v2;
  p.t["qweight"] = models::packed::pack_cols(u, bits).t().contiguous();
  // v1 stores z - 1 per code (z = 0 wraps to all ones: the carry case gptqmodel's word add reproduces)
  p.t["qzeros"] = models::packed::pack_cols(v2 ? z : (z - 1).bitwise_and(top), bits);
  p.t["scales"] = (at::rand({groups, out}, g) * 0.01 + 1e-3).to(at::kHalf);
  if (g_idx) p.t["g_idx"] = at::randperm(in, g, at::kLong).div(32, "floor").to(at::kInt);
  return p;
}

void expect_same_decoding(const IntParts& p, int64_t out, int64_t in, const std::string& what) {
  const models::QuantizedParts none;
  std::map<std::string, at::Tensor> t = p.t;
  const auto want = models::dequantize_linear(p.q, "l", out, in, none, t);
  auto lin = models::PackedIntLinear::from_checkpoint(p.q, "l", out, in, p.t, {});
  EXPECT_TRUE(at::equal(lin->effective_weight(), want)) << what;
  EXPECT_TRUE(at::equal(models::dequantize_packed_int_aten(lin->state(), out, in), want)) << what;  // the GPU path
  auto gathered = lin->state();
  gathered.group_size = 0;  // the per-column gather, as for an act-order g_idx
  EXPECT_TRUE(at::equal(models::dequantize_packed_int_aten(gathered, out, in), want)) << what;
  EXPECT_TRUE(lin->parameters().empty()) << what;
  // its saved state rebuilds the same layer
  auto again = models::PackedIntLinear::zeros(lin->bits, lin->scales.size(0), lin->scales.scalar_type(), out, in, false);
  models::load_model_state(*again, models::model_state(*lin), what);
  EXPECT_TRUE(at::equal(again->effective_weight(), want)) << what;
}

}  // namespace

TEST(PackedBase, GptqLayoutsDecodeAsDequantizeLinear) {
  for (int bits : {4, 8})
    for (bool v2 : {false, true}) {
      auto p = gptq_parts(bits, v2, false, 64, 128);
      p.t.erase("g_idx");
      expect_same_decoding(p, 64, 128, "gptq int" + std::to_string(bits) + (v2 ? " v2" : " v1"));
    }
  // act-order: a permuted g_idx (checked against the groups by dequantize_linear's data rule)
  auto p = gptq_parts(4, false, true, 64, 128);
  models::QuantizedParts parts{{"g_idx", {"f", {}}}};
  const auto want = models::dequantize_linear(p.q, "l", 64, 128, parts, p.t);
  auto lin = models::PackedIntLinear::from_checkpoint(p.q, "l", 64, 128, p.t, {});
  EXPECT_EQ(lin->state().group_size, 0);
  EXPECT_TRUE(at::equal(lin->effective_weight(), want));
  EXPECT_TRUE(at::equal(models::dequantize_packed_int_aten(lin->state(), 64, 128), want));
  // a saved state whose g_idx points past the groups is refused, not read out of bounds
  auto bad = models::PackedIntLinear::zeros(4, 4, at::kHalf, 64, 128, false);
  auto st = models::model_state(*lin);
  for (auto& [n, t] : st)
    if (n == "g_idx") t = t.clone().fill_(7);
  models::load_model_state(*bad, st, "saved");
  EXPECT_THROW(bad->effective_weight(), InputError);
}

TEST(PackedBase, AwqAndCompressedTensorsDecodeAsDequantizeLinear) {
  auto g = at::detail::createCPUGenerator(6);
  const int64_t out = 64, in = 128, groups = 4;
  {
    IntParts p;
    p.q.method = models::HfQuantMethod::Awq;
    p.q.bits = 4;
    p.q.group_size = 32;
    p.t["qweight"] = models::packed::pack_awq(at::randint(0, 16, {in, out}, g, at::kLong));
    p.t["qzeros"] = models::packed::pack_awq(at::randint(0, 16, {groups, out}, g, at::kLong));
    p.t["scales"] = (at::rand({groups, out}, g) * 0.01).to(at::kHalf);
    expect_same_decoding(p, out, in, "awq");
  }
  for (const bool zp : {false, true}) {
    IntParts p;
    p.q.method = models::HfQuantMethod::CompressedTensors;
    models::HfQuantScheme s;
    s.bits = 4;
    s.group_size = 32;
    s.symmetric = !zp;
    s.targets = {"Linear"};
    s.format = "pack-quantized";
    p.q.groups = {s};
    p.t["weight_packed"] = models::packed::pack_cols(at::randint(0, 16, {out, in}, g, at::kLong), 4);
    p.t["weight_scale"] = at::rand({out, groups}, g).to(at::kBFloat16);
    if (zp) p.t["weight_zero_point"] = at::randint(-8, 8, {out, groups}, g, at::kChar);
    expect_same_decoding(p, out, in, zp ? "ct int4 asym" : "ct int4 sym");
  }
  {
    IntParts p;
    p.q.method = models::HfQuantMethod::CompressedTensors;
    models::HfQuantScheme s;
    s.bits = 8;
    s.group_size = -1;
    s.targets = {"Linear"};
    s.format = "int-quantized";
    p.q.groups = {s};
    p.t["weight"] = at::randint(-128, 128, {out, in}, g, at::kChar);
    p.t["weight_scale"] = at::rand({out, 1}, g);
    expect_same_decoding(p, out, in, "ct int8");
  }
}

TEST(PackedBase, ApplyLoraKeepsPackedBasesAndRefusesFloatOnes) {
  LoraConfig c;
  c.enabled = true;
  c.r = 4;
  c.base = BaseFormat::Packed;
  at::manual_seed(2);
  auto m = models::build_model(qf::testing::tiny_llama());
  // a float model cannot become a packed base: refused before anything changes
  const auto e = qf::testing::config_error_of([&] { apply_lora(*m, c, "lm_head"); });
  EXPECT_NE(e.find("is not a packed int linear"), std::string::npos) << e;
  // ... nor a float tensor of a streaming load (a float or partly float model.from)
  const auto streamer = frozen_base_streamer(*m, c, "lm_head");
  const auto se = qf::testing::config_error_of([&] { streamer.build("model.layers.0.mlp.up_proj", at::zeros({128, 64}), {}); });
  EXPECT_NE(se.find("layer model.layers.0.mlp.up_proj is not stored as GPTQ"), std::string::npos) << se;
  EXPECT_TRUE(lora_layers(*m).empty());
  for (auto& ns : models::linear_slots(*m)) {
    if (ns.name == "lm_head") continue;
    const auto& l = *ns.slot->get();
    auto p = gptq_parts(4, true, false, l.out_features, l.in_features);
    p.t.erase("g_idx");
    ns.slot->replace(models::PackedIntLinear::from_checkpoint(p.q, ns.name, l.out_features, l.in_features, p.t, {}));
  }
  auto rep = apply_lora(*m, c, "lm_head");
  EXPECT_EQ(rep.n_frozen_converted, 14);
  EXPECT_EQ(lora_layers(*m).size(), 14u);
  EXPECT_TRUE(dynamic_cast<models::PackedIntLinear*>(lora_layers(*m)[0].second->base.get()));
  // int4 group 32 with fp16 scales, 4-bit zeros and an int32 g_idx per column: ~4.7 bits per weight
  const double bits = 8.0 * rep.base_bytes / rep.base_weights;
  EXPECT_GT(bits, 4.5);
  EXPECT_LT(bits, 5.2);
  const auto state = models::model_state(*m);
  at::manual_seed(3);
  auto m2 = models::build_model(qf::testing::tiny_llama());
  EXPECT_EQ(install_saved_bases(*m2, c, state), 14);
  apply_lora(*m2, c, "lm_head");
  models::load_model_state(*m2, state, "saved");
  at::NoGradGuard ng;
  auto x = at::randint(64, {1, 8}, at::kLong);
  EXPECT_TRUE(at::equal(m2->forward(x), m->forward(x)));
}

// ---- per-linear types: peft.base mix:<llama-quantize mixture> and peft.base gguf ----
namespace {

// 8 layers, 4 query heads per 2 KV heads: use_more_bits picks layers 0, 3, 6, 7.
std::shared_ptr<models::CausalLM> deep(uint64_t seed = 5, int64_t kv_heads = 2) {
  auto c = wide();
  c.n_layers = 8;
  c.n_kv_heads = kv_heads;
  at::manual_seed(seed);
  auto m = models::build_model(c);
  m->init_weights(seed);
  return m;
}

LoraConfig mixed(const std::string& mix, bool exact = false) {
  auto c = lora("q4_k", exact);
  c.block_mix = mix;
  return c;
}

// "q4_K" per linear under model.layers.<i>.<leaf>, for the LoRA layers' bases.
std::map<std::string, std::string> base_types(torch::nn::Module& m) {
  std::map<std::string, std::string> out;
  for (auto& [name, l] : lora_layers(m)) {
    if (auto* b = dynamic_cast<quant::BlockLinear*>(l->base.get())) out[name] = quant::ggml::traits(b->rule).ggml_name;
    else if (auto* h = dynamic_cast<models::HalfLinear*>(l->base.get())) out[name] = c10::toString(h->weight.scalar_type());
  }
  return out;
}

}  // namespace

TEST(MixedBase, ConfigSpellsMixturesAndTheFileTypes) {
  auto c = qf::testing::parse_section<LoraConfig>("peft: {r: 4, base: mix, mixture: q4_k_m, exact_merge: true}", "peft");
  EXPECT_EQ(c.base, BaseFormat::Blocks);
  EXPECT_EQ(c.block_mix, "q4_k_m");
  EXPECT_EQ(base_name(c), "mix q4_k_m");
  // q2_k is the block type, mixture q2_k llama-quantize's Q2_K mixture (attn_v / ffn_down / attn_output bumped)
  EXPECT_TRUE(qf::testing::parse_section<LoraConfig>("peft: {base: q2_k}", "peft").block_mix.empty());
  EXPECT_EQ(qf::testing::parse_section<LoraConfig>("peft: {base: mix, mixture: q2_k}", "peft").block_mix, "q2_k");
  auto g = qf::testing::parse_section<LoraConfig>("peft: {base: gguf}", "peft");
  EXPECT_EQ(g.base, BaseFormat::Blocks);
  EXPECT_EQ(base_name(g), "gguf");
  const std::vector<std::pair<std::string, std::string>> bad{
      {"base: q4_k_m", "peft.base: 'q4_k_m' is not allowed"},
      {"base: mix", "peft.mixture: peft.base: mix needs"},
      {"base: mix, mixture: q9_k", "peft.mixture: 'q9_k' is not a llama-quantize mixture; expected one of f32"},
      {"base: q4_k, mixture: q4_k_m", "peft.mixture: is read only with peft.base: mix (got peft.base q4_k)"}};
  for (const auto& [yaml, want] : bad) {
    const auto e = qf::testing::config_error_of([&] { qf::testing::parse_section<LoraConfig>("peft: {" + yaml + "}", "peft"); });
    EXPECT_NE(e.find(want), std::string::npos) << e;
  }
}

TEST(MixedBase, EachLinearGetsLlamaQuantizesType) {
  auto m = deep();
  apply_lora(*m, mixed("q4_k_m"), "lm_head");
  auto t = base_types(*m);
  ASSERT_EQ(t.size(), 56u);
  for (int i = 0; i < 8; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const bool more = i == 0 || i == 3 || i == 6 || i == 7;  // use_more_bits(i, 8)
    EXPECT_EQ(t[p + "self_attn.v_proj"], more ? "q6_K" : "q4_K") << i;
    EXPECT_EQ(t[p + "mlp.down_proj"], more ? "q6_K" : "q4_K") << i;
    for (const char* leaf : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"})
      EXPECT_EQ(t[p + leaf], "q4_K") << p << leaf;
  }
  // q3_k_m: attn_v Q5_K in layers 0-1 then Q4_K, attn_output Q4_K, ffn_down Q4_K (n/16 = 0 layers at Q5_K)
  auto m3 = deep();
  apply_lora(*m3, mixed("q3_k_m"), "lm_head");
  auto t3 = base_types(*m3);
  EXPECT_EQ(t3["model.layers.1.self_attn.v_proj"], "q5_K");
  EXPECT_EQ(t3["model.layers.2.self_attn.v_proj"], "q4_K");
  EXPECT_EQ(t3["model.layers.5.self_attn.o_proj"], "q4_K");
  EXPECT_EQ(t3["model.layers.0.mlp.down_proj"], "q4_K");
  EXPECT_EQ(t3["model.layers.4.mlp.up_proj"], "q3_K");
  // q2_k with 4 query heads per KV head: attn_v Q4_K (the GQA rule); ffn_down / attn_output Q3_K
  auto m2 = deep(5, 1);
  apply_lora(*m2, mixed("q2_k"), "lm_head");
  auto t2 = base_types(*m2);
  EXPECT_EQ(t2["model.layers.3.self_attn.v_proj"], "q4_K");
  EXPECT_EQ(t2["model.layers.3.mlp.down_proj"], "q3_K");
  EXPECT_EQ(t2["model.layers.3.self_attn.o_proj"], "q3_K");
  EXPECT_EQ(t2["model.layers.3.mlp.gate_proj"], "q2_K");
  // every choice is quant::mix_choice's (what `export --quant` writes for the float model)
  for (auto& [name, rule] : mixture_types(*m, mixed("q5_k_m"), "lm_head"))
    EXPECT_NE(rule.rule, quant::Rule::Affine) << name;
}

TEST(MixedBase, WidthsFallBackAsLlamaCppOrAreRefusedNamingTheLayer) {
  // tiny_llama's 64-wide rows: Q4_K -> Q5_0 and Q6_K -> Q8_0, llama.cpp's fallbacks
  at::manual_seed(1);
  auto narrow = models::build_model(qf::testing::tiny_llama());
  apply_lora(*narrow, mixed("q4_k_m"), "lm_head");
  auto t = base_types(*narrow);
  EXPECT_EQ(t["model.layers.0.self_attn.q_proj"], "q5_0");
  EXPECT_EQ(t["model.layers.1.self_attn.v_proj"], "q8_0");  // use_more_bits(1, 2): Q6_K's fallback
  // q1_0 has no fallback (llama-quantize stops); q2_k_s needs an importance matrix: one ConfigError each
  at::manual_seed(1);
  auto n2 = models::build_model(qf::testing::tiny_llama());
  const auto e = qf::testing::config_error_of([&] { apply_lora(*n2, mixed("q1_0"), "lm_head"); });
  EXPECT_NE(e.find("peft.mixture: q1_0: layer model.layers.0.self_attn.q_proj (blk.0.attn_q.weight)"), std::string::npos) << e;
  EXPECT_TRUE(lora_layers(*n2).empty());
  auto m = deep();
  const auto e2 = qf::testing::config_error_of([&] { apply_lora(*m, mixed("q2_k_s"), "lm_head"); });
  EXPECT_NE(e2.find("importance matrix"), std::string::npos) << e2;
}

TEST(MixedBase, ExactMergeRequantizesEachLinearIntoItsOwnType) {
  auto m = deep();
  apply_lora(*m, mixed("q4_k_m", /*exact=*/true), "lm_head");
  randomize_b(*m, 0.05);
  std::set<quant::Rule> seen;
  at::NoGradGuard ng;
  for (auto& [name, l] : lora_layers(*m)) {
    auto* blk = dynamic_cast<quant::BlockLinear*>(l->base.get());
    ASSERT_TRUE(blk && l->exact) << name;
    seen.insert(blk->rule);
    const auto trained = l->effective_weight();  // fq_T(deq + s·BA), what the forward used
    EXPECT_TRUE(at::equal(trained, quant::fake_quant_values(blk->effective_weight() + l->delta(), blk->spec()))) << name;
    auto packed = blk->packed(l->merged_weight());  // what export writes: W + s·BA in the layer's own type
    EXPECT_EQ(packed->weight_spec().rule, blk->rule) << name;
    EXPECT_TRUE(at::equal(packed->effective_weight(), trained)) << name;
  }
  EXPECT_EQ(seen, (std::set<quant::Rule>{quant::Rule::GgmlQ4_K, quant::Rule::GgmlQ6_K}));
}

TEST(MixedBase, SavedRunsRebuildEachLinearInItsType) {
  for (const bool exact : {false, true}) {
    auto m = deep();
    auto cfg = mixed("q4_k_m", exact);
    apply_lora(*m, cfg, "lm_head");
    randomize_b(*m, 0.05);
    const auto state = models::model_state(*m);
    auto m2 = deep(77);
    EXPECT_EQ(install_saved_bases(*m2, cfg, state), 56);
    apply_lora(*m2, cfg, "lm_head");
    models::load_model_state(*m2, state, "saved");
    EXPECT_EQ(base_types(*m2), base_types(*m));
    EXPECT_TRUE(at::equal(logits(*m2), logits(*m))) << exact;
  }
}

TEST(GgufTypesBase, KeepsEveryStoredTypeAndRefusesWhatItCannotQuantize) {
  auto m = model();
  auto cfg = mixed(kGgufTypes);
  // A float model is no GGUF file: refused before anything changes, naming the layer and the way out
  const auto e = qf::testing::config_error_of([&] { apply_lora(*m, cfg, "lm_head"); });
  EXPECT_NE(e.find("peft.base: gguf: layer model.layers.0.self_attn.q_proj is not held as a GGUF tensor"), std::string::npos) << e;
  EXPECT_NE(e.find("peft.base mix"), std::string::npos) << e;
  EXPECT_TRUE(lora_layers(*m).empty());
  const auto streamer = frozen_base_streamer(*m, cfg, "lm_head");
  const auto se = qf::testing::config_error_of([&] { streamer.build("model.layers.0.mlp.up_proj", at::zeros({512, 256}), {}); });
  EXPECT_NE(se.find("not read from a GGUF"), std::string::npos) << se;
  // What load_gguf_weights offers: each tensor's bytes and GGUF type id
  auto g = at::detail::createCPUGenerator(8);
  std::map<std::string, std::string> want;
  const std::vector<uint32_t> ids{12, 14, 2, 8, 13, 11, 1};  // Q4_K Q6_K Q4_0 Q8_0 Q5_K Q3_K F16
  size_t k = 0;
  for (auto& ns : models::linear_slots(*m)) {
    if (ns.name == "lm_head") continue;
    const auto& d = *ns.slot->get();
    const auto w = at::randn({d.out_features, d.in_features}, g) * 0.05;
    const uint32_t id = ids[k++ % ids.size()];
    const auto* t = quant::ggml::traits_by_gguf_id(id);
    const auto bytes = t->rule == quant::Rule::Affine ? w.to(at::kHalf).view(at::kByte) : quant::ggml::quantize(w, t->rule);
    auto built = streamer.build_blocks(ns.name, id, bytes, d.in_features, {});
    ASSERT_TRUE(built) << ns.name;
    EXPECT_TRUE(at::equal(built->effective_weight(),
                          t->rule == quant::Rule::Affine ? w.to(at::kHalf).to(at::kFloat)
                                                         : quant::ggml::dequantize(bytes, t->rule, d.in_features)))
        << ns.name;
    want[ns.name] = t->rule == quant::Rule::Affine ? "Half" : t->ggml_name;
    ns.slot->replace(built);
  }
  // IQ2_XXS (id 16): qforge dequantizes it but cannot quantize it: refused naming the tensor and type
  const auto iq = qf::testing::config_error_of(
      [&] { streamer.build_blocks("model.layers.1.mlp.down_proj", 16, at::zeros({256, 66 * 2}, at::kByte), 512, {}); });
  EXPECT_NE(iq.find("tensor blk.1.ffn_down.weight (layer model.layers.1.mlp.down_proj) is stored as IQ2_XXS"),
            std::string::npos) << iq;
  auto rep = apply_lora(*m, mixed(kGgufTypes, /*exact=*/true), "lm_head");
  EXPECT_EQ(rep.n_frozen_converted, 14);
  EXPECT_EQ(base_types(*m), want);  // every layer kept as built: no re-quantization
  randomize_b(*m, 0.05);
  // the checkpoint rebuilds each layer in its own type (the ggml_type buffer), F16 as F16
  const auto state = models::model_state(*m);
  auto m2 = model(77);
  EXPECT_EQ(install_saved_bases(*m2, mixed(kGgufTypes), state), 14);
  apply_lora(*m2, mixed(kGgufTypes, true), "lm_head");
  models::load_model_state(*m2, state, "saved");
  EXPECT_EQ(base_types(*m2), want);
  EXPECT_TRUE(at::equal(logits(*m2), logits(*m)));
  // a single-type checkpoint has no ggml_type: refused under a per-linear base, not misread
  auto m3 = model();
  apply_lora(*m3, lora("q4_k"), "lm_head");
  auto m4 = model();
  EXPECT_THROW(install_saved_bases(*m4, mixed("q4_k_m"), models::model_state(*m3)), InputError);
}
