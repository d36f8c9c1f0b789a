// Quantized Hugging Face checkpoints in (models/hf_quantized.*, issue 21): GPTQ (v1 and v2 zero
// points, act-order g_idx, 8-bit), AWQ GEMM and compressed-tensors (pack-quantized int4 with packed
// zero points, int-quantized int8) directories written here by hand from known codes load to exactly
// (codes - zeros) * scales, GPTQ 2- and 3-bit (codes across words) and compressed-tensors fp8 too;
// every bad-input rule is an error naming the file, the tensor and the rule.
// The peers themselves (gptqmodel, autoawq, transformers) are checked in tests/interop/test_quantized_in.py.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "models/hf.h"
#include "models/hf_quantized.h"
#include "models/packed_linear.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using namespace qf::models;
using Tensors = std::vector<std::pair<std::string, at::Tensor>>;

namespace {

ModelConfig tiny() { return qf::testing::tiny_llama(96, 64); }

nlohmann::json config(const nlohmann::json& quant) {
  auto c = tiny();
  return {{"architectures", {"LlamaForCausalLM"}}, {"vocab_size", c.vocab_size},
          {"hidden_size", c.dim},                  {"intermediate_size", c.ffn_dim},
          {"num_hidden_layers", c.n_layers},       {"num_attention_heads", c.n_heads},
          {"num_key_value_heads", c.n_kv_heads},   {"max_position_embeddings", c.max_seq_len},
          {"rms_norm_eps", c.norm_eps},            {"tie_word_embeddings", false},
          {"torch_dtype", "float16"},              {"quantization_config", quant}};
}

bool is_linear(const std::string& name) { return name.find("model.layers.") == 0 && name.find("proj.weight") != std::string::npos; }

// A checkpoint whose decoder linears are packed by `pack(name, out, in, expect)` (which returns the
// tensors and sets the weight they must decode to); the rest float. Returns the expected params.
std::map<std::string, at::Tensor> write_dir(
    const std::string& dir, const nlohmann::json& quant,
    const std::function<Tensors(const std::string&, int64_t, int64_t, at::Tensor&)>& pack) {
  fs::ensure_dir(dir);
  at::manual_seed(4);
  auto m = build_model(tiny());
  m->init_weights(4);
  Tensors ts;
  std::map<std::string, at::Tensor> want;
  for (auto& p : m->named_parameters()) {
    const std::string& n = p.key();
    if (is_linear(n)) {
      at::Tensor w;
      for (auto& t : pack(n.substr(0, n.size() - 7), p.value().size(0), p.value().size(1), w)) ts.push_back(t);
      want[n] = w;
    } else {
      ts.emplace_back(n, p.value().detach().to(at::kHalf));
      want[n] = p.value().detach().to(at::kHalf).to(at::kFloat);
    }
  }
  fs::write_atomic(dir + "/config.json", config(quant).dump());
  st::save(dir + "/model.safetensors", ts);
  return want;
}

void expect_loads(const std::string& dir, const std::map<std::string, at::Tensor>& want, size_t n_packed) {
  auto ck = read_hf_checkpoint(dir);
  ASSERT_TRUE(ck.quant.quantized());
  auto m = build_model(ck.config, false);
  HfLoadReport rep;
  load_hf_weights(*m, ck, false, true, nullptr, &rep);
  EXPECT_EQ(rep.dequantized.size(), n_packed);
  for (auto& p : m->named_parameters()) EXPECT_TRUE(at::equal(p.value(), want.at(p.key()))) << p.key();
}

std::string load_error(const std::string& dir) {
  try {
    load_hf_model(dir, false);
  } catch (const qf::InputError& e) {
    return e.what();
  }
  return "(loaded)";
}

// The load error of `dir` (a write_dir checkpoint) once `edit` has changed its tensors.
std::string damaged_load_error(const std::string& dir, const std::function<void(Tensors&)>& edit) {
  auto f = st::load(dir + "/model.safetensors");
  Tensors ts;
  for (auto& [n, t] : f.tensors) ts.emplace_back(n, t.clone());
  edit(ts);
  st::save(dir + "/model.safetensors", ts);
  return load_error(dir);
}

void replace_tensor(Tensors& ts, const std::string& name, const at::Tensor& t) {
  for (auto& [n, x] : ts)
    if (n == name) x = t;
}

void expect_has(const std::string& e, const std::vector<std::string>& needles) {
  for (auto& n : needles) EXPECT_NE(e.find(n), std::string::npos) << "missing '" << n << "' in: " << e;
}

nlohmann::json gptq_config(int bits, int64_t group, bool sym, bool desc_act, const std::string& fmt) {
  return {{"quant_method", "gptq"}, {"bits", bits},         {"group_size", group},
          {"desc_act", desc_act},   {"sym", sym},           {"checkpoint_format", fmt}};
}

// GPTQ parts from random codes u [out, in], zero points z [groups, out], fp16 scales, g_idx.
struct GptqPacker {
  int bits = 4;
  int64_t group = 32;
  bool v2 = false, act_order = false;
  Tensors operator()(const std::string& lin, int64_t out, int64_t in, at::Tensor& w) const {
    const int64_t groups = group < 0 ? 1 : in / group, top = int64_t{1} << bits;
    auto u = at::randint(0, top, {out, in}, at::kLong);
    // v1 stores z - 1 in a code: z in [1, 2^b - 1] (gptqmodel's +1 per code then never carries)
    auto z = at::randint(v2 ? 0 : 1, top, {groups, out}, at::kLong);
    auto s = (at::rand({groups, out}) * 0.02 + 0.001).to(at::kHalf);
    auto g = at::arange(in, at::kLong).div(group < 0 ? in : group, "floor");
    if (act_order) g = g.index_select(0, at::randperm(in, at::kLong));
    w = (u - z.index_select(0, g).t()).to(at::kFloat) * s.to(at::kFloat).index_select(0, g).t();
    at::Tensor qzeros = packed::pack_cols(v2 ? z : z - 1, bits);
    if (bits == 3 && !v2) {  // gptqmodel's v2 -> v1 save: its constant per word position subtracted from z's words
      auto words = packed::pack_cols(z, 3).to(at::kLong);
      auto sub = at::tensor({int64_t{0x24924924}, int64_t{0x92492492}, int64_t{0x49249249}}, at::kLong).repeat({words.size(1) / 3});
      words = (words - sub).bitwise_and(0xFFFFFFFFLL);
      qzeros = at::where(words.ge(int64_t{1} << 31), words - (int64_t{1} << 32), words).to(at::kInt);
    }
    return {{lin + ".qweight", packed::pack_cols(u, bits).t().contiguous()},
            {lin + ".qzeros", qzeros},
            {lin + ".scales", s},
            {lin + ".g_idx", g.to(at::kInt)}};
  }
};

}  // namespace

