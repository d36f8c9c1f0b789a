#include "trainer/quantize.h"

#include <filesystem>
#include <optional>

#include "core/config.h"
#include "core/error.h"
#include "export/hf_export.h"
#include "models/arch.h"
#include "quant/ggml_mix.h"
#include "quant/qat.h"
#include "models/hf.h"
#include "core/log.h"
#include "trainer/evaluate.h"
#include "trainer/memory_estimate.h"
#include "trainer/run_dir.h"

namespace qf::trainer {

QuantizeResult quantize_run(const std::string& src, const std::vector<std::string>& overrides, const QuantizeArgs& a) {
  // Everything that can be wrong with the request fails here, before any weight is read.
  const auto method = quant::parse_method(a.method);
  QF_CHECK_INPUT(method != quant::PtqMethod::None, "quantize: --method must be rtn, gptq or awq");
  const auto spec = quant::QuantSpec::preset_named(a.quant);
  if (method == quant::PtqMethod::Gptq) {
    auto why = quant::gptq_unsupported(spec);
    if (!why.empty()) throw ConfigError({str("--method gptq --quant ", a.quant, ": ", why)});
  }
  QF_CHECK_INPUT((spec.kind != quant::Kind::Fp8E4M3 && spec.kind != quant::Kind::Fp8E5M2) || method != quant::PtqMethod::Awq,
                 "--method awq --quant ", a.quant, ": AWQ searches integer grids; fp8 has no group scales to protect");
  QF_CHECK_INPUT(a.quant != "int8-per-token", "--quant int8-per-token is an activation format; pick a weight format");
  if (!a.imatrix.empty()) {
    QF_CHECK_INPUT(method == quant::PtqMethod::Rtn, "--imatrix weights llama-quantize's rounding: use it with --method rtn, "
                                                   "not ", a.method);
    QF_CHECK_INPUT(spec.is_ggml(), "--imatrix weights llama.cpp block types; --quant ", a.quant, " is not one");
    QF_CHECK_INPUT(std::filesystem::is_regular_file(a.imatrix), "--imatrix ", a.imatrix, ": no such file");
  }
  exporter::check_out(a.out, src, a.force);
  exporter::check_out_dir(a.out, a.force);
  const auto out = std::filesystem::absolute(a.out).lexically_normal().string();

  RunConfig cfg;
  std::shared_ptr<models::CausalLM> model;
  std::unique_ptr<data::Tokenizer> tok;
  // A Hugging Face dir streams (unless --no-stream): its decoder layers' linears stay in the mapped
  // files (models::DeferredLinear) and PTQ loads, calibrates and converts one layer at a time
  // (quant::PtqLayerHooks), so the float model is never resident whole: peak = the packed model +
  // the float embeddings/head/norms + one float layer + the calibration (and held-out) hidden states.
  // Same bytes as the whole-model path (test_families' streamed == --no-stream check).
  const bool stream = is_hf_dir(src) && !a.no_stream;
  if (is_hf_dir(src)) {
    QF_CHECK_INPUT(!a.calib.empty(), "quantize: a Hugging Face model needs --calib RECIPE.yaml, whose data: section "
                                     "supplies the calibration and held-out text (the tokenizer comes from ", src, ")");
    auto ov = hf_dir_overrides(src);
    ov.insert(ov.end(), overrides.begin(), overrides.end());
    cfg = load_run_config(a.calib, ov);
    set_threads(cfg.run.threads);
    models::LinearStreamer deferred;
    if (stream) {
      const std::string pre = models::arch_spec(models::read_hf_checkpoint(src).config.family).layers + ".";
      deferred.mapped = true;
      deferred.claims = [pre](const std::string& name) { return name.rfind(pre, 0) == 0; };
      deferred.build = [](const std::string&, const at::Tensor& w, const at::Tensor& b) {
        return std::make_shared<models::DeferredLinear>(w, b);
      };
    }
    // --no-stream: the whole model in fp32 (a bf16 checkpoint: 2x its bytes) before anything runs.
    model = load_hf_dir(src, "fp32", nullptr, /*populate=*/!stream, stream ? &deferred : nullptr);
    tok = data::load_or_train_tokenizer(cfg.tokenizer);
  } else {
    auto lr = load_run(src, overrides);
    QF_CHECK_INPUT(lr.meta.format == ModelFormat::Fp && !lr.meta.lora, "quantize: ", lr.checkpoint, " holds a ", lr.format,
                   " model; PTQ starts from float weights (a pretraining or fine-tuning run, or a Hugging Face dir)");
    cfg = lr.cfg;
    set_threads(cfg.run.threads);
    model = lr.model;
    tok = std::move(lr.tok);
    cfg.resolved["run"]["init_from"] = std::filesystem::absolute(lr.checkpoint).lexically_normal().string();
  }
  const std::string layers = models::arch_spec(model->cfg.family).layers + ".*";
  auto& q = cfg.quant;
  q.enabled = true;
  // Linears whose width the format's group does not divide: --fallback's format, or an error naming them.
  std::vector<std::pair<std::string, std::string>> rules;  // (pattern, preset)
  std::vector<std::pair<std::string, int64_t>> widths;
  for (auto& ns : models::linear_slots(model->layer(0))) widths.emplace_back(layers + "." + ns.name, ns.slot->get()->in_features);
  std::optional<quant::QuantSpec> fb;
  if (!a.fallback.empty()) fb = quant::QuantSpec::preset_named(a.fallback);
  const auto misfit = quant::width_fallbacks(widths, spec, a.quant, a.fallback, fb ? &*fb : nullptr);
  for (size_t i = 0; i < widths.size(); ++i)
    if (misfit[i]) rules.emplace_back(widths[i].first, a.fallback);
  rules.emplace_back(layers, a.quant);
  q.rules.clear();
  for (auto& [pat, preset] : rules) q.rules.push_back(quant::QuantRule{pat, quant::QuantSpec::preset_named(preset), std::nullopt});
  q.embedding.reset();
  q.init.method = method;
  q.init.calib.samples = a.samples;
  q.init.calib.batch_size = a.batch_size;
  q.init.calib.data = is_hf_dir(src) ? "" : a.calib;
  q.init.gptq = a.gptq;
  q.init.awq = a.awq;
  q.init.imatrix = a.imatrix.empty() ? "" : std::filesystem::absolute(a.imatrix).lexically_normal().string();
  auto ds = data::build_dataset(cfg.data, *tok);
  model->to(pick_device(cfg.trainer.device));
  const auto dev = model->parameters().front().device();
  const bool bf16 = cfg.trainer.precision == Precision::BF16;
  EvalResult before, after;
  const bool eval = !a.no_eval && ds.val.size() > 0;
  std::unique_ptr<LayerwiseEval> layerwise;  // streaming: the float model's held-out loss, layer by layer
  // Streaming holds the hidden states of every held-out sequence at once (fp32 [seq_len, dim] each):
  // at most min(2 GiB, a quarter of the available memory) of them; a bigger held-out split is
  // evaluated on its first batches that fit, before and after alike (logged, and in ptq_summary.json).
  const int64_t bs = cfg.trainer.batch_size;
  int64_t eval_batches = 0;  // 0: all
  if (eval && stream) {
    const int64_t per_seq = std::max<int64_t>(1, cfg.data.seq_len * model->cfg.dim * 4);
    const int64_t budget = std::min<int64_t>(int64_t{2} << 30, available_host_bytes() / 4);
    const int64_t fit = std::max<int64_t>(1, budget / per_seq / bs);  // batches
    if (ds.val.size() > fit * bs) {
      eval_batches = fit;
      log::warn("quantize: the held-out split has ", ds.val.size(), " sequences; streaming evaluates the first ",
                fit * bs, " (", fit, " batches: their hidden states are held across the layer pass), before and after "
                "alike. --no-stream evaluates all of them");
    }
    layerwise = std::make_unique<LayerwiseEval>(*model, ds.val, bs, dev, bf16, eval_batches);
  } else if (eval) {
    before = evaluate_model(*model, ds.val, bs, 0, dev, bf16);
  }

  quant::PtqLayerHooks hooks;
  if (stream) {
    const auto dtype = model->parameters().front().scalar_type();
    hooks.before = [&, dtype](int64_t i) {  // layer i's float weights in, and the held-out states through them
      for (auto& ns : models::linear_slots(model->layer(i)))
        if (auto d = std::dynamic_pointer_cast<models::DeferredLinear>(ns.slot->get())) ns.slot->replace(d->load(dtype, dev));
      if (layerwise) layerwise->advance(i);
    };
    hooks.after = [&](int64_t i, quant::PtqResult& res) { quant::convert_layer(*model, i, q, res); };
  }
  auto r = run_ptq_init(*model, cfg, *tok, ds.train, hooks);
  if (stream) {
    QF_CHECK(r.packed.empty(), "quantize: ", r.packed.size(), " GPTQ layers were not converted with their layer");
    if (layerwise) before = layerwise->finish();
    layerwise.reset();
  } else {
    quant::prepare(*model, q);
    quant::convert(*model);
    if (!r.packed.empty()) quant::apply_packed(*model, r);
  }
  if (eval) after = evaluate_model(*model, ds.val, bs, eval_batches, dev, bf16);

  // The output is a run directory: its config.yaml re-creates it with `qforge train` (PTQ as
  // quant.init, no training steps) and tells load_run how to rebuild the packed model.
  YAML::Node res = YAML::Clone(cfg.resolved);
  res["run"]["name"] = std::filesystem::path(out).filename().string();
  res["run"]["out_dir"] = out;
  res["quant"] = q.to_yaml();  // the rules, PTQ method and settings used, as `qforge train` reads them
  res["trainer"]["max_steps"] = 0;
  const std::string config_text = "# Made by: qforge quantize " + src + " --method " + a.method + " --quant " +
                                             a.quant + "\n# Re-create with: qforge train " + out +
                                             "/config.yaml (PTQ as quant.init, no training steps)\n" + cfg::dump(res);
  nlohmann::json layers_j = nlohmann::json::array();
  for (auto& l : r.linears)
    layers_j.push_back({{"name", l.name}, {"spec", l.spec}, {"err_rtn", l.err_rtn}, {"err", l.err}, {"damp", l.damp}});
  nlohmann::json summary = {{"method", quant::method_name(method)},
                            {"quant", a.quant},
                            {"imatrix", q.init.imatrix},
                            {"source", src},
                            {"calib_sequences", a.samples},
                            {"calib_tokens", r.calib_tokens},
                            {"seconds", r.seconds},
                            {"mean_err", r.mean_err()},
                            {"mean_err_rtn", r.mean_err_rtn()},
                            {"val_loss_fp", before.tokens ? before.loss : -1.0},
                            {"val_loss", after.tokens ? after.loss : -1.0},
                            {"model_bytes", quant::model_bytes(*model)},
                            {"streamed", stream},
                            {"eval_sequences", eval ? std::min(ds.val.size(), eval_batches > 0 ? eval_batches * bs : ds.val.size()) : 0},
                            {"peak_rss_bytes", peak_rss_bytes()},
                            {"linears", layers_j}};
  ModelMeta meta;
  meta.format = ModelFormat::Converted;
  meta.family = model->cfg.family_name();
  meta.vocab_size = model->cfg.vocab_size;
  meta.model_bytes = quant::model_bytes(*model);
  // Written in a temp dir beside `out` and renamed into place complete: a kill or a full disk leaves
  // no half run at `out` (and the next quantize removes the dead temp dir).
  const auto dir = write_run_dir(out, a.force, config_text, *model, meta,
                                          {{"step", 0}, {"ptq", quant::method_name(method)}},
                                          {{"ptq_summary.json", summary.dump(2) + "\n"}});
  QuantizeResult out_res;
  out_res.method = method;
  out_res.ptq = std::move(r);
  out_res.before = before;
  out_res.after = after;
  out_res.out = out;
  out_res.checkpoint = dir;
  out_res.model_bytes = meta.model_bytes;
  return out_res;
}

}  // namespace qf::trainer
