// `qforge quantize` as a library call: PTQ (RTN / GPTQ / AWQ) of a float model -- a qforge run or a
// Hugging Face dir -- into a converted run directory (trainer/run_dir.h's write_run_dir) whose
// config.yaml re-creates it with `qforge train` (PTQ as quant.init, no steps) and which eval,
// generate and export take like a QAT run's. Every request error fails before a weight is read.
#pragma once
#include <string>
#include <vector>

#include "quant/ptq.h"
#include "trainer/trainer.h"

namespace qf::trainer {

struct QuantizeArgs {
  std::string method = "gptq", quant = "q4_0", fallback, calib, out;
  std::string imatrix;  // llama.cpp importance matrix: rtn into llama.cpp types rounds as llama-quantize --imatrix
  int64_t samples = 128, batch_size = 8;
  quant::GptqConfig gptq;
  quant::AwqConfig awq;
  bool no_eval = false, force = false;
  bool no_stream = false;  // a Hugging Face dir: load the whole float model first (same result, more memory)
};

struct QuantizeResult {
  quant::PtqMethod method = quant::PtqMethod::None;
  quant::PtqResult ptq;        // per-linear errors, time
  EvalResult before, after;    // held-out loss of the float and the quantized model (tokens 0: not run)
  std::string out, checkpoint; // the run dir and its step dir
  int64_t model_bytes = 0;     // packed weights
};

// `src`: a run dir / step dir or a Hugging Face dir (then a.calib names the recipe whose data:
// section supplies calibration and held-out text); `overrides` apply to the source's recipe.
QuantizeResult quantize_run(const std::string& src, const std::vector<std::string>& overrides, const QuantizeArgs& a);

}  // namespace qf::trainer