TEST(HfQuantizedIn, PackingsRoundTrip) {
  auto u = at::randint(0, 16, {6, 32}, at::kLong);
  EXPECT_TRUE(at::equal(packed::unpack_cols(packed::pack_cols(u, 4), 4), u));
  EXPECT_TRUE(at::equal(packed::unpack_awq(packed::pack_awq(u)), u));
  auto u8 = at::randint(0, 256, {3, 16}, at::kLong);
  EXPECT_TRUE(at::equal(packed::unpack_cols(packed::pack_cols(u8, 8), 8), u8));
  // AWQ's order: nibble 1 of the first word holds column 2
  auto one = at::zeros({1, 8}, at::kLong);
  one[0][2] = 5;
  EXPECT_EQ(packed::pack_awq(one).item<int32_t>(), 5 << 4);
  auto u2 = at::randint(0, 4, {3, 32}, at::kLong);
  EXPECT_TRUE(at::equal(packed::unpack_cols(packed::pack_cols(u2, 2), 2), u2));
  // 3 bits: 32 codes in 3 words, code k at bit 3k of the run (gptqmodel's pack): code 10 straddles
  // words 0 and 1 (bits 30, 31 | 0), code 21 words 1 and 2 (bit 31 | 0, 1)
  auto u3 = at::zeros({1, 32}, at::kLong);
  u3[0][10] = 7;
  u3[0][21] = 5;
  u3[0][31] = 6;
  auto w3 = packed::pack_cols(u3, 3);
  ASSERT_EQ(w3.sizes(), at::IntArrayRef({1, 3}));
  EXPECT_EQ(static_cast<uint32_t>(w3[0][0].item<int32_t>()), 0xC0000000u);
  EXPECT_EQ(static_cast<uint32_t>(w3[0][1].item<int32_t>()), 0x80000001u);
  EXPECT_EQ(static_cast<uint32_t>(w3[0][2].item<int32_t>()), 0xC0000002u);
  auto r3 = at::randint(0, 8, {5, 64}, at::kLong);
  EXPECT_TRUE(at::equal(packed::unpack_cols(packed::pack_cols(r3, 3), 3), r3));
}

