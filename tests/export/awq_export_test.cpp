// `--format awq` without the peer: every int32 word of a QAT-converted layer holds the layer's own
// codes (+ 8) in AutoAWQ's nibble order (word c of row r, bits 4i = column 8c + [0,2,4,6,1,3,5,7][i],
// read here element by element), zero points 8, fp16 scales transposed to [groups, out];
// config.json carries AutoAWQ's quantization_config; float layers RTN'd with fp16 scales; what the
// format cannot hold is refused naming the layer, leaving nothing behind.
// (tests/interop/test_awq_export.py loads the same files in transformers + autoawq.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "export/awq_export.h"
#include "models/linear.h"
#include "models/transformer.h"
#include "quant/qat.h"
#include "tests/export/fake_tokenizer.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;

namespace {

// A tiny Llama (dim 64, ffn 128) with `weight` fake-quantizing model.layers.* ({} = float), converted.
std::shared_ptr<models::CausalLM> model_with(const std::optional<quant::QuantSpec>& weight) {
  at::manual_seed(5);
  auto m = models::build_model(qf::testing::tiny_llama());
  m->init_weights(5);
  if (weight) {
    quant::QatConfig q;
    q.enabled = true;
    quant::QuantRule r;
    r.pattern = "model.layers.*";
    r.weight = *weight;
    q.rules.push_back(r);
    quant::prepare(*m, q);
    quant::convert(*m);
  }
  m->eval();
  return m;
}

quant::QuantSpec int4(int64_t group, bool sym, quant::ScaleDType sd) {
  quant::QuantSpec s;
  s.bits = 4, s.symmetric = sym, s.granularity = quant::Granularity::PerGroup, s.group_size = group, s.scale_dtype = sd;
  return s;
}

nlohmann::json read_json(const std::string& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

}  // namespace

TEST(AwqExport, WordsHoldTheLayersCodesInAwqOrder) {
  qf::testing::TmpDir dir("qf_awq");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = model_with(int4(16, true, quant::ScaleDType::F16));
  const auto r = exporter::export_awq(*m, tok, dir / "awq", "int4-g128");
  EXPECT_EQ(r.n_quantized, 14);
  EXPECT_EQ(r.n_exact, 14);
  EXPECT_EQ(r.group_size, 16);
  auto st = st::load(dir / "awq/model.safetensors");
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  int n = 0;
  for (auto& ns : models::linear_slots(*m)) {
    if (ns.name == "lm_head") continue;
    auto* ql = dynamic_cast<quant::QuantizedLinear*>(ns.slot->get().get());
    ASSERT_NE(ql, nullptr) << ns.name;
    SCOPED_TRACE(ns.name);
    const auto codes = ql->int_codes();  // [out, in] in [-8, 7]
    const int64_t out = codes.size(0), in = codes.size(1);
    auto qw = st.get(ns.name + ".qweight"), qz = st.get(ns.name + ".qzeros"), sc = st.get(ns.name + ".scales");
    ASSERT_EQ(qw.scalar_type(), at::kInt);
    ASSERT_EQ(qw.sizes(), at::IntArrayRef({in, out / 8}));
    ASSERT_EQ(qz.sizes(), at::IntArrayRef({in / 16, out / 8}));
    ASSERT_EQ(sc.scalar_type(), at::kHalf);
    ASSERT_EQ(sc.sizes(), at::IntArrayRef({in / 16, out}));
    auto w = qw.accessor<int32_t, 2>();
    auto c = codes.accessor<int32_t, 2>();
    int64_t bad = 0;
    for (int64_t row = 0; row < in; ++row)
      for (int64_t word = 0; word < out / 8; ++word)
        for (int i = 0; i < 8; ++i) {
          const uint32_t u = static_cast<uint32_t>(w[row][word]);
          bad += static_cast<int32_t>((u >> (4 * i)) & 15u) != c[word * 8 + order[i]][row] + 8;
        }
    EXPECT_EQ(bad, 0) << "nibbles that do not hold code + 8 of their column";
    EXPECT_TRUE(at::equal(qz, at::full(qz.sizes(), static_cast<int32_t>(0x88888888u), at::kInt))) << "zero points 8";
    EXPECT_TRUE(at::equal(sc, ql->scales.to(at::kHalf).t().contiguous()));
    ++n;
  }
  EXPECT_EQ(n, 14);
  const auto q = read_json(dir / "awq/config.json")["quantization_config"];
  EXPECT_EQ(q, nlohmann::json::parse(R"({"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 16,
      "zero_point": true, "backend": "autoawq", "modules_to_not_convert": ["lm_head"]})"));
  EXPECT_EQ(read_json(dir / "awq/quant_config.json")["q_group_size"], 16);
  EXPECT_FALSE(st.has("lm_head.qweight"));
  EXPECT_TRUE(st.has("lm_head.weight"));
}

// Integer-zero-point layers (int4-g16-zp, AutoAWQ's rule): the words hold the layer's own codes in
// [0, 15] (no + 8) and qzeros its own zero points, both in AWQ's nibble order; (u - z) * s is the
// layer's weight. A float model exported with --quant int4-g16-zp gets the same words as a converted one.
TEST(AwqExport, IntegerZeroPointLayersKeepTheirCodesAndZeros) {
  qf::testing::TmpDir dir("qf_awq");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = model_with(quant::QuantSpec::preset_named("int4-g16-zp"));
  const auto r = exporter::export_awq(*m, tok, dir / "awq", "int4-g128");
  EXPECT_EQ(r.n_exact, 14);
  EXPECT_EQ(r.group_size, 16);
  auto st = st::load(dir / "awq/model.safetensors");
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  auto nibble = [&](const at::Tensor& words, int64_t row, int64_t col) {
    const uint32_t u = static_cast<uint32_t>(words[row][col / 8].item<int32_t>());
    for (int i = 0; i < 8; ++i)
      if (order[i] == col % 8) return static_cast<int32_t>((u >> (4 * i)) & 15u);
    return -1;
  };
  std::set<int32_t> zs;
  for (auto& ns : models::linear_slots(*m)) {
    if (ns.name == "lm_head") continue;
    auto* ql = dynamic_cast<quant::QuantizedLinear*>(ns.slot->get().get());
    ASSERT_NE(ql, nullptr) << ns.name;
    SCOPED_TRACE(ns.name);
    const auto codes = ql->int_codes();  // [out, in] in [0, 15]
    const auto zeros = ql->zeros.to(at::kInt);
    const int64_t out = codes.size(0), in = codes.size(1);
    auto qw = st.get(ns.name + ".qweight"), qz = st.get(ns.name + ".qzeros");
    ASSERT_EQ(qz.sizes(), at::IntArrayRef({in / 16, out / 8}));
    int64_t bad = 0;
    for (int64_t o = 0; o < out; o += 3)
      for (int64_t i = 0; i < in; i += 5) bad += nibble(qw, i, o) != codes[o][i].item<int32_t>();
    for (int64_t o = 0; o < out; ++o)
      for (int64_t g = 0; g < in / 16; ++g) {
        bad += nibble(qz, g, o) != zeros[o][g].item<int32_t>();
        zs.insert(zeros[o][g].item<int32_t>());
      }
    EXPECT_EQ(bad, 0);
  }
  EXPECT_GT(zs.size(), 3u) << "varied zero points";
  // RTN of the float model with the same preset: the same words as convert's
  auto f = model_with(std::nullopt);
  exporter::export_awq(*f, tok, dir / "awq_rtn", "int4-g16-zp");
  auto st2 = st::load(dir / "awq_rtn/model.safetensors");
  for (const char* n : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"})
    for (const char* t : {".qweight", ".qzeros", ".scales"})
      EXPECT_TRUE(at::equal(st.get(std::string(n) + t), st2.get(std::string(n) + t))) << n << t;
}

TEST(AwqExport, FloatLayersAreRoundedToFp16Scales) {
  qf::testing::TmpDir dir("qf_awq");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = model_with(std::nullopt);
  // int4-g32 keeps fp32 scales as a QAT preset; in this file its groups get fp16 scales
  const auto r = exporter::export_awq(*m, tok, dir / "awq", "int4-g32");
  EXPECT_EQ(r.n_quantized, 14);
  EXPECT_EQ(r.n_exact, 0);
  EXPECT_EQ(r.group_size, 32);
  auto st = st::load(dir / "awq/model.safetensors");
  EXPECT_EQ(st.get("model.layers.1.mlp.down_proj.scales").sizes(), at::IntArrayRef({128 / 32, 64}));
}

TEST(AwqExport, RefusesWhatItCannotHoldNamingTheLayer) {
  qf::testing::TmpDir dir("qf_awq");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  struct Bad {
    std::optional<quant::QuantSpec> weight;
    std::string quant, fallback, needle;
  };
  const std::vector<Bad> bad{
      {int4(16, false, quant::ScaleDType::F16), "int4-g128", "",
       "model.layers.0.self_attn.q_proj is int4 asym per-group(16) fp16-scale; --format awq (AutoAWQ GEMM) holds an "
       "integer zero point"},
      {int4(16, false, quant::ScaleDType::F16), "int4-g128", "", "quantize/train with int4-g128-zp"},
      {quant::QuantSpec::preset_named("int3-g16-zp"), "int4-g128", "", "4-bit codes only"},
      {int4(16, true, quant::ScaleDType::F32), "int4-g128", "",
       "model.layers.0.self_attn.q_proj has scales fp16 cannot hold exactly"},
      {quant::QuantSpec::preset_named("int8-per-channel"), "int4-g128", "", "model.layers.0.self_attn.q_proj is int8"},
      {quant::QuantSpec::preset_named("q4_0"), "int4-g128", "", "not llama.cpp blocks"},
      {std::nullopt, "int8-per-channel", "", "--quant int8-per-channel is int8"},
      {std::nullopt, "int4-g32", "int4-g16", "use --fallback f16"},
  };
  for (auto& b : bad) {
    SCOPED_TRACE(b.needle);
    auto m = model_with(b.weight);
    try {
      exporter::export_awq(*m, tok, dir / "x", b.quant, b.fallback);
      ADD_FAILURE() << "not refused";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(b.needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("--format"), std::string::npos) << "names the formats that hold it: " << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(dir / "x"));
    for (auto& e : std::filesystem::directory_iterator(dir.path))
      EXPECT_EQ(e.path().filename().string().rfind("x.", 0), std::string::npos) << "left behind: " << e.path();
  }
}
