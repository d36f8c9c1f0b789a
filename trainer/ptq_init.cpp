// quant.init: PTQ (RTN / GPTQ / AWQ) on a run's float model before QAT, or as `qforge quantize`.
#include "core/log.h"
#include "data/calibration.h"
#include "trainer/imatrix.h"
#include "trainer/trainer.h"

namespace qf::trainer {

using data::calibration_tokens;

quant::PtqResult run_ptq_init(models::CausalLM& model, const RunConfig& cfg, const data::Tokenizer& tok,
                              const data::PackedSet& own, const quant::PtqLayerHooks& hooks) {
  const auto& init = cfg.quant.init;
  at::Tensor tokens;
  if (!init.calib.data.empty()) {
    auto other = load_run_config(init.calib.data, {"run.init_from=", "model.from="});
    auto ds = data::build_dataset(other.data, tok);
    tokens = calibration_tokens(ds.train, init.calib.samples, "the data of " + init.calib.data);
  } else {
    tokens = calibration_tokens(own, init.calib.samples, "the run's training split");
  }
  auto q = cfg.quant;
  for (auto& r : q.rules) r.weight.learn = quant::Learn::None;  // LSQ starts from the plain spec's result
  log::info("PTQ ", quant::method_name(init.method), ": ", tokens.size(0), " calibration sequences x ", tokens.size(1),
            " tokens", init.calib.data.empty() ? "" : " from " + init.calib.data);
  std::map<std::string, at::Tensor> importance;
  if (!init.imatrix.empty()) {
    importance = importance_weights(init.imatrix, model);
    log::info("PTQ rtn: importance weights for ", importance.size(), " linears from ", init.imatrix);
  }
  auto r = quant::run_ptq(model, q, init, tokens, !log::quiet(), hooks, init.imatrix.empty() ? nullptr : &importance);
  log::info("PTQ ", quant::method_name(init.method), " done in ", r.seconds, " s: mean relative output error ", r.mean_err(),
            " (round-to-nearest ", r.mean_err_rtn(), ") over ", r.linears.size(), " linears");
  return r;
}

}  // namespace qf::trainer