TEST(HfQuantizedIn, GptqDirectoriesLoadDequantized) {
  qf::testing::TmpDir tmp("qf_gptq_in");
  struct Case {
    const char* name;
    GptqPacker p;
    bool sym;
  };
  for (auto& c : {Case{"v1", {4, 32, false, false}, true}, Case{"v2_asym", {4, 32, true, false}, false},
                  Case{"act_order", {4, 32, false, true}, true}, Case{"per_channel_8bit", {8, -1, true, false}, false},
                  Case{"g16_8bit_v1", {8, 16, false, false}, true}, Case{"int2_v1_asym", {2, 32, false, false}, false},
                  Case{"int3_v1_asym", {3, 32, false, false}, false}, Case{"int3_v2_act_order", {3, 32, true, true}, true}}) {
    SCOPED_TRACE(c.name);
    const auto dir = tmp / c.name;
    auto want = write_dir(dir, gptq_config(c.p.bits, c.p.group, c.sym, c.p.act_order, c.p.v2 ? "gptq_v2" : "gptq"), c.p);
    expect_loads(dir, want, 14);
  }
}

TEST(HfQuantizedIn, GptqV1ZeroPointsCarryAsGptqmodelsAdd) {
  // gptqmodel converts v1 zero points by one int32 add of 0x11111111: a stored nibble 15 (z - 1 of
  // z = 16, i.e. an asymmetric v1 file holding z = 0 as -1) carries into the next code.
  qf::testing::TmpDir tmp("qf_gptq_carry");
  auto want = write_dir(tmp / "d", gptq_config(4, 32, false, false, "gptq"),
                        [](const std::string& lin, int64_t out, int64_t in, at::Tensor& w) {
                          auto u = at::full({out, in}, 3, at::kLong);
                          auto stored = at::zeros({in / 32, out}, at::kLong);
                          stored.select(1, 0).fill_(15);  // column 0: nibble 15 -> 0, carry into column 1
                          auto z = stored + 1;
                          z.select(1, 0).fill_(0);
                          z.select(1, 1).add_(1);
                          auto s = at::full({in / 32, out}, 0.5, at::kHalf);
                          w = (u - z.repeat_interleave(32, 0).t()).to(at::kFloat) * 0.5;
                          return Tensors{{lin + ".qweight", packed::pack_cols(u, 4).t().contiguous()},
                                         {lin + ".qzeros", packed::pack_cols(stored, 4)},
                                         {lin + ".scales", s}};
                        });
  expect_loads(tmp / "d", want, 14);
}

TEST(HfQuantizedIn, AwqAndCompressedTensorsDirectoriesLoadDequantized) {
  qf::testing::TmpDir tmp("qf_awq_in");
  auto awq = [](const std::string& lin, int64_t out, int64_t in, at::Tensor& w) {
    auto u = at::randint(0, 16, {out, in}, at::kLong);
    auto z = at::randint(0, 16, {out, in / 16}, at::kLong);
    auto s = (at::rand({out, in / 16}) * 0.02 + 0.001).to(at::kHalf);
    w = (u - z.repeat_interleave(16, 1)).to(at::kFloat) * s.to(at::kFloat).repeat_interleave(16, 1);
    return Tensors{{lin + ".qweight", packed::pack_awq(u.t().contiguous())},
                   {lin + ".qzeros", packed::pack_awq(z.t().contiguous())},
                   {lin + ".scales", s.t().contiguous()}};
  };
  auto want = write_dir(tmp / "awq", {{"quant_method", "awq"}, {"version", "gemm"}, {"bits", 4}, {"group_size", 16},
                                      {"zero_point", true}},
                        awq);
  expect_loads(tmp / "awq", want, 14);

  // compressed-tensors pack-quantized int4 asymmetric: signed codes q - 8 and zero points z - 8,
  // zero points packed along the output
  nlohmann::json ct4 = {{"quant_method", "compressed-tensors"}, {"format", "pack-quantized"},
                        {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", {{"num_bits", 4}, {"type", "int"},
                                                         {"symmetric", false}, {"strategy", "group"}, {"group_size", 32}}}}}}},
                        {"ignore", {"lm_head"}}};
  ct4["config_groups"]["group_0"]["format"] = nullptr;  // null: the top-level format (as older writers leave it)
  want = write_dir(tmp / "ct4", ct4, [](const std::string& lin, int64_t out, int64_t in, at::Tensor& w) {
    auto u = at::randint(0, 16, {out, in}, at::kLong);
    auto z = at::randint(0, 16, {out, in / 32}, at::kLong);
    auto s = at::rand({out, in / 32}).mul(0.01).add(0.001).to(at::kHalf);
    w = (u - z.repeat_interleave(32, 1)).to(at::kFloat) * s.to(at::kFloat).repeat_interleave(32, 1);
    return Tensors{{lin + ".weight_packed", packed::pack_cols(u, 4)},
                   {lin + ".weight_scale", s},
                   {lin + ".weight_zero_point", packed::pack_cols(z.t().contiguous(), 4).t().contiguous()},
                   {lin + ".weight_shape", at::tensor({out, in}, at::kLong)}};
  });
  expect_loads(tmp / "ct4", want, 14);

  // int-quantized int8 per channel (symmetric)
  nlohmann::json ct8 = ct4;
  ct8["format"] = "int-quantized";
  ct8["config_groups"]["group_0"]["weights"] = {{"num_bits", 8}, {"type", "int"}, {"symmetric", true}, {"strategy", "channel"}};
  want = write_dir(tmp / "ct8", ct8, [](const std::string& lin, int64_t out, int64_t in, at::Tensor& w) {
    auto q = at::randint(-128, 128, {out, in}, at::kLong);
    auto s = at::rand({out, 1}).mul(0.001).add(0.0001);
    w = q.to(at::kFloat) * s.to(at::kFloat);
    return Tensors{{lin + ".weight", q.to(at::kChar)}, {lin + ".weight_scale", s}};
  });
  expect_loads(tmp / "ct8", want, 14);
}

