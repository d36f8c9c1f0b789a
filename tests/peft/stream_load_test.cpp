// QLoRA's streaming load (peft::frozen_base_streamer through models::load_hf_weights) against
// load-then-apply_lora: the same modules, the same NF4 codes / absmax / nested statistics (or bf16
// weights), the same biases and logits, bit for bit, for every checkpoint dtype x model dtype x base
// format, sharded or not, with biases (Qwen2) and GPT-2's transposed Conv1D weights; non-target and
// output linears load dense as before. A bad config or checkpoint is refused before any module changes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "models/hf.h"
#include "models/transformer.h"
#include "peft/lora.h"
#include "quant/nf4.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::peft;

namespace {

models::ModelConfig family(const std::string& kind) {
  auto c = qf::testing::tiny_llama(96, 32);
  if (kind == "qwen2") c.qkv_bias = true;
  if (kind == "gpt2") {
    c.family = models::Family::Gpt2;
    c.n_kv_heads = 0;
    c.ffn_dim = 256;
    c.tie_embeddings = true;  // GPT-2 always ties
  }
  return c;
}

// Writes a checkpoint of a random model of `kind` in `dtype` (sharded when `shard_bytes` > 0).
void write_checkpoint(const std::string& dir, const std::string& kind, at::ScalarType dtype, int64_t shard_bytes) {
  at::manual_seed(11);
  auto m = models::build_model(family(kind));
  m->init_weights(11);
  std::vector<std::pair<std::string, at::Tensor>> w;
  at::NoGradGuard ng;
  for (auto& p : m->named_parameters()) w.emplace_back(p.key(), p.value() + at::randn_like(p.value()) * 0.05);
  fs::ensure_dir(dir);
  models::write_hf_weights(m->cfg, w, dir, dtype, shard_bytes > 0 ? shard_bytes : int64_t{1} << 40);
}

LoraConfig lora(BaseFormat base, std::vector<std::string> targets, std::vector<std::string> save = {}) {
  LoraConfig c;
  c.enabled = true;
  c.r = 4;
  c.alpha = 8;
  c.base = base;
  c.target_modules = std::move(targets);
  c.modules_to_save = std::move(save);
  return c;
}

std::shared_ptr<models::CausalLM> build(const std::string& dir, models::DType dtype, models::HfCheckpoint& ck) {
  ck = models::read_hf_checkpoint(dir);
  ck.config.dtype = dtype;
  return models::build_model(ck.config, /*init=*/false);
}

// Today's path: the whole dense model loads, then apply_lora converts.
std::shared_ptr<models::CausalLM> load_then_convert(const std::string& dir, models::DType dtype, const LoraConfig& pc,
                                                    ApplyReport& rep) {
  models::HfCheckpoint ck;
  auto m = build(dir, dtype, ck);
  models::load_hf_weights(*m, ck, false);
  at::manual_seed(3);  // the LoRA A init
  rep = apply_lora(*m, pc, "lm_head");
  return m;
}

std::shared_ptr<models::CausalLM> streamed(const std::string& dir, models::DType dtype, const LoraConfig& pc,
                                           ApplyReport& rep) {
  models::HfCheckpoint ck;
  auto m = build(dir, dtype, ck);
  const auto s = frozen_base_streamer(*m, pc, "lm_head");
  models::load_hf_weights(*m, ck, false, /*populate=*/false, &s);
  at::manual_seed(3);
  rep = apply_lora(*m, pc, "lm_head");
  return m;
}

// Every linear's module kind, and every parameter and buffer, equal bit for bit (dtype included).
void expect_identical(models::CausalLM& a, models::CausalLM& b, const std::string& what) {
  auto sa = models::linear_slots(a), sb = models::linear_slots(b);
  ASSERT_EQ(sa.size(), sb.size()) << what;
  for (size_t i = 0; i < sa.size(); ++i) {
    auto* la = sa[i].slot->get().get();
    auto* lb = sb[i].slot->get().get();
    if (auto* l = dynamic_cast<LoraLinear*>(la)) la = l->base.get();
    if (auto* l = dynamic_cast<LoraLinear*>(lb)) lb = l->base.get();
    EXPECT_EQ(typeid(*la).name(), typeid(*lb).name()) << what << ": " << sa[i].name;
  }
  auto pa = a.named_parameters(), pb = b.named_parameters();
  auto ba = a.named_buffers(), bb = b.named_buffers();
  ASSERT_EQ(pa.size(), pb.size()) << what;
  ASSERT_EQ(ba.size(), bb.size()) << what;
  for (auto& p : pa) {
    auto* q = pb.find(p.key());
    ASSERT_NE(q, nullptr) << what << ": " << p.key();
    EXPECT_EQ(p.value().scalar_type(), q->scalar_type()) << what << ": " << p.key();
    EXPECT_TRUE(at::equal(p.value(), *q)) << what << ": " << p.key();
    EXPECT_EQ(p.value().requires_grad(), q->requires_grad()) << what << ": " << p.key();
  }
  for (auto& p : ba) {
    auto* q = bb.find(p.key());
    ASSERT_NE(q, nullptr) << what << ": " << p.key();
    EXPECT_EQ(p.value().scalar_type(), q->scalar_type()) << what << ": " << p.key();
    EXPECT_TRUE(at::equal(p.value(), *q)) << what << ": " << p.key();
  }
  at::NoGradGuard ng;
  a.eval();
  b.eval();
  auto ids = at::arange(24, at::kLong).reshape({2, 12}).remainder(96);
  EXPECT_TRUE(at::equal(a.forward(ids), b.forward(ids))) << what << ": logits";
}

int64_t count_nf4(models::CausalLM& m) {
  int64_t n = 0;
  for (auto& mod : m.modules(true)) n += dynamic_cast<quant::Nf4Linear*>(mod.get()) != nullptr;
  return n;
}

}  // namespace

