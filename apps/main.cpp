// qforge CLI: argument wiring only; the work lives in trainer/, models/, data/.
#include <CLI/CLI.hpp>
#include <malloc.h>

#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <cstdio>
#include <iostream>
#include <optional>

#include "apps/embedded_config.h"
#include "core/config.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "core/threads.h"
#include "data/text_stream.h"
#include "data/utf8.h"
#include "models/arch.h"
#include "models/generate.h"
#include "quant/qat.h"
#include "export/gguf_export.h"
#include "export/awq_export.h"
#include "export/bnb8_export.h"
#include "export/hf_export.h"
#include "export/int_export.h"
#include "export/onnx_export.h"
#include "models/hf.h"
#include "peft/adapter.h"
#include "quant/ptq.h"
#include "trainer/checkpoint.h"
#include "trainer/dist/launch.h"
#include "trainer/quality_gate.h"
#include "trainer/imatrix.h"
#include "trainer/quantize.h"
#include "trainer/tasks.h"
#include "trainer/trainer.h"

using namespace qf;

namespace {

using trainer::is_hf_dir;
using trainer::load_hf_dir;

trainer::RunConfig resolve_config(const std::string& file, const std::vector<std::string>& overrides) {
  if (file.empty()) {
    YAML::Node root;
    try {
      root = YAML::Load(kEmbeddedDefaultConfig);
    } catch (const YAML::Exception& e) {
      throw Error(str("embedded default config is malformed: ", e.what()));
    }
    cfg::Problems p;
    for (auto& o : overrides) cfg::apply_override(root, o, &p);
    p.throw_if_any();
    return trainer::parse_run_config(root, "<embedded default: " + std::string(kEmbeddedDefaultName) + ">");
  }
  return trainer::load_run_config(file, overrides);
}

int cmd_train(const std::string& file, const std::vector<std::string>& overrides, bool print_config) {
  auto cfg = resolve_config(file, overrides);
  if (print_config) {
    std::cout << "# resolved config (from " << cfg.source << ")\n" << cfg::dump(cfg.resolved);
    return 0;
  }
  trainer::Trainer t(cfg);
  t.setup();
  auto r = t.train();
  t.cleanup();
  if (!t.is_rank0()) return 0;  // data parallel: rank 0 reports
  std::printf("\n== run '%s' finished: steps %lld -> %lld, %.0f tokens/s ==\n", cfg.run.name.c_str(),
              (long long)r.start_step, (long long)r.end_step, r.tokens_per_s);
  std::printf("%-28s %12s %12s\n", "validation", "loss", "perplexity");
  if (r.val_before >= 0) std::printf("%-28s %12.4f %12.2f\n", "before training", r.val_before, std::exp(r.val_before));
  if (r.val_after >= 0)
    std::printf("%-28s %12.4f %12.2f\n", cfg.quant.enabled ? "after training (fake quant)" : "after training", r.val_after,
                std::exp(r.val_after));
  if (r.val_converted >= 0)
    std::printf("%-28s %12.4f %12.2f\n", "converted (packed weights)", r.val_converted, std::exp(r.val_converted));
  std::printf("weights: %lld bytes%s\n", (long long)r.model_bytes, r.converted.empty() ? "" : " (packed)");
  std::printf("training memory: weights %.2f MB + gradients %.2f MB + AdamW state %.2f MB; peak RSS %.0f MiB\n",
              r.train_weight_bytes / 1e6, r.grad_bytes / 1e6, r.optim_bytes / 1e6, r.peak_rss_bytes / 1048576.0);
  if (!r.converted.empty()) std::printf("converted: %s\n", r.converted.c_str());
  if (r.val_merged >= 0)
    std::printf("%-28s %12.4f %12.2f\n", "merged (LoRA folded in)", r.val_merged, std::exp(r.val_merged));
  if (!r.adapter.empty()) std::printf("adapter (PEFT): %s\n", r.adapter.c_str());
  if (!r.merged.empty()) std::printf("merged: %s\n", r.merged.c_str());
  std::printf("checkpoint: %s\n", r.checkpoint.c_str());
  if (!r.gate_report.empty())
    std::printf("\n== quality gate: converted model vs %s ==\n%s", cfg.eval.gate.against.c_str(), r.gate_report.c_str());
  for (auto& p : cfg.sample_prompts) {
    auto ids32 = t.tokenizer().encode(p);
    std::vector<int64_t> ids;
    if (t.tokenizer().bos_id() >= 0 && cfg.data.add_bos) ids.push_back(t.tokenizer().bos_id());
    ids.insert(ids.end(), ids32.begin(), ids32.end());
    auto out = models::generate(t.model(), ids, cfg.sample, t.tokenizer().eos_id());
    std::vector<int32_t> o32(ids32.begin(), ids32.end());
    o32.insert(o32.end(), out.begin(), out.end());
    std::printf("\n--- sample (temperature %.2f, top-k %lld, top-p %.2f) ---\n%s\n", cfg.sample.temperature,
                (long long)cfg.sample.top_k, cfg.sample.top_p, t.tokenizer().decode(o32).c_str());
  }
  std::fflush(stdout);
  if (!r.gate_missed.empty()) throw trainer::QualityGateError(r.gate_missed);
  return 0;
}

// eval --task: a benchmark task scored as lm-evaluation-harness scores it (trainer/tasks.h).
int cmd_eval_task(const std::string& run, const std::vector<std::string>& overrides, const trainer::tasks::Options& o) {
  trainer::tasks::check_options(o);  // a bad task file is named before any model is read
  auto lr = trainer::load_model(run, overrides);
  trainer::set_threads(lr.cfg.run.threads);
  const trainer::tasks::Encoder enc{lr.tok.get(), lr.cfg.data.add_bos};
  auto r = trainer::tasks::run(*lr.model, enc, lr.model->cfg.max_seq_len, lr.cfg.trainer.batch_size, o);
  std::printf("checkpoint %s (%s model)\n%s", lr.checkpoint.c_str(), lr.format.c_str(), trainer::tasks::summary(r).c_str());
  return 0;
}

// The windows `qforge eval` scores for a loaded model: the run's --split, another recipe's data
// section (--data-from) or all of --text, in windows no longer than the model's context.
data::Dataset eval_dataset(const trainer::LoadedRun& lr, const std::string& text, const std::string& data_from) {
  auto dcfg = lr.cfg.data;
  if (!data_from.empty()) {
    // Another recipe's data section (same split rules), e.g. a domain's held-out text for a base model.
    auto other = trainer::load_run_config(data_from, {"run.init_from="});
    const bool add_bos = dcfg.add_bos;
    dcfg = other.data;
    if (lr.hf_dir) dcfg.add_bos = add_bos;  // BOS as the checkpoint's tokenizer adds it
  }
  if (!text.empty()) {
    data::SourceConfig s;
    s.path = text;
    dcfg.sources = {s};
    dcfg.val_fraction = 0.0;
  }
  if (dcfg.seq_len > lr.model->cfg.max_seq_len) {
    log::info("eval: windows of ", lr.model->cfg.max_seq_len, " tokens (the model's context) instead of data.seq_len ",
              dcfg.seq_len);
    dcfg.seq_len = lr.model->cfg.max_seq_len;
  }
  return data::build_dataset(dcfg, *lr.tok);
}

void check_eval_data(const std::string& run, const std::string& text, const std::string& data_from) {
  QF_CHECK_INPUT(!is_hf_dir(run) || !text.empty() || !data_from.empty(), "eval: ", run,
                 " is a Hugging Face checkpoint dir, which names no data; give --text FILE|DIR (all of it is "
                 "scored), --data-from RECIPE.yaml (its data: section's --split) or --task FILE|NAME");
}

int cmd_eval(const std::string& run, const std::vector<std::string>& overrides, const std::string& split,
             int64_t max_batches, const std::string& text, const std::string& data_from, const std::string& save_tokens) {
  check_eval_data(run, text, data_from);
  auto lr = trainer::load_model(run, overrides);
  trainer::set_threads(lr.cfg.run.threads);
  auto ds = eval_dataset(lr, text, data_from);
  const auto& set = (!text.empty() || split == "train") ? ds.train : ds.val;
  if (!save_tokens.empty()) {
    // The exact windows evaluated (what another runtime must score to compare perplexities).
    auto n = max_batches > 0 ? std::min<int64_t>(set.size(), max_batches * lr.cfg.trainer.batch_size) : set.size();
    st::save(save_tokens, {{"tokens", set.tokens.slice(0, 0, n)}, {"loss_mask", set.loss_mask.slice(0, 0, n)}});
  }
  auto dev = lr.model->parameters().front().device();
  auto e = trainer::evaluate_model(*lr.model, set, lr.cfg.trainer.batch_size, max_batches, dev,
                                   lr.cfg.trainer.precision == trainer::Precision::BF16);
  const long long bytes = (long long)quant::model_bytes(*lr.model);
  std::printf("checkpoint %s (%s model, %lld bytes of weights)\nsplit %s: %lld tokens, loss %.4f, perplexity %.3f\n",
              lr.checkpoint.c_str(), lr.format.c_str(), bytes,
              text.empty() ? (split + (data_from.empty() ? "" : " of " + data_from)).c_str() : text.c_str(),
              (long long)e.tokens, e.loss, e.ppl);
  std::printf("{\"loss\": %.6f, \"ppl\": %.6f, \"tokens\": %lld, \"model_bytes\": %lld, \"format\": \"%s\"}\n", e.loss,
              e.ppl, (long long)e.tokens, bytes, lr.format.c_str());
  return 0;
}

// eval --against: llama.cpp's KL-divergence scoreboard of the model vs a reference on the same
// windows (trainer/quality_gate.h); the run's eval.gate, with --max-* flags over it, decides the exit code.
int cmd_eval_against(const std::string& run, const std::vector<std::string>& overrides, const std::string& against,
                     const std::string& split, int64_t max_batches, const std::string& text, const std::string& data_from,
                     const std::string& save_tokens, const trainer::GateConfig& flags, const std::string& samples_out) {
  check_eval_data(run, text, data_from);
  auto lr = trainer::load_model(run, overrides);
  trainer::set_threads(lr.cfg.run.threads);
  auto ref = trainer::load_model(against, {});
  trainer::check_same_vocabulary(*lr.tok, *ref.tok, run, against);
  auto gate = lr.cfg.eval.gate;
  for (auto [dst, src] : {std::pair{&gate.max_kld, &flags.max_kld}, {&gate.max_kld_p99, &flags.max_kld_p99},
                          {&gate.min_same_top, &flags.min_same_top}, {&gate.max_rms_dp, &flags.max_rms_dp},
                          {&gate.max_ppl_ratio, &flags.max_ppl_ratio}})
    if (*src) *dst = *src;
  auto ds = eval_dataset(lr, text, data_from);
  const auto& set = (!text.empty() || split == "train") ? ds.train : ds.val;
  if (!save_tokens.empty()) {
    auto n = max_batches > 0 ? std::min<int64_t>(set.size(), max_batches * lr.cfg.trainer.batch_size) : set.size();
    st::save(save_tokens, {{"tokens", set.tokens.slice(0, 0, n)}, {"loss_mask", set.loss_mask.slice(0, 0, n)}});
  }
  auto dev = lr.model->parameters().front().device();
  ref.model->to(dev);
  auto sb = trainer::compare_models(*ref.model, *lr.model, set, lr.cfg.trainer.batch_size, max_batches, dev,
                                    lr.cfg.trainer.precision == trainer::Precision::BF16, !samples_out.empty());
  if (!samples_out.empty()) fs::write_atomic(samples_out, trainer::tokens_jsonl(sb));
  const auto st = trainer::statistics(sb);
  const auto missed = trainer::missed_gates(gate, st);
  std::printf("model     %s (%s model)\nreference %s (%s model)\nsplit %s\n\n%s", lr.checkpoint.c_str(), lr.format.c_str(),
              ref.checkpoint.c_str(), ref.format.c_str(),
              text.empty() ? (split + (data_from.empty() ? "" : " of " + data_from)).c_str() : text.c_str(),
              trainer::report(st, gate).c_str());
  auto j = st.to_json();
  j["format"] = lr.format;
  j["ref_format"] = ref.format;
  j["gate_missed"] = missed;
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
  if (!missed.empty()) throw trainer::QualityGateError(missed);
  return 0;
}

int cmd_export(const std::string& run, const std::vector<std::string>& overrides, const std::string& format,
               const std::string& out, const std::string& dtype, double shard_mb, const std::string& quant,
               const std::string& fallback, bool force, const std::string& imatrix, const std::string& float_tensors) {
  // The output is checked before any weight is read: an existing one (unless --force), and always
  // anything inside a checkpoint dir or belonging to the source.
  exporter::check_out(out, run, force);
  QF_CHECK_INPUT(fallback.empty() || format == "gguf" || format == "gptq" || format == "compressed-tensors" ||
                     format == "awq" || format == "onnx",
                 "export: --fallback applies to --format gguf, gptq, compressed-tensors, awq and onnx (quantized layouts)");
  QF_CHECK_INPUT(imatrix.empty() || format == "gguf", "export: --imatrix applies to --format gguf (llama.cpp's types)");
  QF_CHECK_INPUT(float_tensors.empty() || format == "gguf", "export: --float-tensors (exact|mixture) applies to --format "
                 "gguf, not ", format);
  const auto ft = exporter::parse_float_tensors(float_tensors.empty() ? "exact" : float_tensors);
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<models::CausalLM> model;
  std::shared_ptr<data::Tokenizer> tok;
  std::string what, name, base_name;
  std::optional<trainer::RunConfig> run_cfg;
  if (is_hf_dir(run)) {
    // A Hugging Face checkpoint: weights mapped in their stored dtype, tokenizer from the same dir.
    QF_CHECK_INPUT(overrides.empty(), "export: key=value overrides apply to qforge runs, not to the Hugging Face dir ", run);
    // Export reads each weight once: pages come in per tensor and are released after it is written.
    model = load_hf_dir(run, "auto", nullptr, /*populate=*/false);
    tok = data::load_tokenizer_dir(run);
    what = run + " (Hugging Face checkpoint)";
    name = std::filesystem::path(run).filename().string();
  } else {
    auto lr = trainer::load_run(run, overrides);
    trainer::set_threads(lr.cfg.run.threads);
    lr.model->to(at::kCPU);
    model = lr.model;
    tok = std::move(lr.tok);
    what = lr.checkpoint + " (" + lr.format + " model)";
    name = lr.cfg.run.name;
    base_name = trainer::adapter_base_name(lr.model_from, lr.init_from, name);
    run_cfg = lr.cfg;
  }
  if (format == "peft") {
    // The LoRA adapters alone, in PEFT's directory layout (what <run>/adapter/ holds after training).
    QF_CHECK_INPUT(run_cfg && run_cfg->peft.enabled, "export: --format peft needs a LoRA/QLoRA run (peft: section); ",
                   run, " has no adapters");
    exporter::write_staged_dir(out, force, [&](const std::string& tmp) {
      peft::save_adapter(*model, run_cfg->peft, tmp, base_name, models::arch_spec(run_cfg->model.family).has_conv1d());
      return 0;
    });
    std::printf("exported %s to %s: PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) on %s\n",
                what.c_str(), out.c_str(), base_name.c_str());
    return 0;
  }
  if (format == "gptq" || format == "compressed-tensors") {
    const auto f = format == "gptq" ? exporter::IntFormat::Gptq : exporter::IntFormat::CompressedTensors;
    auto r = exporter::export_int(*model, *tok, out, f, quant == "f16" ? "int4-g128" : quant, fallback, force);
    std::printf("exported %s to %s: %s, %lld quantized linears (%lld with their trained codes, the rest RTN %s), "
                "%.2f MB, re-read and decoded%s\n",
                what.c_str(), r.dir.c_str(), format.c_str(), (long long)r.n_quantized, (long long)r.n_exact,
                (quant == "f16" ? "int4-g128" : quant).c_str(), r.bytes / 1e6,
                r.n_fallback ? str("; ", r.n_fallback, " linears in --fallback ", fallback).c_str() : "");
    return 0;
  }
  if (format == "awq") {
    const std::string q = quant == "f16" ? "int4-g128" : quant;
    auto r = exporter::export_awq(*model, *tok, out, q, fallback, force);
    std::printf("exported %s to %s: awq (GEMM, group %lld), %lld quantized linears (%lld with their trained codes, the "
                "rest RTN %s), %.2f MB, re-read and decoded%s\n",
                what.c_str(), r.dir.c_str(), (long long)r.group_size, (long long)r.n_quantized, (long long)r.n_exact,
                q.c_str(), r.bytes / 1e6, r.n_fallback ? str("; ", r.n_fallback, " linears kept in float").c_str() : "");
    return 0;
  }
  if (format == "bnb-int8") {
    // llm_int8_threshold: the run's own (peft.base int8) or a bitsandbytes 8-bit dir's, else Linear8bitLt's 6.0.
    double thr = run_cfg && run_cfg->peft.enabled && run_cfg->peft.base == peft::BaseFormat::Int8
                     ? run_cfg->peft.int8_threshold : 6.0;
    if (!run_cfg) {
      const auto q = models::read_hf_checkpoint(run).quant;
      if (q.method == models::HfQuantMethod::Bnb8) thr = q.bnb_int8_threshold;
    }
    const auto t = dtype == "fp32" ? at::kFloat : dtype == "bf16" ? at::kBFloat16 : at::kHalf;
    auto r = exporter::export_bnb8(*model, *tok, out, t, thr, force);
    std::printf("exported %s to %s: bitsandbytes 8-bit (LLM.int8, llm_int8_threshold %g), %lld int8 linears (%lld int8 "
                "bases with their own bytes, the rest quantized as Int8Params), %.2f MB (%s), re-read and decoded\n",
                what.c_str(), r.dir.c_str(), thr, (long long)r.n_int8, (long long)r.n_kept, r.bytes / 1e6,
                dtype.empty() ? "fp16" : dtype.c_str());
    return 0;
  }
  if (format == "onnx") {
    auto r = exporter::export_onnx(*model, *tok, out, dtype.empty() ? "fp32" : dtype, fallback, force);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("exported %s to %s: ONNX (opset 21, KV cache, Optimum's input/output names), %lld nodes, %lld "
                "MatMulNBits + %lld QDQ + %lld float linears%s, %.2f MB in %.2f s\n",
                what.c_str(), r.dir.c_str(), (long long)r.n_nodes, (long long)r.n_matmul_nbits, (long long)r.n_qdq,
                (long long)r.n_float, r.n_fallback ? str(" (", r.n_fallback, " by --fallback ", fallback, ")").c_str() : "",
                r.bytes / 1e6, s);
    return 0;
  }
  if (format == "gguf-lora") {
    auto r = exporter::export_gguf_lora(*model, *tok, out, quant, name, !log::quiet(), force);
    std::printf("exported %s to %s: base.gguf (the LoRA bases, %lld tensors, %.2f MB, --quant %s%s) + adapter.gguf (%lld "
                "llama.cpp LoRA adapters, alpha %g, %.2f MB), re-read and verified\n",
                what.c_str(), r.dir.c_str(), (long long)r.base.n_tensors, r.base.bytes / 1e6, quant.c_str(),
                r.base.exact ? ", packed blocks exact" : "", (long long)r.n_adapters, r.alpha, r.adapter_bytes / 1e6);
    return 0;
  }
  if (format == "gguf") {
    auto r = exporter::export_gguf(*model, *tok, out, quant, name, !log::quiet(), fallback, force, imatrix, ft);
    for (auto& row : r.rows) log::info("  ", row);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("exported %s to %s: GGUF v3, %lld tensors, %.2f MB (--quant %s%s%s), re-read and verified in %.2f s\n",
                what.c_str(), r.path.c_str(), (long long)r.n_tensors, r.bytes / 1e6, quant.c_str(),
                r.float_mixture ? ", packed blocks exact, float tensors as the mixture" : r.exact ? ", packed blocks exact" : "",
                ((r.n_fallback ? str(", ", r.n_fallback, " shape fallbacks") : std::string()) +
                 (r.n_imatrix ? str(", ", r.n_imatrix, " with importance weights") : std::string()))
                    .c_str(),
                s);
    return 0;
  }
  const auto t = dtype == "fp32" ? at::kFloat : dtype == "fp16" ? at::kHalf : at::kBFloat16;
  auto r = exporter::export_hf(*model, *tok, out, t, static_cast<int64_t>(shard_mb * 1e6), force);
  std::printf("exported %s to %s: %lld tensors, %.2f MB in %lld file%s (%s), re-read and verified\n", what.c_str(),
              r.dir.c_str(), (long long)r.n_tensors, r.bytes / 1e6, (long long)r.n_shards, r.n_shards > 1 ? "s" : "",
              dtype.empty() ? "bf16" : dtype.c_str());
  return 0;
}

// llama.cpp's importance matrix of a float model from calibration text: trainer::imatrix_run.
int cmd_imatrix(const std::string& src, const std::vector<std::string>& overrides, const trainer::ImatrixArgs& a) {
  const auto r = trainer::imatrix_run(src, overrides, a);
  std::printf("imatrix of %s: %lld weights over %lld windows x %lld tokens in %.1f s\nwritten to %s (llama.cpp's GGUF "
              "imatrix: qforge quantize/export --imatrix, or llama-quantize --imatrix)\n",
              src.c_str(), (long long)r.entries, (long long)r.chunks, (long long)r.ctx, r.seconds, r.out.c_str());
  return 0;
}

// PTQ of a float model (qforge run or Hugging Face dir) into a converted run directory that
// eval / generate / export take like a QAT run's: trainer::quantize_run does the work.
int cmd_quantize(const std::string& src, const std::vector<std::string>& overrides, const trainer::QuantizeArgs& a) {
  const auto r = trainer::quantize_run(src, overrides, a);
  std::printf("quantized %s with %s to %s: %zu linears in %.1f s; mean relative output error %.4g (round-to-nearest %.4g)\n",
              src.c_str(), quant::method_name(r.method), a.quant.c_str(), r.ptq.linears.size(), r.ptq.seconds,
              r.ptq.mean_err(), r.ptq.mean_err_rtn());
  if (r.before.tokens)
    std::printf("held-out perplexity: float %.3f -> %s %.3f (%lld tokens)\n", r.before.ppl, a.quant.c_str(), r.after.ppl,
                (long long)r.after.tokens);
  std::printf("weights: %lld bytes (packed)\nrun: %s (checkpoint %s)\n", (long long)r.model_bytes, r.out.c_str(),
              r.checkpoint.c_str());
  return 0;
}

int cmd_inspect(const std::string& path, const std::string& dtype, bool forward) {
  const auto t0 = std::chrono::steady_clock::now();
  nlohmann::json j;
  std::shared_ptr<models::CausalLM> model;
  if (is_hf_dir(path)) {
    model = load_hf_dir(path, dtype, &j);
  } else {
    auto lr = trainer::load_run(path, {});
    model = lr.model;
    j = {{"source", "qforge run"}, {"checkpoint", lr.checkpoint}, {"format", lr.format}};
  }
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto& c = model->cfg;
  j.update({{"family", c.family_name()}, {"parameters", model->num_parameters()}, {"layers", c.n_layers}, {"dim", c.dim},
            {"heads", c.n_heads}, {"kv_heads", c.kv_heads()}, {"ffn_dim", c.ffn()}, {"vocab_size", c.vocab_size},
            {"dtype", c.dtype == models::DType::BF16 ? "bf16" : "fp32"}, {"weight_bytes", quant::model_bytes(*model)},
            {"load_s", load_s}});
  if (forward) {
    at::NoGradGuard ng;
    model->eval();
    auto ids = at::arange(8, at::kLong).reshape({1, 8}).remainder(c.vocab_size);
    auto logits = model->forward(ids).to(at::kFloat);
    j["forward_logits_sum"] = logits.sum().item<double>();
    j["load_and_forward_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  j["peak_rss_mib"] = ru.ru_maxrss / 1024.0;
  if (j.value("source", "") == "gguf")  // one row per tensor: stored type, shape, what qforge does with it
    for (auto& [name, t] : j["tensors"].items())
      std::printf("%-40s %-8s %-16s %s\n", name.c_str(), t["type"].get<std::string>().c_str(), t["shape"].dump().c_str(),
                  t["qforge"].get<std::string>().c_str());
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

int cmd_generate(const std::string& run, const std::vector<std::string>& overrides, const std::string& prompt,
                 models::SamplingConfig s) {
  data::check_utf8(prompt, "--prompt");  // before the model loads: every tokenizer refuses it alike
  auto lr = trainer::load_model(run, overrides);
  trainer::set_threads(lr.cfg.run.threads);
  std::vector<int64_t> ids;
  if (lr.tok->bos_id() >= 0 && lr.cfg.data.add_bos) ids.push_back(lr.tok->bos_id());
  const auto prompt_ids = lr.tok->encode(prompt);
  ids.insert(ids.end(), prompt_ids.begin(), prompt_ids.end());
  // Streamed as tokens arrive: only whole UTF-8 code points, special tokens (EOS, BOS) left out.
  data::TextStream text(*lr.tok, prompt_ids);
  auto emit = [](const std::string& t) {
    if (t.empty()) return;
    std::fwrite(t.data(), 1, t.size(), stdout);
    std::fflush(stdout);
  };
  auto g = models::generate_ids(*lr.model, ids, s, lr.tok->eos_id(),
                                [&](int64_t id) { emit(text.push(static_cast<int32_t>(id))); });
  emit(text.finish());
  emit("\n");
  if (g.stop == models::StopReason::Context)
    log::warn("generate: stopped after ", g.ids.size(), " of the ", s.max_new_tokens, " tokens asked for (-n): the prompt (",
              ids.size(), " tokens) and the output fill the model's context of ", lr.model->cfg.max_seq_len,
              " positions (", lr.hf_dir ? "max_position_embeddings in config.json" : "model.max_seq_len",
              "); the model has no position beyond it");
  return 0;
}

// Every command's options, filled by CLI11 (one struct: the commands share run / overrides).
struct CliArgs {
  std::string config;
  std::vector<std::string> overrides;
  bool print_config = false;
  std::vector<std::string> train_args;
  std::string run, split = "val", text, data_from, save_tokens;
  trainer::tasks::Options task;
  std::string against;
  trainer::GateConfig gate;  // --max-kld etc.
  int64_t max_batches = 0;
  std::string format = "hf", out, dtype, gguf_quant = "f16", export_fallback, export_imatrix, export_float_tensors;
  double shard_mb = 5000;
  bool force = false;
  std::string inspect_dtype = "auto";
  bool inspect_forward = false;
  models::SamplingConfig s;
  std::string prompt;
  trainer::QuantizeArgs qa;
  trainer::ImatrixArgs ia;
  trainer::dist::LaunchOptions lo;
  std::vector<std::string> launch_cmd;
};

CLI::App* add_train(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("train", "Train (pretrain / fine-tune) from a YAML recipe");
  cmd->add_option("config_and_overrides", a.train_args,
                    "[CONFIG.yaml] [key.path=value ...]: the YAML recipe (default: the embedded default, " +
                        std::string(kEmbeddedDefaultName) + ") then overrides, e.g. trainer.max_steps=50 model.n_layers=4");
  cmd->add_flag("--print-config", a.print_config, "Print the resolved config (defaults filled in) and exit");
  cmd->footer("Example: qforge train configs/tiny_pretrain.yaml trainer.max_steps=50");
  return cmd;
}

CLI::App* add_eval(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("eval", "Perplexity, or a benchmark task's scores (--task), of a trained run's latest "
                                         "checkpoint or of a Hugging Face checkpoint dir");
  cmd->add_option("run", a.run,
                   "Run directory, checkpoint directory, or Hugging Face checkpoint dir (config.json + safetensors + "
                   "tokenizer.json or tokenizer.model; needs --text, --data-from or --task)")->required();
  cmd->add_option("overrides", a.overrides, "key.path=value overrides of the run's config");
  cmd->add_option("--split", a.split, "Dataset split of the run's data")->check(CLI::IsMember({"val", "train"}));
  cmd->add_option("--max-batches", a.max_batches, "Evaluate at most this many batches (0 = all)");
  cmd->add_option("--text", a.text, "Evaluate on this text/JSONL file or directory instead");
  cmd->add_option("--data-from", a.data_from,
                   "Evaluate on the --split of this recipe's data section instead (e.g. a domain recipe's held-out text)");
  auto* save = cmd->add_option("--save-tokens", a.save_tokens,
                   "Also write the evaluated token windows (safetensors: tokens, loss_mask) for another runtime to score");
  // Benchmark tasks (README "Benchmark tasks"): lm-evaluation-harness's log-likelihood scoring.
  cmd->add_option("--task", a.task.task,
                  "Score a benchmark task instead of perplexity: a JSONL file of documents ({query, choices, gold}: "
                  "cloze multiple choice; {question, choices, answer[, subject]}: MMLU; {text}: word/byte perplexity), "
                  "or NAME for NAME.jsonl in $QFORGE_TASKS or ./tasks")
      ->excludes(cmd->get_option("--text"))->excludes(cmd->get_option("--data-from"))->excludes(save)
      ->excludes(cmd->get_option("--split"))->excludes(cmd->get_option("--max-batches"));
  cmd->add_option("--num-fewshot", a.task.num_fewshot, "--task: examples before each question (the first N)")->capture_default_str();
  cmd->add_option("--fewshot-from", a.task.fewshot_from,
                  "--task: file (or NAME) the examples come from (default: the task itself, without the question's own document)");
  cmd->add_option("--limit", a.task.limit, "--task: score the first N documents only (0 = all)")->capture_default_str();
  cmd->add_option("--samples-out", a.task.samples_out,
                  "--task: write per-document log-likelihoods and predictions (JSONL); --against: per-token window, pos, "
                  "token, kld, dp, same_top, nll, nll_ref (JSONL)");
  // Deployed-quality gate (README "Quality gate"): llama.cpp's --kl-divergence statistics vs a reference.
  auto* ag = cmd->add_option("--against", a.against,
                  "Compare with a reference model (run dir, checkpoint dir or Hugging Face dir with the same tokenizer, "
                  "typically the float model this one was quantized from) on the same windows: KL divergence, same top "
                  "token, RMS Δp, perplexity ratio (llama-perplexity --kl-divergence's statistics); exit code 4 when a "
                  "gate (the run's eval.gate, or --max-*) is missed");
  ag->excludes(cmd->get_option("--task"));
  struct GateFlag {
    const char* name;
    std::optional<double>* dst;
    const char* help;
  };
  for (const auto& f : {GateFlag{"--max-kld", &a.gate.max_kld, "--against: gate on the mean KL divergence (nats/token)"},
                        GateFlag{"--max-kld-p99", &a.gate.max_kld_p99, "--against: gate on the 99th percentile KL divergence"},
                        GateFlag{"--min-same-top", &a.gate.min_same_top, "--against: gate on the same-top-token fraction (0.9 = 90%)"},
                        GateFlag{"--max-rms-dp", &a.gate.max_rms_dp, "--against: gate on RMS Δp, a fraction (0.05 = 5%)"},
                        GateFlag{"--max-ppl-ratio", &a.gate.max_ppl_ratio, "--against: gate on PPL(model)/PPL(reference)"}}) {
    auto* dst = f.dst;
    cmd->add_option_function<double>(f.name, [dst](const double& v) { *dst = v; }, f.help)
        ->check(CLI::NonNegativeNumber)->needs(ag);
  }
  cmd->footer("Example: qforge eval runs/demo/qat_int3 --task cloze.jsonl --samples-out cloze_samples.jsonl\n"
              "         qforge eval runs/demo/gptq_q4_0 --against runs/demo/ft_fp --max-kld 0.05 --min-same-top 0.9");
  return cmd;
}

CLI::App* add_export(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("export", "Write a run's model in a runtime's format (hf: a Hugging Face checkpoint dir)");
  cmd->add_option("run", a.run, "Run directory, checkpoint directory, or Hugging Face checkpoint dir (config.json + safetensors + tokenizer)")->required();
  cmd->add_option("overrides", a.overrides, "key.path=value overrides of the run's config");
  cmd->add_option("--format", a.format,
                  "Output format: hf (a Hugging Face checkpoint dir), gguf (llama.cpp), gptq (transformers via "
                  "optimum/gptqmodel), compressed-tensors (transformers / vLLM), awq (AutoAWQ GEMM: transformers / vLLM), "
                  "onnx (onnxruntime / Optimum's ORTModelForCausalLM, with a KV cache), bnb-int8 (a bitsandbytes LLM.int8 dir: "
                  "transformers loads it as load_in_8bit), peft (a LoRA run's adapters) or gguf-lora (a dir with base.gguf "
                  "= the LoRA run's bases unmerged + adapter.gguf = its adapters for llama.cpp's --lora)")
      ->check(CLI::IsMember({"hf", "gguf", "gguf-lora", "gptq", "compressed-tensors", "awq", "onnx", "bnb-int8", "peft"}))
      ->capture_default_str();
  cmd->add_option("--out", a.out,
                  "Output directory (hf, gptq, compressed-tensors, awq, onnx, bnb-int8, peft, gguf-lora; must not exist, or be empty) or .gguf file "
                  "(must not exist); never inside a run's checkpoints/ nor one of the source's own files")
      ->required();
  cmd->add_flag("--force", a.force,
                "Replace an existing --out (only once the new output is complete); checkpoints and the source's "
                "files are refused even so");
  cmd->add_option("--quant", a.gguf_quant,
                  "gguf: llama.cpp type mixture for float weights, chosen per tensor as llama-quantize does: "
                  "f32|f16|q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q2_k_s|q3_k|q3_k_s|q3_k_m|q3_k_l|q4_k|q4_k_s|q4_k_m|q5_k|q5_k_s|"
                  "q5_k_m|q6_k|iq4_nl|iq4_xs|tq1_0|tq2_0|q1_0|q2_0 (llama-quantize's names; q3_k/q4_k/q5_k/q6_k: "
                  "that type everywhere but the output; packed "
                  "QAT/PTQ layers keep their blocks); "
                  "gptq/compressed-tensors: the RTN spec for float linears, int4-g128 (default), int4-g32 or "
                  "int8-per-channel (QAT-converted layers keep their codes); awq: an int4 per-group preset, int4-g128 "
                  "(default), int4-g64, int4-g32, or with AutoAWQ's own integer zero points int4-g128-zp / "
                  "int4-g32-zp (QAT/PTQ-converted int4 layers keep their codes, zero points and fp16 scales)")
      ->capture_default_str();
  cmd->add_option("--fallback", a.export_fallback,
                  "For linears whose input width --quant's block/group does not divide (as llama-quantize falls "
                  "back): gguf: q8_0|q5_0|q5_1|q4_0|q4_1|f16|f32 instead of llama-quantize's own choice; "
                  "compressed-tensors: another preset (e.g. int4-g64) or f16 (kept in float); gptq, awq: f16 (kept in float); "
                  "onnx: f32|f16 for layers ONNX has no operator for (NF4, FP8, llama.cpp blocks, ...), dequantized");
  cmd->add_option("--imatrix", a.export_imatrix,
                  "gguf: llama.cpp importance matrix (qforge imatrix / llama-imatrix output, GGUF or legacy .dat): "
                  "float weights are quantized with it and the mixture follows llama-quantize --imatrix (a model "
                  "holding packed blocks: with --float-tensors mixture)");
  cmd->add_option("--float-tensors", a.export_float_tensors,
                  "gguf, for a model that holds packed llama.cpp blocks (QAT/PTQ): exact (default) keeps the tensors it "
                  "holds in float (token_embd, output, linears left float) F32 (F16 with --quant f16), so llama.cpp "
                  "computes qforge's model; mixture gives each the type llama-quantize's --quant mixture gives it "
                  "(e.g. q4_k_m: token_embd Q4_K, output Q6_K; shape fallbacks; norms stay F32), quantized as "
                  "llama-quantize does (with --imatrix's weights where it has the tensor): the file llama-quantize "
                  "writes from the exact one, packed blocks byte for byte. A float model is quantized by --quant either way");
  cmd->add_option("--dtype", a.dtype,
                  "Float weight dtype: hf: bf16 (default), fp16 or fp32; bnb-int8: fp16 (default), bf16 or fp32; onnx: fp32 (default) or fp16 (stored, computed in fp32)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  cmd->add_option("--shard-size-mb", a.shard_mb, "Split the safetensors above this many MB (with an index)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->footer("Example: qforge export runs/demo/qlora_domain --format hf --out /tmp/hf_model --dtype bf16");
  return cmd;
}

CLI::App* add_inspect(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("inspect", "Load a Hugging Face checkpoint dir or a run and print what it holds (JSON)");
  cmd->add_option("path", a.run, "Hugging Face checkpoint directory (config.json + safetensors) or run directory")->required();
  cmd->add_option("--dtype", a.inspect_dtype, "Model dtype for a Hugging Face checkpoint (auto: bf16 if it is stored in bf16)")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}))
      ->capture_default_str();
  cmd->add_flag("--forward", a.inspect_forward, "Also run one forward pass over 8 tokens");
  return cmd;
}

CLI::App* add_generate(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a trained run or a Hugging Face checkpoint dir (KV cache, temperature/top-k/top-p)");
  cmd->add_option("run", a.run,
                  "Run directory, checkpoint directory, or Hugging Face checkpoint dir (config.json + safetensors + "
                  "tokenizer.json or tokenizer.model)")->required();
  cmd->add_option("overrides", a.overrides, "key.path=value overrides of the run's config");
  cmd->add_option("-p,--prompt", a.prompt, "Prompt text")->required();
  cmd->add_option("-n,--max-new-tokens", a.s.max_new_tokens,
                  "Tokens to generate (at most up to the model's context; stops early at EOS)")->capture_default_str();
  cmd->add_option("-t,--temperature", a.s.temperature, "Sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a.s.top_k, "Keep the k most likely tokens; 0 = off")->capture_default_str();
  cmd->add_option("--top-p", a.s.top_p, "Nucleus sampling mass; 1 = off")->capture_default_str();
  cmd->add_option("--seed", a.s.seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("!--ignore-eos", a.s.stop_at_eos, "Keep generating after the EOS token (it is still not printed)");
  return cmd;
}

CLI::App* add_quantize(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("quantize", "Post-training quantization (RTN, GPTQ, AWQ) of a float model into a converted run");
  cmd->add_option("model", a.run, "qforge run / checkpoint directory, or Hugging Face checkpoint dir")->required();
  cmd->add_option("overrides", a.overrides, "key.path=value overrides of the run's (or --calib recipe's) config");
  cmd->add_option("--method", a.qa.method, "rtn | gptq | awq")->check(CLI::IsMember({"rtn", "gptq", "awq"}))->capture_default_str();
  cmd->add_option("--quant", a.qa.quant,
                 "Weight format for every decoder linear (a preset): q4_0 q4_1 q5_0 q5_1 q8_0 int4-g128 int4-g32 "
                 "int4-g128-asym int4-g128-zp int4-g32-zp int3-g128 int3-g128-asym int3-g128-zp int8-per-channel (awq/rtn also "
                 "q2_k q3_k q4_k q5_k q6_k iq4_nl iq4_xs tq1_0 tq2_0 q1_0 q2_0); int<b>-g<G>[-asym|-zp] in general")
      ->capture_default_str();
  cmd->add_option("--fallback", a.qa.fallback,
                 "Format for the linears whose input width --quant's group size does not divide (e.g. int4-g64)");
  cmd->add_option("--calib", a.qa.calib,
                 "Recipe whose data: section gives the calibration text (default: the run's own training text; "
                 "required for a Hugging Face dir, whose held-out split is then also scored)");
  cmd->add_option("--samples", a.qa.samples, "Calibration sequences (of data.seq_len tokens)")->capture_default_str();
  cmd->add_option("--imatrix", a.qa.imatrix,
                  "rtn into a llama.cpp type: round each decoder linear with its importance weights from this llama.cpp "
                  "imatrix file (qforge imatrix / llama-imatrix), as llama-quantize --imatrix does");
  cmd->add_option("--batch-size", a.qa.batch_size, "Calibration sequences per layer forward")->capture_default_str();
  cmd->add_option("--out", a.qa.out,
                 "Output run directory (must not exist, or be empty; never inside a run's checkpoints/ nor the source)")
      ->required();
  cmd->add_flag("--force", a.qa.force, "Replace an existing --out (only once the new run dir is complete)");
  cmd->add_option("--damp", a.qa.gptq.damp, "gptq: dampening, as a fraction of the mean Hessian diagonal")->capture_default_str();
  cmd->add_flag("--act-order", a.qa.gptq.act_order,
               "gptq: quantize columns by decreasing Hessian diagonal (desc_act; int specs keep a g_idx, which only "
               "--format gptq exports; llama.cpp blocks use static groups)");
  cmd->add_flag("--static-groups", a.qa.gptq.static_groups, "gptq: group scales from the original weights");
  cmd->add_option("--block-size", a.qa.gptq.block_size, "gptq: lazy-batch width")->capture_default_str();
  cmd->add_option("--grid", a.qa.awq.grid, "awq: scale grid points")->capture_default_str();
  cmd->add_flag("!--no-clip", a.qa.awq.clip, "awq: skip the clipping search");
  cmd->add_flag("--no-eval", a.qa.no_eval, "Skip the held-out perplexity before/after");
  cmd->add_flag("--no-stream", a.qa.no_stream,
                "A Hugging Face dir: load the whole float model first instead of one decoder layer at a time "
                "(same result, about the fp32 model's size more memory)");
  cmd->footer("Example: qforge quantize runs/demo/ft_fp --method gptq --quant q4_0 --out runs/demo/gptq_q4_0\n"
             "Then: qforge eval runs/demo/gptq_q4_0 | qforge export runs/demo/gptq_q4_0 --format gguf --out m.gguf");
  return cmd;
}

CLI::App* add_imatrix(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("imatrix", "llama.cpp's importance matrix of a float model from calibration text "
                                             "(what llama-imatrix writes and llama-quantize --imatrix reads)");
  cmd->add_option("model", a.run, "qforge run / checkpoint directory (float weights), or Hugging Face checkpoint dir")
      ->required();
  cmd->add_option("overrides", a.overrides, "key.path=value overrides of the run's config");
  cmd->add_option("--data", a.ia.data,
                  "Calibration text: a recipe whose data: section gives it (.yaml), or a text file / directory "
                  "(default: the run's own training text; required for a Hugging Face dir)");
  cmd->add_option("--out", a.ia.out, "Output file (llama.cpp's GGUF imatrix format)")->capture_default_str();
  cmd->add_option("--chunks", a.ia.chunks, "Calibration windows, evenly spread over the text's training split")
      ->capture_default_str();
  cmd->add_option("--ctx", a.ia.ctx, "Tokens per window (default: the recipe's data.seq_len; at least 16)");
  cmd->add_option("--batch-size", a.ia.batch_size, "Windows per layer forward")->capture_default_str();
  cmd->add_option("--save-tokens", a.ia.save_tokens,
                  "Also write the token windows used (safetensors: tokens) for another runtime to reproduce");
  cmd->add_flag("--force", a.ia.force, "Replace an existing --out");
  cmd->footer("Sums, per decoder linear (GGUF names blk.N.*.weight), each input column's square over all window "
              "tokens (.in_sum2) and the token count (.counts); the output head and token embedding are not "
              "collected, as llama-imatrix without --process-output.\n"
              "Example: qforge imatrix runs/demo/ft_fp --out imatrix.gguf\n"
              "Then: qforge export runs/demo/ft_fp --format gguf --quant iq4_xs --imatrix imatrix.gguf --out m.gguf");
  return cmd;
}

CLI::App* add_launch(CLI::App& app, CliArgs& a) {
  auto* cmd = app.add_subcommand("launch", "Start N data-parallel ranks of a qforge command on this node (as torchrun does)");
  cmd->add_option("--nproc-per-node", a.lo.nproc_per_node, "Processes on this node (one per GPU, or CPU ranks)")->capture_default_str();
  cmd->add_option("--nnodes", a.lo.nnodes, "Nodes in the job")->capture_default_str();
  cmd->add_option("--node-rank", a.lo.node_rank, "This node's index, 0..nnodes-1")->capture_default_str();
  cmd->add_option("--master-addr", a.lo.master_addr, "Address of node 0, reachable from every node")->capture_default_str();
  cmd->add_option("--master-port", a.lo.master_port, "Rendezvous port on node 0 (default: a free port when single-node)");
  cmd->add_option("--grace", a.lo.grace_s, "Seconds between SIGTERM and SIGKILL for the others when a rank fails")->capture_default_str();
  cmd->add_option("command", a.launch_cmd, "After --: the qforge command every rank runs, e.g. -- train recipe.yaml key=value");
  cmd->footer("Example: qforge launch --nproc-per-node 2 -- train configs/tiny_pretrain.yaml trainer.max_steps=50\n"
              "Multi-node (run on every node): qforge launch --nnodes 2 --node-rank $K --nproc-per-node 8 \\\n"
              "  --master-addr node0 --master-port 29500 -- train recipe.yaml");
  return cmd;
}

}  // namespace

int main(int argc, char** argv) {
  // Idle OpenMP workers sleep instead of spin-waiting, so a core shared with another process slows
  // a step in proportion, not 16x (bench/README.md "Threads under load"); OMP_WAIT_POLICY overrides.
  threads::ensure_passive_wait(argv);
  // Buffers under 4 MiB stay in the heap instead of being returned to the OS after every step
  // (glibc's defaults mmap/munmap them: ~40k page faults per training step on the demo model; ~13%
  // faster steps there, bench/README.md). Larger ones are mmapped and returned when freed: keeping
  // them in the heap (the old 256 MiB threshold) fragmented it, and peak RSS of a checkpointed
  // training step was 2x its live memory (1685 vs 859 MiB, README "Memory"). QFORGE_MMAP_THRESHOLD_MB
  // overrides (0 = glibc's dynamic default).
  int mmap_mb = 4;
  if (const char* h = std::getenv("QFORGE_MMAP_THRESHOLD_MB")) mmap_mb = std::atoi(h);
  if (mmap_mb > 0) {
    mallopt(M_MMAP_THRESHOLD, mmap_mb << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  CLI::App app{"qforge: train language models that survive low-bit deployment (QAT, QLoRA, export)"};
  app.require_subcommand(1);
  bool quiet = false;
  app.add_flag("-q,--quiet", quiet, "Only warnings and results");

  CliArgs a;
  auto* train = add_train(app, a);
  auto* eval = add_eval(app, a);
  auto* exp = add_export(app, a);
  auto* insp = add_inspect(app, a);
  auto* gen = add_generate(app, a);
  auto* qz = add_quantize(app, a);
  auto* imx = add_imatrix(app, a);
  auto* lau = add_launch(app, a);

  CLI11_PARSE(app, argc, argv);
  log::set_quiet(quiet);
  try {
    if (*train) {
      // The first positional is the recipe unless it is a key=value override.
      size_t i = 0;
      if (!a.train_args.empty() && a.train_args[0].find('=') == std::string::npos) a.config = a.train_args[i++];
      a.overrides.assign(a.train_args.begin() + i, a.train_args.end());
      return cmd_train(a.config, a.overrides, a.print_config);
    }
    if (*lau) {
      std::vector<std::string> cmd{argv[0]};
      cmd.insert(cmd.end(), a.launch_cmd.begin(), a.launch_cmd.end());
      if (cmd.size() == 1) cmd.clear();
      return trainer::dist::launch(a.lo, cmd);
    }
    if (*eval && !a.task.task.empty()) return cmd_eval_task(a.run, a.overrides, a.task);
    if (*eval && !a.against.empty())
      return cmd_eval_against(a.run, a.overrides, a.against, a.split, a.max_batches, a.text, a.data_from, a.save_tokens,
                              a.gate, a.task.samples_out);
    if (*eval) return cmd_eval(a.run, a.overrides, a.split, a.max_batches, a.text, a.data_from, a.save_tokens);
    if (*gen) return cmd_generate(a.run, a.overrides, a.prompt, a.s);
    if (*insp) return cmd_inspect(a.run, a.inspect_dtype, a.inspect_forward);
    if (*qz) return cmd_quantize(a.run, a.overrides, a.qa);
    if (*imx) return cmd_imatrix(a.run, a.overrides, a.ia);
    if (*exp)
      return cmd_export(a.run, a.overrides, a.format, a.out, a.dtype, a.shard_mb, a.gguf_quant, a.export_fallback, a.force,
                        a.export_imatrix, a.export_float_tensors);
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "qforge: %s\n", e.what());
    return 2;
  } catch (const trainer::QualityGateError& e) {
    std::fprintf(stderr, "qforge: %s\n", e.what());
    return trainer::kExitQualityGate;
  } catch (const trainer::DivergedError& e) {
    std::fprintf(stderr, "qforge: training diverged: %s\n", e.what());
    return 3;
  } catch (const Error& e) {
    std::fprintf(stderr, "qforge: error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "qforge: torch error: %s\n", e.what_without_backtrace());
    return 1;
  }  catch (const std::exception& e) {
    std::fprintf(stderr, "qforge: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
