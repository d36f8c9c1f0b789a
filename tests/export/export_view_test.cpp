// Exporters leave the caller's model as it was: GGUF, GPTQ, compressed-tensors, AWQ and HF exports of
// QAT, QAT + LoRA (exact-merge and plain) and float + LoRA models change no parameter, buffer or
// module type, a second export gives the same bytes, and the bytes equal what exporting the model
// after peft::merge_lora + quant::convert (the old mutate-then-export path) gives.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <typeinfo>

#include "data/tokenizer.h"
#include "export/awq_export.h"
#include "export/gguf_export.h"
#include "export/hf_export.h"
#include "export/int_export.h"
#include "models/transformer.h"
#include "peft/lora.h"
#include "quant/qat.h"
#include "tests/export/fake_tokenizer.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

using namespace qf;

namespace {

using qf::testing::FakeTokenizer;

enum class Lora { None, Plain, Exact };

quant::QatConfig qat(const std::string& preset, const std::string& pattern, bool embedding) {
  quant::QatConfig q;
  q.enabled = true;
  quant::QuantRule r;
  r.pattern = pattern;
  r.weight = quant::QuantSpec::preset_named(preset);
  q.rules.push_back(r);
  if (embedding) q.embedding = quant::QuantSpec::preset_named("q8_0");
  return q;
}

// A tiny Llama: fake quant by `preset` on the linears `pattern` selects ("" = none), LoRA on every
// linear but lm_head with non-zero B. The same arguments give the same model.
std::shared_ptr<models::CausalLM> make_model(const std::string& preset, const std::string& pattern, Lora lora,
                                             bool embedding = false) {
  at::manual_seed(11);
  auto m = models::build_model(qf::testing::tiny_llama());
  m->init_weights(11);
  if (!pattern.empty()) quant::prepare(*m, qat(preset, pattern, embedding));
  if (lora != Lora::None) {
    peft::LoraConfig c;
    c.enabled = true;
    c.r = 4;
    c.alpha = 8;
    c.exact_merge = lora == Lora::Exact;
    peft::apply_lora(*m, c, "lm_head");
    at::NoGradGuard ng;
    auto g = at::detail::createCPUGenerator(9);
    for (auto& [n, l] : peft::lora_layers(*m)) l->lora_B->weight.copy_(at::randn(l->lora_B->weight.sizes(), g) * 0.2);
  }
  m->eval();
  return m;
}

// Everything an export could change: each parameter's and buffer's values, dtype and identity, and
// each module's type, by name.
struct Snapshot {
  std::map<std::string, at::Tensor> values;
  std::map<std::string, const void*> storage;
  std::map<std::string, std::string> types;
};
Snapshot snapshot(torch::nn::Module& m) {
  Snapshot s;
  for (auto& p : m.named_parameters()) {
    s.values["p:" + p.key()] = p.value().detach().clone();
    s.storage["p:" + p.key()] = p.value().unsafeGetTensorImpl();
  }
  for (auto& b : m.named_buffers()) {
    s.values["b:" + b.key()] = b.value().clone();
    s.storage["b:" + b.key()] = b.value().unsafeGetTensorImpl();
  }
  for (auto& c : m.named_modules()) s.types[c.key()] = typeid(*c.value()).name();
  return s;
}
void expect_same(const Snapshot& a, const Snapshot& b, const std::string& what) {
  EXPECT_EQ(a.types, b.types) << what << ": module types changed";
  EXPECT_EQ(a.storage, b.storage) << what << ": parameters or buffers were replaced";
  ASSERT_EQ(a.values.size(), b.values.size()) << what;
  for (auto& [k, v] : a.values) {
    auto it = b.values.find(k);
    ASSERT_NE(it, b.values.end()) << what << ": " << k << " is gone";
    EXPECT_EQ(v.scalar_type(), it->second.scalar_type()) << what << ": " << k;
    EXPECT_TRUE(at::equal(v, it->second)) << what << ": " << k << " changed";
  }
}

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}
// A file, or every file of a directory: relative path -> bytes.
std::map<std::string, std::string> contents(const std::string& out) {
  std::map<std::string, std::string> r;
  if (!std::filesystem::is_directory(out)) {
    r[""] = read_file(out);
    return r;
  }
  for (auto& e : std::filesystem::recursive_directory_iterator(out))
    if (e.is_regular_file()) r[std::filesystem::relative(e.path(), out).string()] = read_file(e.path().string());
  return r;
}

enum class Format { Gguf, Gptq, Compressed, Awq, Hf };
const char* format_name(Format f) {
  return f == Format::Gguf ? "gguf" : f == Format::Gptq ? "gptq" : f == Format::Compressed ? "compressed-tensors"
         : f == Format::Awq ? "awq" : "hf";
}

