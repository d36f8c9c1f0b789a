// `export --format gguf --float-tensors exact|mixture` of a model that holds packed llama.cpp blocks
// (tiny Llama, dim 64, q4_0 QAT converted on every decoder linear but layer 1's MLP):
//  - mixture: the packed linears' bytes are the exact export's; token_embd is quantize(table, Q4_0),
//    output quantize(W, Q8_0) (q4_0's Q6_K falls back: 256 does not divide 64, counted), the float
//    linears quantize(W, Q4_0); norms stay F32; file_type = LLAMA_FTYPE_MOSTLY_Q4_0;
//  - exact (the default): those float tensors F32; --imatrix refused naming --float-tensors mixture;
//  - packed linears of another type than the mixture's are written as they are and counted;
//  - parse_float_tensors names the flag and its choices.
// (tests/interop/test_gguf_float_tensors.py checks the files against llama_model_quantize and llama.cpp.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "core/gguf_file.h"
#include "export/gguf_export.h"
#include "models/transformer.h"
#include "quant/ggml_blocks.h"
#include "quant/ggml_more.h"
#include "quant/ggml_types.h"
#include "quant/qat.h"
#include "tests/export/fake_tokenizer.h"
#include "tests/export/gguf_test_file.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;
using exporter::FloatTensors;

namespace {

std::shared_ptr<models::CausalLM> packed_model() {
  at::manual_seed(6);
  auto m = models::build_model(qf::testing::tiny_llama());
  m->init_weights(6);
  quant::QatConfig q;
  q.enabled = true;
  for (const char* p : {"model.layers.0.*", "model.layers.1.self_attn.*"}) {
    quant::QuantRule r;
    r.pattern = p;
    r.weight = quant::QuantSpec::preset_named("q4_0");
    q.rules.push_back(r);
  }
  quant::prepare(*m, q);
  quant::convert(*m);
  m->eval();
  return m;
}

std::shared_ptr<gguf_in::File> open(const std::string& path) { return qf::testing::open_gguf(path); }

at::Tensor bytes_of(const gguf_in::File& f, const std::string& name) { return qf::testing::gguf_tensor_bytes(f, name); }

uint32_t id(quant::Rule r) { return quant::ggml::traits(r).gguf_id; }

at::Tensor param(models::CausalLM& m, const std::string& n) {
  for (auto& p : m.named_parameters())
    if (p.key() == n) return p.value().detach();
  ADD_FAILURE() << "no parameter " << n;
  return {};
}

}  // namespace

TEST(GgufFloatTensors, MixtureQuantizesTheFloatTensorsAndKeepsThePackedBytes) {
  qf::testing::TmpDir dir("qf_float_tensors");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = packed_model();
  auto ex = exporter::export_gguf(*m, tok, dir / "exact.gguf", "q4_0", "tiny", false);
  EXPECT_TRUE(ex.exact);
  EXPECT_FALSE(ex.float_mixture);
  auto r = exporter::export_gguf(*m, tok, dir / "mix.gguf", "q4_0", "tiny", false, "", false, "", FloatTensors::Mixture);
  EXPECT_TRUE(r.exact && r.float_mixture);
  EXPECT_EQ(r.n_off_mixture, 0);
  EXPECT_EQ(r.n_fallback, 1);  // output: Q6_K -> Q8_0
  auto fe = open(dir / "exact.gguf"), fm = open(dir / "mix.gguf");
  EXPECT_EQ(fm->get_int("general.file_type"), 2);
  ASSERT_EQ(fe->tensors().size(), fm->tensors().size());
  at::NoGradGuard ng;
  const auto q4 = quant::Rule::GgmlQ4_0, q8 = quant::Rule::GgmlQ8_0;
  const auto table = param(*m, "model.embed_tokens.weight"), head = param(*m, "lm_head.weight");
  EXPECT_EQ(fe->tensor("token_embd.weight")->type, 0u);
  EXPECT_EQ(fm->tensor("token_embd.weight")->type, id(q4));
  EXPECT_TRUE(at::equal(bytes_of(*fm, "token_embd.weight"), quant::ggml::quantize(table, q4).reshape({-1})));
  EXPECT_EQ(fe->tensor("output.weight")->type, 0u);
  EXPECT_EQ(fm->tensor("output.weight")->type, id(q8));
  EXPECT_TRUE(at::equal(bytes_of(*fm, "output.weight"), quant::ggml::quantize(head, q8).reshape({-1})));
  for (const char* n : {"gate_proj", "up_proj", "down_proj"}) {  // layer 1's MLP: float in the model
    const std::string g = std::string("blk.1.ffn_") + (n[0] == 'g' ? "gate" : n[0] == 'u' ? "up" : "down") + ".weight";
    const auto w = param(*m, std::string("model.layers.1.mlp.") + n + ".weight");
    EXPECT_EQ(fe->tensor(g)->type, 0u) << g;
    EXPECT_EQ(fm->tensor(g)->type, id(q4)) << g;
    EXPECT_TRUE(at::equal(bytes_of(*fm, g), quant::ggml::quantize(w, q4).reshape({-1}))) << g;
  }
  int64_t n_packed = 0;
  for (const auto& t : fe->tensors()) {
    if (t.name.find("norm") != std::string::npos) {
      EXPECT_EQ(fm->tensor(t.name)->type, 0u) << t.name;  // 1-D: F32
      EXPECT_TRUE(at::equal(bytes_of(*fm, t.name), bytes_of(*fe, t.name))) << t.name;
    }
    if (t.type != id(q4)) continue;
    ++n_packed;
    EXPECT_EQ(fm->tensor(t.name)->type, t.type) << t.name;
    EXPECT_TRUE(at::equal(bytes_of(*fm, t.name), bytes_of(*fe, t.name))) << t.name;
  }
  EXPECT_EQ(n_packed, 11);  // 7 + 4 packed linears
}

TEST(GgufFloatTensors, OffMixturePackedTensorsAreCountedAndImatrixNeedsMixture) {
  qf::testing::TmpDir dir("qf_float_tensors");
  qf::testing::FakeTokenizer tok(dir / "tok.model", 64);
  auto m = packed_model();
  // q8_0 picks Q8_0 for every linear: the 11 packed Q4_0 linears are written as they are and counted
  auto r = exporter::export_gguf(*m, tok, dir / "q8.gguf", "q8_0", "tiny", false, "", false, "", FloatTensors::Mixture);
  EXPECT_EQ(r.n_off_mixture, 11);
  auto f = open(dir / "q8.gguf");
  EXPECT_EQ(f->tensor("blk.0.attn_q.weight")->type, id(quant::Rule::GgmlQ4_0));
  EXPECT_EQ(f->tensor("token_embd.weight")->type, id(quant::Rule::GgmlQ8_0));
  try {
    exporter::export_gguf(*m, tok, dir / "x.gguf", "q4_0", "tiny", false, "", false, dir / "im.gguf");
    FAIL() << "--imatrix on a packed model without --float-tensors mixture was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("add --float-tensors mixture"), std::string::npos) << e.what();
  }
  EXPECT_EQ(exporter::parse_float_tensors("exact"), FloatTensors::Exact);
  EXPECT_EQ(exporter::parse_float_tensors("mixture"), FloatTensors::Mixture);
  EXPECT_STREQ(exporter::to_string(FloatTensors::Mixture), "mixture");
  try {
    exporter::parse_float_tensors("f32");
    FAIL() << "a bad --float-tensors value was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("--float-tensors 'f32' is not one of exact, mixture"), std::string::npos)
        << e.what();
  }
}
