// PTQ settings (`quant.init`, `quant.calib`, `quant.gptq`, `quant.awq` of a recipe; the flags of
// `qforge quantize`). Kept apart from quant/ptq.h so the QAT config can hold them.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace qf::quant {

struct GptqConfig {
  double damp = 0.01;           // percdamp: damp * mean(diag H) is added to the diagonal
  int64_t block_size = 128;     // lazy-batch width (columns updated together)
  // desc_act: quantize columns in decreasing order of H_ii. Without static groups, an affine
  // spec's groups follow that order and each column's group is kept (g_idx: written to GPTQ
  // files; GGUF and compressed-tensors cannot hold it). llama.cpp blocks always use static groups.
  bool act_order = false;
  // Group parameters fixed from the original weights before any update (GPTQModel's
  // static_groups): groups stay contiguous in storage order, so every format holds the result.
  bool static_groups = false;
  bool true_sequential = true;  // within a layer, q/k/v -> o -> gate/up -> down, each seeing the quantized earlier ones
  static GptqConfig from_config(cfg::Reader& r);  // calls r.finish()
  YAML::Node to_yaml() const;                     // what from_config reads back as this
};

enum class PtqMethod { None, Rtn, Gptq, Awq };
// The names recipes (`quant.init`) and `qforge quantize --method` use, one table for both.
const std::vector<std::pair<std::string, PtqMethod>>& method_names();
const char* method_name(PtqMethod m);
PtqMethod parse_method(const std::string& s);  // throws ConfigError listing rtn|gptq|awq

struct AwqConfig {
  int64_t grid = 20;          // scale ratios r = 0, 1/grid, ..., (grid-1)/grid
  // s = x_mean^r (the paper's search; on the demo model it closes 2-3x more of RTN's gap than
  // AutoAWQ's default duo scaling s = x_mean^r / w_mean^(1-r), which `true` selects).
  bool duo_scaling = false;
  bool clip = true;           // per-group clipping search (not for q/k projections)
  double max_shrink = 0.5;    // clip ranges tried: max * (1 - i/grid) for i < max_shrink * grid
  int64_t tokens = 4096;      // calibration tokens used by the scale search (evenly strided)
  int64_t clip_tokens = 512;  // ... and by the clipping search
  static AwqConfig from_config(cfg::Reader& r);
  YAML::Node to_yaml() const;
};

struct CalibConfig {
  int64_t samples = 128;      // calibration sequences (of data.seq_len tokens)
  int64_t batch_size = 8;     // sequences per layer forward
  std::string data;           // a recipe whose `data:` section supplies the text; "" = the run's own training split
  static CalibConfig from_config(cfg::Reader& r);
  YAML::Node to_yaml() const;
};

// `quant.init` and its settings: PTQ applied to the float weights before QAT's prepare.
struct PtqConfig {
  PtqMethod method = PtqMethod::None;
  CalibConfig calib;
  GptqConfig gptq;
  AwqConfig awq;
  // quant.imatrix: a llama.cpp importance-matrix file (qforge imatrix / llama-imatrix). With rtn into
  // llama.cpp types each linear it covers is rounded with its importance weights, as llama-quantize
  // --imatrix does (the packed blocks are kept: no training may follow).
  std::string imatrix;
};

}  // namespace qf::quant