TEST(StreamLoad, BitIdenticalToLoadThenConvertAcrossDtypesFormatsAndFamilies) {
  qf::testing::TmpDir tmp("qf_stream");
  struct Case {
    std::string kind;
    at::ScalarType ck_dtype;
    int64_t shard;
  };
  const std::vector<Case> cases = {{"llama", at::kBFloat16, 0},
                                   {"llama", at::kFloat, 40000},  // several shards
                                   {"qwen2", at::kBFloat16, 30000},
                                   {"qwen2", at::kHalf, 0},
                                   {"gpt2", at::kFloat, 0},
                                   {"gpt2", at::kBFloat16, 50000}};
  for (auto& c : cases) {
    const std::string dir = tmp / (c.kind + "_" + st::dtype_name(c.ck_dtype) + "_" + std::to_string(c.shard));
    write_checkpoint(dir, c.kind, c.ck_dtype, c.shard);
    for (auto mdt : {models::DType::F32, models::DType::BF16}) {
      for (auto base : {BaseFormat::Nf4, BaseFormat::Bf16}) {
        // all-linear; and only some targets plus a linear trained fully (it stays dense).
        const std::string save = c.kind == "gpt2" ? "transformer.h.1.mlp.c_proj" : "model.layers.1.mlp.down_proj";
        for (auto pc : {lora(base, {"all-linear"}), lora(base, {c.kind == "gpt2" ? "c_attn" : "q_proj"}, {save})}) {
          const std::string what = dir + " model " + (mdt == models::DType::F32 ? "fp32" : "bf16") + " base " +
                                   base_format_name(base) + " targets " + pc.target_modules[0];
          ApplyReport ra, rb;
          auto a = load_then_convert(dir, mdt, pc, ra);
          auto b = streamed(dir, mdt, pc, rb);
          expect_identical(*a, *b, what);
          EXPECT_EQ(ra.n_frozen_converted, rb.n_frozen_converted) << what;
          EXPECT_EQ(ra.wrapped, rb.wrapped) << what;
          EXPECT_EQ(ra.weight_bytes, rb.weight_bytes) << what;
          if (base == BaseFormat::Nf4) EXPECT_EQ(count_nf4(*b), ra.n_frozen_converted) << what;
          if (!pc.modules_to_save.empty()) {
            for (auto& ns : models::linear_slots(*b))
              if (ns.name == save) EXPECT_TRUE(std::dynamic_pointer_cast<models::DenseLinear>(ns.slot->get())) << what;
          }
        }
      }
    }
  }
}