void export_as(Format f, models::CausalLM& m, const data::Tokenizer& tok, const std::string& out, const std::string& quant) {
  switch (f) {
    case Format::Gguf: exporter::export_gguf(m, tok, out, quant, "tiny", /*progress=*/false); break;
    case Format::Gptq: exporter::export_int(m, tok, out, exporter::IntFormat::Gptq, quant); break;
    case Format::Compressed: exporter::export_int(m, tok, out, exporter::IntFormat::CompressedTensors, quant); break;
    case Format::Awq: exporter::export_awq(m, tok, out, quant); break;
    case Format::Hf: exporter::export_hf(m, tok, out, at::kFloat, int64_t{1} << 40); break;
  }
}

struct Case {
  std::string label, preset, pattern;
  Lora lora;
  bool embedding;
  std::vector<Format> formats;
  std::string gguf_quant = "f32", int_quant = "int4-g32";  // --quant of each layout
  const std::string& quant(Format f) const { return f == Format::Gguf ? gguf_quant : int_quant; }
};

void check(const Case& c) {
  SCOPED_TRACE(c.label);
  qf::testing::TmpDir dir("qf_export_view");
  FakeTokenizer tok(dir / "tok.model", 64);
  for (Format f : c.formats) {
    SCOPED_TRACE(format_name(f));
    const std::string ext = f == Format::Gguf ? ".gguf" : "";
    auto m = make_model(c.preset, c.pattern, c.lora, c.embedding);
    const auto before = snapshot(*m);
    export_as(f, *m, tok, dir / (std::string(format_name(f)) + "_1" + ext), c.quant(f));
    expect_same(before, snapshot(*m), "after the first export");
    export_as(f, *m, tok, dir / (std::string(format_name(f)) + "_2" + ext), c.quant(f));
    expect_same(before, snapshot(*m), "after the second export");
    const auto first = contents(dir / (std::string(format_name(f)) + "_1" + ext));
    EXPECT_EQ(first, contents(dir / (std::string(format_name(f)) + "_2" + ext))) << "a second export differs";
    // The old path: the model merged (and, for the quantized layouts, converted) in place first.
    auto old = make_model(c.preset, c.pattern, c.lora, c.embedding);
    peft::merge_lora(*old);
    if (f != Format::Hf) quant::convert(*old);
    export_as(f, *old, tok, dir / (std::string(format_name(f)) + "_old" + ext), c.quant(f));
    const auto want = contents(dir / (std::string(format_name(f)) + "_old" + ext));
    ASSERT_EQ(first.size(), want.size());
    for (auto& [name, bytes] : want) {
      auto it = first.find(name);
      ASSERT_NE(it, first.end()) << name;
      EXPECT_TRUE(it->second == bytes) << name << " differs from the merge + convert + export bytes";
    }
  }
}

const std::vector<Format> kGguf{Format::Gguf, Format::Hf};
const std::vector<Format> kInt{Format::Gptq, Format::Compressed, Format::Hf};

}  // namespace

TEST(ExportView, QatModelIsUnchangedAndExportsAsConverted) {
  check({"q4_0 qat + q8_0 embedding", "q4_0", "model.layers.*", Lora::None, true, kGguf});
  check({"int4-g32 qat", "int4-g32", "model.layers.*", Lora::None, false, kInt});
  check({"int4-g16 qat (fp16 scales)", "int4-g16", "model.layers.*", Lora::None, false, {Format::Awq}, "f32", "int4-g16"});
}

TEST(ExportView, QatLoraModelIsUnchangedAndExportsAsMergedThenConverted) {
  for (Lora l : {Lora::Exact, Lora::Plain}) {
    // MLP fake-quantized, attention float: LoRA on fake-quant and on dense bases in one model.
    check({l == Lora::Exact ? "q4_0 + exact lora" : "q4_0 + lora", "q4_0", "model.layers.*.mlp.*", l, false, kGguf});
    check({l == Lora::Exact ? "int8 + exact lora" : "int8 + lora", "int8-per-channel", "model.layers.*.mlp.*", l,
           false, kInt, "f32", "int8-per-channel"});
    check({l == Lora::Exact ? "int4-g16 + exact lora" : "int4-g16 + lora", "int4-g16", "model.layers.*.mlp.*", l,
           false, {Format::Awq}, "f32", "int4-g16"});
  }
}

TEST(ExportView, FloatLoraModelIsUnchangedAndExportsAsMerged) {
  check({"float + lora", "", "", Lora::Plain, false, {Format::Gguf, Format::Gptq, Format::Compressed, Format::Awq, Format::Hf},
         "q8_0", "int4-g32"});
}