// Each rule of the issue: qzeros inconsistent with the group size, g_idx out of range, qweight not
// matching in/out, unknown bits, unsupported quant_method / version: an error naming the file, the
// tensor (or key) and the rule; nothing loads.
TEST(HfQuantizedIn, BadInputIsAnErrorNamingFileTensorAndRule) {
  qf::testing::TmpDir tmp("qf_quant_bad");
  const auto dir = tmp / "d";
  const std::string lin = "model.layers.1.mlp.down_proj";  // [64, 128]
  auto damaged = [&](const std::function<void(Tensors&)>& edit, const nlohmann::json& quant = gptq_config(4, 32, true, false, "gptq")) {
    GptqPacker p;
    write_dir(dir, quant, p);
    return damaged_load_error(dir, edit);
  };
  const auto replace = &replace_tensor;
  const auto has = &expect_has;
  // qzeros shaped for group 64 while the config says 32
  auto e = damaged([&](Tensors& ts) { replace(ts, lin + ".qzeros", at::zeros({2, 8}, at::kInt)); });
  has(e, {"model.safetensors", lin + ".qzeros' has shape [2, 8]", "inconsistent with the group size",
          "group_size 32 over in_features 128 gives 4 groups", "[4, 8]"});
  // scales likewise
  e = damaged([&](Tensors& ts) { replace(ts, lin + ".scales", at::zeros({2, 64}, at::kHalf)); });
  has(e, {lin + ".scales' has shape [2, 64]", "inconsistent with the group size"});
  // g_idx out of range
  e = damaged([&](Tensors& ts) {
    auto g = at::arange(128, at::kInt).div(32, "floor").to(at::kInt);
    g[7] = 9;
    replace(ts, lin + ".g_idx", g);
  });
  has(e, {"model.safetensors", lin + ".g_idx' has entries in [0, 9], outside [0, 4)"});
  // qweight not matching in/out (a transposed layout)
  e = damaged([&](Tensors& ts) { replace(ts, lin + ".qweight", at::zeros({64, 16}, at::kInt)); });
  has(e, {lin + ".qweight' has shape [64, 16]", "[in*bits/32, out] for the linear's in 128, out 64", "[16, 64]"});
  // a missing part, a wrong dtype
  e = damaged([&](Tensors& ts) { ts.erase(std::remove_if(ts.begin(), ts.end(), [&](auto& p) { return p.first == lin + ".scales"; }), ts.end()); });
  has(e, {lin + ".scales' is missing", "qweight, qzeros, scales and g_idx"});
  e = damaged([&](Tensors& ts) { replace(ts, lin + ".qweight", at::zeros({16, 64}, at::kFloat)); });
  has(e, {lin + ".qweight' has dtype F32, expected I32"});
  // GPTQ's layout under an AWQ config: qweight is [in/8, out], AWQ GEMM's [in, out/8]
  e = damaged([](Tensors&) {}, {{"quant_method", "awq"}, {"version", "gemm"}, {"bits", 4}, {"group_size", 32}});
  has(e, {"model.layers.0.mlp.down_proj.qweight' has shape [16, 64]", "AWQ GEMM packs 8 4-bit codes per int32 along the output", "[128, 8]"});

  // config rules: unknown bits, unsupported quant_method / version / checkpoint_format
  auto config_error = [&](const nlohmann::json& quant) {
    fs::ensure_dir(dir);
    fs::write_atomic(dir + "/config.json", config(quant).dump());
    try {
      read_hf_checkpoint(dir);
    } catch (const qf::InputError& err) {
      return std::string(err.what());
    }
    return std::string("(accepted)");
  };
  has(config_error(gptq_config(5, 32, true, false, "gptq")),
      {"config.json: quantization_config: 'bits' is 5", "2-, 3-, 4- or 8-bit codes"});
  has(config_error({{"quant_method", "awq"}, {"version", "gemv"}, {"bits", 4}, {"group_size", 32}}),
      {"config.json: quantization_config: 'version' is 'gemv'", "AWQ GEMM"});
  has(config_error({{"quant_method", "awq"}, {"version", "gemm"}, {"bits", 8}, {"group_size", 32}}),
      {"'bits' is 8; AWQ GEMM packs 4-bit codes only"});
  has(config_error({{"quant_method", "hqq"}, {"nbits", 4}}),
      {"'quant_method' is 'hqq', which qforge does not read", "gptq", "awq", "compressed-tensors", "bitsandbytes 4-bit"});
  has(config_error(gptq_config(4, 32, true, false, "marlin")), {"'checkpoint_format' is 'marlin'"});
  has(config_error(gptq_config(4, 0, true, false, "gptq")), {"'group_size' is 0"});
  auto fp8 = [](const nlohmann::json& weights, const char* format = "float-quantized") {
    return nlohmann::json{{"quant_method", "compressed-tensors"}, {"format", format},
                          {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", weights}}}}}};
  };
  has(config_error(fp8({{"num_bits", 4}, {"type", "float"}, {"strategy", "channel"}})),
      {"'num_bits' is 4; float-quantized is read for 8-bit (fp8 e4m3) weights"});
  has(config_error(fp8({{"num_bits", 8}, {"type", "float"}, {"strategy", "group"}, {"group_size", 32}})),
      {"'strategy' is 'group'", "tensor, channel or block"});
  has(config_error(fp8({{"num_bits", 8}, {"type", "float"}, {"strategy", "block"}})),
      {"weights: 'block_structure' must be [rows, cols]"});
  has(config_error(fp8({{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}}, "pack-quantized")),
      {"'format' is 'pack-quantized' but the weights are type 'float'"});
  has(config_error(fp8({{"num_bits", 8}, {"type", "float"}, {"strategy", "channel"}, {"symmetric", false}})),
      {"'symmetric' is false; fp8 weights are read symmetric"});
}

// compressed-tensors float-quantized: fp8 e4m3 codes times a float32 scale per tensor, output row or
// block (32x48 tiles: partial at the 64/128-wide edges), with dynamic input activations recorded and
// a static input_scale read and left unused; then each fp8 rule broken.
TEST(HfQuantizedIn, CompressedTensorsFp8DirectoriesLoadDequantized) {
  qf::testing::TmpDir tmp("qf_ct_fp8_in");
  auto cfg = [](const nlohmann::json& weights, bool acts) {
    nlohmann::json g = {{"targets", {"Linear"}}, {"weights", weights}, {"format", "float-quantized"}};
    if (acts) g["input_activations"] = {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", true}};
    return nlohmann::json{{"quant_method", "compressed-tensors"}, {"format", "float-quantized"},
                          {"config_groups", {{"group_0", g}}}, {"ignore", {"lm_head"}}};
  };
  auto packer = [](const std::string& strategy) {
    return [strategy](const std::string& lin, int64_t out, int64_t in, at::Tensor& w) {
      auto q = at::randn({out, in}).mul(50).clamp(-448, 448).to(at::kFloat8_e4m3fn);
      at::Tensor s, full;
      if (strategy == "tensor") {
        s = at::rand({1}).mul(0.01).add(0.001);
        full = s;
      } else if (strategy == "channel") {
        s = at::rand({out, 1}).mul(0.01).add(0.001);
        full = s;
      } else {  // 32x48 blocks
        s = at::rand({(out + 31) / 32, (in + 47) / 48}).mul(0.01).add(0.001);
        full = s.repeat_interleave(32, 0).repeat_interleave(48, 1).slice(0, 0, out).slice(1, 0, in);
      }
      w = q.to(at::kFloat) * full;
      return Tensors{{lin + ".weight", q}, {lin + ".weight_scale", s}, {lin + ".input_scale", at::full({1}, 0.02f)}};
    };
  };
  for (const std::string strategy : {"tensor", "channel", "block"}) {
    SCOPED_TRACE(strategy);
    nlohmann::json weights = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"strategy", strategy}};
    if (strategy == "block") weights["block_structure"] = {32, 48};
    const auto dir = tmp / strategy;
    auto want = write_dir(dir, cfg(weights, strategy != "tensor"), packer(strategy));
    expect_loads(dir, want, 14);
    auto ck = read_hf_checkpoint(dir);
    const std::string d = ck.quant.describe();
    EXPECT_NE(d.find("float-quantized fp8-e4m3 per " + (strategy == "block" ? std::string("block 32x48") : strategy)),
              std::string::npos) << d;
    EXPECT_EQ(d.find("input activations fp8 dynamic per-token: not applied") != std::string::npos, strategy != "tensor") << d;
  }

  const std::string lin = "model.layers.1.mlp.down_proj";  // [64, 128]
  auto damaged = [&](const std::string& strategy, const std::function<void(Tensors&)>& edit) {
    nlohmann::json weights = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"strategy", strategy}};
    if (strategy == "block") weights["block_structure"] = {32, 48};
    const auto dir = tmp / "bad";
    write_dir(dir, cfg(weights, false), packer(strategy));
    return damaged_load_error(dir, edit);
  };
  const auto replace = &replace_tensor;
  const auto has = &expect_has;
  has(damaged("channel", [&](Tensors& ts) { replace(ts, lin + ".weight", at::zeros({64, 128}).to(at::kFloat8_e5m2)); }),
      {"model.safetensors", lin + ".weight' has dtype F8_E5M2, expected F8_E4M3"});
  has(damaged("channel", [&](Tensors& ts) { replace(ts, lin + ".weight_scale", at::ones({1, 64})); }),
      {lin + ".weight_scale' has shape [1, 64]", "strategy channel gives [out, 1]", "[64, 1]"});
  has(damaged("block", [&](Tensors& ts) { replace(ts, lin + ".weight_scale", at::ones({2, 2})); }),
      {lin + ".weight_scale' has shape [2, 2]", "strategy block 32x48 over [64, 128]", "[2, 3]"});
  has(damaged("tensor", [&](Tensors& ts) { replace(ts, lin + ".weight_scale", at::ones({64, 1})); }),
      {lin + ".weight_scale' has shape [64, 1]", "strategy tensor gives [1]"});
  has(damaged("tensor", [&](Tensors& ts) { ts.emplace_back(lin + ".weight_zero_point", at::zeros({1})); }),
      {lin + ".weight_zero_point' is set, but fp8 weights are symmetric"});
}