TEST(StreamLoad, StreamedBaseBeforeApplyLoraIsAlreadyNf4AndOutputLayerStaysDense) {
  qf::testing::TmpDir tmp("qf_stream");
  write_checkpoint(tmp / "ck", "llama", at::kBFloat16, 0);
  models::HfCheckpoint ck;
  auto m = build(tmp / "ck", models::DType::BF16, ck);
  const auto pc = lora(BaseFormat::Nf4, {"q_proj"});
  const auto s = frozen_base_streamer(*m, pc, "lm_head");
  models::load_hf_weights(*m, ck, false, false, &s);
  for (auto& ns : models::linear_slots(*m)) {
    if (ns.name == "lm_head")
      EXPECT_TRUE(std::dynamic_pointer_cast<models::DenseLinear>(ns.slot->get())) << ns.name;
    else  // every other linear, targeted or not, is stored as apply_lora would store it
      EXPECT_TRUE(std::dynamic_pointer_cast<quant::Nf4Linear>(ns.slot->get())) << ns.name;
  }
  // the dense weights of the streamed linears are gone from the model
  for (auto& p : m->named_parameters()) EXPECT_TRUE(p.key() == "lm_head.weight" || p.key().find("proj") == std::string::npos) << p.key();
}

TEST(StreamLoad, BadConfigOrCheckpointIsRefusedBeforeAnyModuleChanges) {
  qf::testing::TmpDir tmp("qf_stream");
  write_checkpoint(tmp / "ck", "llama", at::kBFloat16, 0);
  auto all_dense = [](models::CausalLM& m) {
    for (auto& ns : models::linear_slots(m))
      if (!std::dynamic_pointer_cast<models::DenseLinear>(ns.slot->get())) return false;
    return true;
  };
  {  // r wider than the layers: apply_lora's own error, before any weight is read
    models::HfCheckpoint ck;
    auto m = build(tmp / "ck", models::DType::F32, ck);
    auto pc = lora(BaseFormat::Nf4, {"all-linear"});
    pc.r = 1000;
    EXPECT_THROW(frozen_base_streamer(*m, pc, "lm_head"), ConfigError);
    EXPECT_TRUE(all_dense(*m));
  }
  {  // a tensor of the wrong shape: the header pass refuses the checkpoint, nothing is quantized
    auto f = st::load(tmp / "ck/model.safetensors");
    std::vector<std::pair<std::string, at::Tensor>> w;
    for (auto& [n, t] : f.tensors) w.emplace_back(n, n == "model.layers.1.mlp.up_proj.weight" ? t.slice(0, 0, 8).clone() : t.clone());
    f = st::File();
    st::save(tmp / "ck/model.safetensors", w);
    models::HfCheckpoint ck;
    auto m = build(tmp / "ck", models::DType::F32, ck);
    const auto s = frozen_base_streamer(*m, lora(BaseFormat::Nf4, {"all-linear"}), "lm_head");
    try {
      models::load_hf_weights(*m, ck, false, false, &s);
      FAIL() << "a misshapen tensor loaded";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(all_dense(*m));
  }
}

// A bitsandbytes NF4 dir (transformers' save of a load_in_4bit model: blocksize 64, double quant with
// nested blocks of 256 and the signed dynamic map, qforge's QLoRA default) under peft.base nf4: the
// streamer keeps the file's bytes as each frozen base, so the base dequantizes to exactly what the
// dir loads to dequantized (bitsandbytes' dequantize_4bit, tests/interop/test_bnb_4bit_in.py). A
// layout peft.nf4 does not ask for (blocksize 128 here) goes through dequantize + re-quantize.
TEST(StreamLoad, BitsandbytesNf4DirKeepsItsPackedBytesAsTheFrozenBase) {
  qf::testing::TmpDir tmp("qf_bnb_stream");
  const std::string dir = tmp.path + "/bnb";
  write_checkpoint(dir, "llama", at::kFloat, 0);
  std::map<std::string, quant::Nf4Tensor> packed;  // linear -> what the file holds
  {
    auto f = st::load(dir + "/model.safetensors");
    std::vector<std::pair<std::string, at::Tensor>> ts;
    const auto& map = quant::dynamic_map_signed();
    for (auto& [n, t] : f.tensors) {
      if (n.rfind("model.layers.", 0) != 0 || n.find("proj.weight") == std::string::npos) {
        ts.emplace_back(n, t.clone());
        continue;
      }
      const std::string lin = n.substr(0, n.size() - 7);
      auto q = quant::nf4_quantize(t, 64, true);
      packed[lin] = q;
      nlohmann::json qs = {{"quant_type", "nf4"},      {"blocksize", 64},          {"dtype", "float32"},
                           {"shape", t.sizes().vec()}, {"nested_blocksize", 256}, {"nested_dtype", "float32"},
                           {"nested_offset", static_cast<double>(q.offset)}};
      const std::string js = qs.dump();
      auto blob = at::empty({static_cast<int64_t>(js.size())}, at::kByte);
      std::memcpy(blob.data_ptr<uint8_t>(), js.data(), js.size());
      ts.emplace_back(n, q.packed.reshape({-1, 1}));
      ts.emplace_back(n + ".absmax", q.absmax);
      ts.emplace_back(n + ".quant_map", at::tensor(std::vector<float>(quant::kNf4Code.begin(), quant::kNf4Code.end())));
      ts.emplace_back(n + ".nested_absmax", q.nested_absmax);
      ts.emplace_back(n + ".nested_quant_map", at::tensor(std::vector<float>(map.begin(), map.end())));
      ts.emplace_back(n + ".quant_state.bitsandbytes__nf4", blob);
    }
    st::save(dir + "/model.safetensors", ts);
    auto cfg = nlohmann::json::parse(fs::read_file(dir + "/config.json"));
    cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}, {"bnb_4bit_quant_type", "nf4"},
                                  {"bnb_4bit_use_double_quant", true}};
    fs::write_atomic(dir + "/config.json", cfg.dump());
  }
  auto dense = models::load_hf_model(dir, false);  // dequantized: bitsandbytes' weights
  std::map<std::string, at::Tensor> want;
  for (auto& p : dense->named_parameters()) want[p.key()] = p.value();

  models::HfCheckpoint ck;
  auto m = build(dir, models::DType::F32, ck);
  const auto pc = lora(BaseFormat::Nf4, {"all-linear"});
  const auto s = frozen_base_streamer(*m, pc, "lm_head");
  models::HfLoadReport rep;
  models::load_hf_weights(*m, ck, false, /*populate=*/false, &s, &rep);
  EXPECT_EQ(rep.kept_packed.size(), packed.size());
  EXPECT_TRUE(rep.dequantized.empty());
  int64_t n = 0;
  for (auto& ns : models::linear_slots(*m)) {
    auto it = packed.find(ns.name);
    if (it == packed.end()) continue;
    auto* b = dynamic_cast<quant::Nf4Linear*>(ns.slot->get().get());
    ASSERT_NE(b, nullptr) << ns.name;
    EXPECT_TRUE(at::equal(b->weight, it->second.packed)) << ns.name;
    EXPECT_TRUE(at::equal(b->absmax, it->second.absmax)) << ns.name;
    EXPECT_TRUE(at::equal(b->nested_absmax, it->second.nested_absmax)) << ns.name;
    EXPECT_EQ(b->offset.item<float>(), it->second.offset) << ns.name;
    EXPECT_TRUE(at::equal(b->materialize(at::kFloat), want.at(ns.name + ".weight"))) << ns.name;
    ++n;
  }
  EXPECT_EQ(n, static_cast<int64_t>(packed.size()));
  at::manual_seed(3);
  auto ar = apply_lora(*m, pc, "lm_head");
  EXPECT_EQ(count_nf4(*m), n);  // apply_lora kept them

  // peft.nf4.blocksize 128: not the file's layout, so dequantized and re-quantized at 128
  models::HfCheckpoint ck2;
  auto m2 = build(dir, models::DType::F32, ck2);
  auto pc2 = lora(BaseFormat::Nf4, {"all-linear"});
  pc2.nf4_blocksize = 128;
  const auto s2 = frozen_base_streamer(*m2, pc2, "lm_head");
  models::HfLoadReport rep2;
  models::load_hf_weights(*m2, ck2, false, false, &s2, &rep2);
  EXPECT_TRUE(rep2.kept_packed.empty());
  EXPECT_EQ(rep2.dequantized.size(), packed.size());
  for (auto& ns : models::linear_slots(*m2))
    if (packed.count(ns.name)) {
      auto* b = dynamic_cast<quant::Nf4Linear*>(ns.slot->get().get());
      ASSERT_NE(b, nullptr) << ns.name;
      EXPECT_EQ(b->blocksize, 128);
    }
}
