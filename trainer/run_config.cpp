#include "trainer/run_config.h"

#include <filesystem>

#include "core/fs.h"
#include "core/gguf_file.h"
#include "core/log.h"

namespace qf::trainer {

HfTokenizerFile hf_dir_tokenizer(const std::string& dir, const std::string& type) {
  if (gguf_in::is_gguf_file(dir))  // a GGUF file carries its own vocabulary (data/gguf_tokenizer.h)
    return type.empty() || type == "gguf" ? HfTokenizerFile{"gguf", dir} : HfTokenizerFile{};
  const bool spm_ok = type.empty() || type == "sentencepiece", hf_ok = type.empty() || type == "huggingface";
  if (spm_ok && std::filesystem::exists(dir + "/tokenizer.model")) return {"sentencepiece", dir + "/tokenizer.model"};
  if (hf_ok && std::filesystem::exists(dir + "/tokenizer.json")) return {"huggingface", dir + "/tokenizer.json"};
  return {};
}

namespace {

// model.from without tokenizer.path: the checkpoint's own tokenizer (tokenizer.model as
// sentencepiece, else tokenizer.json as huggingface; an explicit tokenizer.type picks its file).
// A key of a map node, or a null node (never a yaml-cpp zombie, which throws when asked its type).
YAML::Node at(const YAML::Node& n, const char* key) {
  if (!n.IsDefined() || !n.IsMap()) return YAML::Node();
  for (auto it = n.begin(); it != n.end(); ++it)
    if (it->first.IsScalar() && it->first.Scalar() == key) return it->second;
  return YAML::Node();
}

YAML::Node with_checkpoint_tokenizer(const YAML::Node& root) {
  const YAML::Node from = at(at(root, "model"), "from"), tok = at(root, "tokenizer");
  if (!from.IsScalar() || from.Scalar().empty()) return root;
  if (!tok.IsNull() && !tok.IsMap()) return root;  // its own error
  const YAML::Node enabled = at(at(tok, "train"), "enabled");
  if (!at(tok, "path").IsNull() || (enabled.IsScalar() && enabled.Scalar() == "true")) return root;
  const YAML::Node type = at(tok, "type");
  const auto f = hf_dir_tokenizer(from.Scalar(), type.IsScalar() ? type.Scalar() : "");
  if (f.path.empty()) return root;  // tokenizer.path's own error says what is missing
  YAML::Node out = YAML::Clone(root);
  out["tokenizer"]["type"] = f.type;
  out["tokenizer"]["path"] = f.path;
  log::info("tokenizer: ", f.path, " (", f.type, ", the model.from checkpoint's own)");
  return out;
}

}  // namespace

RunSection RunSection::from_config(cfg::Reader& r) {
  RunSection s;
  s.name = r.str("name", s.name);
  s.out_dir = r.str("out_dir", "runs/" + s.name);
  if (s.out_dir.empty()) r.fail("out_dir", "must not be empty");
  s.seed = r.i64("seed", s.seed, 0, INT64_MAX);
  s.threads = r.i64("threads", s.threads, 0, 1024);
  s.init_from = r.path("init_from", "", true);
  r.finish();
  return s;
}

RunConfig parse_run_config(const YAML::Node& given, const std::string& source) {
  const YAML::Node root = with_checkpoint_tokenizer(given);
  RunConfig c;
  c.source = source;
  cfg::Problems problems;
  c.resolved = YAML::Node(YAML::NodeType::Map);
  cfg::Reader top(root, "", &problems, c.resolved);
  {
    auto r = top.child("run");
    c.run = RunSection::from_config(r);
  }
  auto mr = top.child("model");
  c.model = models::ModelConfig::from_config(mr);
  {
    auto r = top.child("tokenizer");
    c.tokenizer = data::TokenizerConfig::from_config(r);
  }
  auto dr = top.child("data");
  c.data = data::DataConfig::from_config(dr);
  {
    auto r = top.child("trainer");
    c.trainer = TrainerConfig::from_config(r);
  }
  {
    auto r = top.child("quant");
    c.quant = quant::QatConfig::from_config(r);
  }
  auto pr = top.child("peft");
  c.peft = peft::LoraConfig::from_config(pr);
  {
    auto r = top.child("sample");
    c.sample_prompts = r.strings("prompts", {});
    c.sample = models::SamplingConfig::from_config(r);
  }
  auto dsr = top.child("dist");
  c.dist = DistConfig::from_config(dsr);
  auto er = top.child("eval");
  c.eval = EvalConfig::from_config(er);
  auto kr = top.child("distill");
  c.distill = DistillConfig::from_config(kr);
  if (!c.eval.gate.against.empty() && !(c.quant.enabled && c.quant.convert_at_end))
    er.fail("gate.against", "compares the converted model with the reference at the end of training, but this run "
                            "does not convert (quant.rules with quant.convert_at_end: true); drop it and run "
                            "`qforge eval RUN --against REF` instead");
  if (!c.eval.gate.against.empty() && c.data.val_fraction <= 0)
    er.fail("gate.against", "compares on the validation split, which data.val_fraction: 0 leaves empty");
  // Cross-component consistency.
  if (c.data.seq_len > c.model.max_seq_len)
    dr.fail("seq_len", std::to_string(c.data.seq_len) + " exceeds model.max_seq_len " +
                           std::to_string(c.model.max_seq_len) + " (the model's maximum positions)");
  if (c.peft.enabled && c.peft.exact_merge && !c.quant.enabled && c.peft.base != peft::BaseFormat::Blocks)
    pr.fail("exact_merge", "needs fake-quant layers to merge into (quant.rules) or a llama.cpp-blocks base (peft.base: "
                           "q4_k, ...); without them every merge is exact");
  if (c.peft.enabled && c.quant.enabled && c.peft.base != peft::BaseFormat::Fp32)
    pr.fail("base", std::string(peft::base_format_name(c.peft.base)) +
                        " storage cannot be combined with quant rules (QAT + LoRA trains on an fp32 fake-quant base)");
  // ZeRO gathers and shards AdamW's fp32 moments; AdamW8bit's blockwise codes are not sharded.
  if (c.dist.zero > 0 && c.trainer.optim.name == OptimName::AdamW8bit)
    dsr.fail("zero", std::to_string(c.dist.zero) +
                         " shards AdamW state, which trainer.optim.name: adamw8bit does not support; use dist.zero: 0 "
                         "(8-bit state is already ~4x smaller) or trainer.optim.name: adamw");
  top.finish();
  problems.throw_if_any();
  return c;
}

DistConfig DistConfig::from_config(cfg::Reader& r) {
  DistConfig d;
  using dist::BackendKind;
  d.backend = r.choice<BackendKind>("backend", d.backend,
                                    {{"auto", BackendKind::Auto}, {"gloo", BackendKind::Gloo}, {"nccl", BackendKind::Nccl}});
  d.timeout_s = r.f64("timeout_s", d.timeout_s, 1.0, 86400.0);
  d.zero = r.i64("zero", d.zero, 0, 2);
  d.bucket_mb = r.f64("bucket_mb", d.bucket_mb, 0.0, 4096.0);
  d.first_bucket_mb = r.f64("first_bucket_mb", d.first_bucket_mb, 0.0, 4096.0);
  d.overlap = r.boolean("overlap", d.overlap);
  r.finish();
  return d;
}

RunConfig load_run_config(const std::string& file, const std::vector<std::string>& overrides) {
  return parse_run_config(cfg::load_yaml(file, overrides), file);
}

std::string RunConfig::hash() const { return fs::hex64(fs::fnv1a64(cfg::dump(resolved))); }

}  // namespace qf::trainer