// peft.base packed keeps int codes that tile a word: GPTQ int3 and compressed-tensors fp8 are a
// ConfigError naming the layer; GPTQ int2 is kept and dequantizes as the dequantized load does.
TEST(HfQuantizedIn, PackedBaseKeepsInt2AndRefusesInt3AndFp8ByName) {
  auto message = [](const HfQuant& q, const std::map<std::string, at::Tensor>& parts) {
    try {
      PackedIntLinear::from_checkpoint(q, "model.layers.0.mlp.up_proj", 64, 64, parts, at::Tensor());
    } catch (const qf::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("(kept)");
  };
  HfQuant g3;
  g3.method = HfQuantMethod::Gptq;
  g3.bits = 3;
  g3.group_size = 32;
  const std::string e3 = message(g3, {});
  EXPECT_NE(e3.find("layer model.layers.0.mlp.up_proj is stored as GPTQ int3, which packed does not keep"), std::string::npos) << e3;
  HfQuant ct;
  ct.method = HfQuantMethod::CompressedTensors;
  const std::string e8 = message(ct, {{"weight", at::zeros({64, 64}).to(at::kFloat8_e4m3fn)}});
  EXPECT_NE(e8.find("is stored as compressed-tensors fp8 (float8_e4m3fn), which packed does not keep"), std::string::npos) << e8;

  HfQuant g2 = g3;
  g2.bits = 2;
  g2.symmetric = false;
  QuantizedParts where;
  std::map<std::string, at::Tensor> parts;
  at::Tensor want;
  for (auto& [name, t] : GptqPacker{2, 32, false, true}("model.layers.0.mlp.up_proj", 64, 64, want)) {
    const std::string part = name.substr(name.rfind('.') + 1);
    parts[part] = t;
    where[part] = QuantizedPart{"mem", {}};
  }
  auto m = PackedIntLinear::from_checkpoint(g2, "model.layers.0.mlp.up_proj", 64, 64, parts, at::Tensor());
  EXPECT_EQ(m->bits, 2);
  EXPECT_TRUE(at::equal(m->materialize(at::kFloat), want));
  EXPECT_TRUE(at::equal(dequantize_linear(g2, "model.layers.0.mlp.up_proj", 64, 64, where, parts), want));
}

// ---- bitsandbytes 4-bit (transformers' save of a load_in_4bit model) ----
namespace {

nlohmann::json bnb_config(const std::string& type, bool dq) {
  return {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true},           {"load_in_8bit", false},
          {"bnb_4bit_quant_type", type},    {"bnb_4bit_use_double_quant", dq}, {"bnb_4bit_quant_storage", "uint8"},
          {"bnb_4bit_compute_dtype", "float32"}};
}

// Random 4-bit codes, block scales (or their 8-bit codes + nested scales + offset), and the JSON
// quant_state, as bitsandbytes' QuantState.as_dict(packed=True) names them. The weight they decode to
// is computed here element by element: code[q] * scale in fp32 (scale = map[a] * nested + offset),
// then rounded to the quant_state dtype.
struct BnbPacker {
  std::string type = "nf4";
  bool dq = true;
  int64_t block = 64, nested_block = 256;
  std::string dtype = "float32";
  Tensors operator()(const std::string& lin, int64_t out, int64_t in, at::Tensor& w) const {
    static const float nf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                                  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                                  0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                                  0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
    const float fp4raw[16] = {0, 0.0625f, 8, 12, 4, 6, 2, 3, 0, -0.0625f, -8, -12, -4, -6, -2, -3};
    const int64_t n = out * in, nblocks = (n + block - 1) / block, nn = (nblocks + nested_block - 1) / nested_block;
    auto u = at::randint(0, 16, {n}, at::kLong);
    auto bytes = (u.slice(0, 0, n, 2) * 16 + u.slice(0, 1, n, 2)).to(at::kByte).reshape({n / 2, 1});
    auto map = at::linspace(-1.0, 1.0, 256, at::kFloat);  // any 8-bit code the file carries
    auto a = at::randint(0, 256, {nblocks}, at::kLong);
    auto nab = (at::rand({nn}) * 0.05 + 0.01).to(at::kFloat);
    auto absmax = (at::rand({nblocks}) * 0.05 + 0.01).to(at::kFloat);
    const float offset = 0.0375f;
    std::vector<float> scale(nblocks);
    for (int64_t b = 0; b < nblocks; ++b) {
      if (!dq) { scale[b] = absmax[b].item<float>(); continue; }
      volatile float prod = map[a[b].item<int64_t>()].item<float>() * nab[b / nested_block].item<float>();
      scale[b] = prod + offset;
    }
    auto wf = at::empty({n}, at::kFloat);
    auto* up = u.data_ptr<int64_t>();
    auto* wp = wf.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      volatile float twelve = 12.0f;
      const float c = type == "nf4" ? nf4[up[i]] : fp4raw[up[i]] / twelve;
      wp[i] = c * scale[i / block];
    }
    const auto dt = dtype == "bfloat16" ? at::kBFloat16 : dtype == "float16" ? at::kHalf : at::kFloat;
    w = wf.to(dt).to(at::kFloat).reshape({out, in});
    nlohmann::json qs = {{"quant_type", type}, {"blocksize", block}, {"dtype", dtype}, {"shape", {out, in}}};
    if (dq) qs.update({{"nested_blocksize", nested_block}, {"nested_dtype", "float32"}, {"nested_offset", offset}});
    const std::string js = qs.dump();
    auto blob = at::empty({static_cast<int64_t>(js.size())}, at::kByte);
    std::memcpy(blob.data_ptr<uint8_t>(), js.data(), js.size());
    auto code = at::zeros({16}, at::kFloat);  // bitsandbytes reads the code by quant_type, not this tensor
    Tensors ts{{lin + ".weight", bytes},
               {lin + ".weight.absmax", dq ? a.to(at::kByte) : absmax},
               {lin + ".weight.quant_map", code},
               {lin + ".weight.quant_state.bitsandbytes__" + type, blob}};
    if (dq) {
      ts.emplace_back(lin + ".weight.nested_absmax", nab);
      ts.emplace_back(lin + ".weight.nested_quant_map", map);
    }
    return ts;
  }
};

}  // namespace

