// The end of a run, on rank 0 once training and the last checkpoint are done: the PEFT adapter,
// the merged and converted models (each evaluated), and train_summary.json.
#include <sys/resource.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/fs.h"
#include "core/log.h"
#include "peft/adapter.h"
#include "quant/qat.h"
#include "trainer/data_parallel.h"
#include "trainer/quality_gate.h"
#include "trainer/run_dir.h"
#include "trainer/trainer.h"

#include "models/arch.h"

namespace qf::trainer {

// VmHWM, not getrusage's ru_maxrss: Linux carries the peak of the image exec replaced into
// ru_maxrss, so a child that Python's subprocess vfork()s and exec()s starts with the whole Python
// parent's peak (1 GB after building a checkpoint), and qforge's own OMP re-exec (core/threads) adds
// its pre-exec image. ru_maxrss only without /proc.
int64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:  123 kB"
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;
}

void Trainer::finalize(TrainResult& res, const std::function<EvalResult()>& eval) {
  const bool convert = cfg_.quant.enabled && cfg_.quant.convert_at_end;
  if (cfg_.peft.enabled) {
    if (cfg_.peft.save_adapter) {
      res.adapter = cfg_.run.out_dir + "/adapter";
      peft::save_adapter(*model_, cfg_.peft, res.adapter,
                         adapter_base_name(cfg_.model.from, cfg_.run.init_from, cfg_.run.name),
                         models::arch_spec(cfg_.model.family).has_conv1d());
      log::info("saved PEFT adapter ", res.adapter);
    }
    if (cfg_.peft.merge_at_end || convert) {
      const int64_t n = peft::merge_lora(*model_);
      log::info("merged ", n, " LoRA adapters into their base layers",
                cfg_.quant.enabled ? (cfg_.peft.exact_merge ? " (exact: the fake quantizer saw these merged weights)"
                                                            : " (not exact: training fake-quantized W, not W + s*BA)")
                                   : "");
      if (!convert) {
        res.merged = save_model_dir("merged", ModelFormat::Fp);
        if (ds_.val.size() > 0) res.val_merged = eval().loss;
      }
    }
  }
  if (convert) {
    res.converted = save_converted();
    if (ds_.val.size() > 0) {
      auto e = eval();
      res.val_converted = e.loss;
      log::info("converted model: validation loss ", e.loss, ", perplexity ", e.ppl);
    }
    const auto& gate = cfg_.eval.gate;
    if (!gate.against.empty()) {
      // The deployed-quality gate: the converted model vs the reference on the validation split.
      QF_CHECK_INPUT(ds_.val.size() > 0, "eval.gate.against: the run has no validation split to compare on "
                                         "(data.val_fraction is 0)");
      QF_CHECK_INPUT(std::filesystem::exists(gate.against), "eval.gate.against: ", gate.against, " does not exist");
      auto ref = load_model(gate.against, {});
      check_same_vocabulary(*tok_, *ref.tok, cfg_.run.name, gate.against);
      const auto dev = model_->parameters().front().device();
      ref.model->to(dev);
      const auto sb = compare_models(*ref.model, *model_, ds_.val, cfg_.trainer.batch_size, cfg_.trainer.eval_batches,
                                     dev, cfg_.trainer.precision == Precision::BF16);
      const auto st = statistics(sb);
      res.gate_report = report(st, gate);
      res.gate_missed = missed_gates(gate, st);
      res.gate_stats = st.to_json();
      res.gate_stats["against"] = gate.against;
      res.gate_stats["gate_missed"] = res.gate_missed;
      log::info("quality gate: converted model vs ", gate.against, ": mean KLD ", st.kld.value, ", same top ",
                100 * st.same_top.value, "%, RMS dp ", 100 * st.rms_dp.value, "%, PPL ratio ", st.ppl_ratio.value,
                res.gate_missed.empty() ? " (passed)" : " (MISSED)");
    }
  }
  res.model_bytes = quant::model_bytes(*model_);
  res.peak_rss_bytes = peak_rss_bytes();
  nlohmann::json j = {{"steps", res.end_step},
                      {"tokens_per_s", res.tokens_per_s},
                      {"val_loss_before", res.val_before},
                      {"val_loss_after", res.val_after},
                      {"val_loss_converted", res.val_converted},
                      {"val_loss_merged", res.val_merged},
                      {"train_weight_bytes", res.train_weight_bytes},
                      {"grad_bytes", res.grad_bytes},
                      {"optimizer_bytes", res.optim_bytes},
                      {"model_bytes", res.model_bytes},
                      {"peak_rss_bytes", res.peak_rss_bytes},
                      {"setup_peak_rss_bytes", setup_peak_rss_},
                      {"checkpoint", res.checkpoint},
                      {"converted", res.converted},
                      {"adapter", res.adapter},
                      {"merged", res.merged}};
  if (!res.gate_stats.is_null()) j["quality_gate"] = res.gate_stats;
  if (dp_->active()) {
    auto dp = dp_->summary();
    dp["step_s"] = res.tokens_per_s > 0 ? static_cast<double>(cfg_.trainer.batch_size * cfg_.trainer.grad_accum *
                                                              cfg_.data.seq_len * denv_.world_size) / res.tokens_per_s
                                        : 0.0;
    j["data_parallel"] = dp;
  }
  fs::write_atomic(cfg_.run.out_dir + "/train_summary.json", j.dump(2) + "\n");
}

std::string Trainer::save_model_dir(const std::string& sub, ModelFormat format) {
  CheckpointData d;
  d.model = model_state(*model_);
  d.state = {{"step", step_}, {"config_hash", cfg_.hash()}};
  const ModelMeta meta = model_meta(format, false, true);
  meta.write_to(d.state);
  auto path = trainer::save_checkpoint(cfg_.run.out_dir + "/" + sub, step_, d, 1);
  log::info("saved ", meta.describe(), " model ", path, " (", meta.model_bytes, " bytes of weights)");
  return path;
}

std::string Trainer::save_converted() {
  const int64_t n = quant::convert(*model_);
  log::info("converted ", n, " fake-quant modules to packed integer weights");
  if (ptq_ && !ptq_->packed.empty() && step_ == 0 && !cfg_.peft.enabled) {
    // No training happened: keep GPTQ's own codes and scales (re-rounding its output may differ).
    quant::apply_packed(*model_, *ptq_);
    log::info("kept GPTQ's packed weights for ", ptq_->packed.size(), " linears");
  }
  return save_model_dir("converted", ModelFormat::Converted);
}

}  // namespace qf::trainer