TEST(HfQuantizedIn, BitsandbytesFourBitDirectoriesLoadDequantized) {
  qf::testing::TmpDir tmp("qf_bnb_in");
  struct Case {
    const char* name;
    BnbPacker p;
  };
  for (auto& c : {Case{"nf4_dq", {"nf4", true, 64, 256, "float32"}}, Case{"nf4", {"nf4", false, 64, 256, "float32"}},
                  Case{"fp4_dq", {"fp4", true, 64, 256, "float32"}}, Case{"fp4_b128", {"fp4", false, 128, 256, "float32"}},
                  Case{"nf4_dq_nested64_bf16", {"nf4", true, 32, 64, "bfloat16"}},
                  Case{"fp4_dq_fp16", {"fp4", true, 64, 256, "float16"}}}) {
    SCOPED_TRACE(c.name);
    const auto dir = tmp / c.name;
    auto want = write_dir(dir, bnb_config(c.p.type, c.p.dq), c.p);
    expect_loads(dir, want, 14);
    auto ck = read_hf_checkpoint(dir);
    EXPECT_EQ(ck.quant.describe(), std::string("bitsandbytes 4-bit ") + c.p.type + (c.p.dq ? " double quant" : ""));
  }
}

TEST(HfQuantizedIn, BitsandbytesBadInputIsAnErrorNamingFileTensorAndRule) {
  qf::testing::TmpDir tmp("qf_bnb_bad");
  const auto dir = tmp / "d";
  const std::string lin = "model.layers.1.mlp.down_proj";  // [64, 128]
  auto damaged = [&](const std::function<void(Tensors&)>& edit) {
    BnbPacker p;
    write_dir(dir, bnb_config("nf4", true), p);
    return damaged_load_error(dir, edit);
  };
  const auto replace = &replace_tensor;
  auto blob = [](const nlohmann::json& j) {
    const std::string s = j.dump();
    auto b = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
    std::memcpy(b.data_ptr<uint8_t>(), s.data(), s.size());
    return b;
  };
  const auto has = &expect_has;
  const std::string qs = lin + ".weight.quant_state.bitsandbytes__nf4";
  nlohmann::json good = {{"quant_type", "nf4"}, {"blocksize", 64},        {"dtype", "float32"},
                         {"shape", {64, 128}},   {"nested_blocksize", 256}, {"nested_offset", 0.01}};
  // quant_state shape vs the linear
  auto j = good;
  j["shape"] = {128, 64};
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }),
      {"model.safetensors", qs, "quant_state 'shape' is [128,64] but the linear is [64, 128]"});
  // packed bytes vs the shape
  has(damaged([&](Tensors& ts) { replace(ts, lin + ".weight", at::zeros({4000, 1}, at::kByte)); }),
      {lin + ".weight' holds 4000 bytes", "packs 2 4-bit codes per byte", "4096"});
  // a block size bitsandbytes does not have
  j = good;
  j["blocksize"] = 48;
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }), {qs, "'blocksize' is 48", "32, 64, ..., 4096"});
  // absmax count vs the block size
  j = good;
  j["blocksize"] = 128;
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }),
      {lin + ".weight.absmax' has 128 block scales", "blocksize 128 over 8192 values gives ceil(8192/128) = 64"});
  // nested absmax count vs nested_blocksize
  j = good;
  j["nested_blocksize"] = 64;
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }),
      {lin + ".weight.nested_absmax' has 1 scales", "nested_blocksize 64 over 128 block scales gives 2"});
  // missing absmax: every missing part named, before anything loads
  has(damaged([&](Tensors& ts) {
        ts.erase(std::remove_if(ts.begin(), ts.end(), [&](auto& t) { return t.first == lin + ".weight.absmax"; }), ts.end());
      }),
      {lin + ".weight.absmax' is missing", "bitsandbytes 4-bit stores"});
  // not JSON, a quant_type the key does not name, a missing key
  has(damaged([&](Tensors& ts) { replace(ts, qs, at::full({5}, 120, at::kByte)); }), {qs, "is not the JSON object"});
  j = good;
  j["quant_type"] = "fp4";
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }), {qs, "'fp4' but the tensor's key names another type"});
  j = good;
  j.erase("nested_offset");
  has(damaged([&](Tensors& ts) { replace(ts, qs, blob(j)); }), {qs, "'nested_offset' is missing"});
  // 4-bit tensors under a load_in_8bit (LLM.int8) config: named per linear; 8-bit configs qforge does not
  // read and a non-uint8 quant storage are refused at config.json
  BnbPacker p;
  auto q8 = bnb_config("nf4", true);
  q8["load_in_4bit"] = false;
  q8["load_in_8bit"] = true;
  write_dir(dir, q8, p);
  has(load_error(dir), {".weight.", "is a bitsandbytes 4-bit part (load_in_4bit), but config.json's quantization_config "
                                    "says load_in_8bit"});
  auto both = bnb_config("nf4", true);
  both["load_in_8bit"] = true;
  write_dir(dir, both, p);
  has(load_error(dir), {"'load_in_8bit' is true and so is 'load_in_4bit'"});
  q8["llm_int8_has_fp16_weight"] = true;
  write_dir(dir, q8, p);
  has(load_error(dir), {"'llm_int8_has_fp16_weight' is true"});
  auto qst = bnb_config("nf4", true);
  qst["bnb_4bit_quant_storage"] = "bfloat16";
  write_dir(dir, qst, p);
  has(load_error(dir), {"'bnb_4bit_quant_storage' is 'bfloat16'"});
}
