// `qforge imatrix` as a library call: llama.cpp's importance matrix (what llama-imatrix computes and
// llama-quantize --imatrix consumes) for a float model -- a qforge run or a Hugging Face dir -- from
// calibration text, written in llama.cpp's GGUF imatrix format (export/imatrix_file.h).
// What is summed (tools/imatrix at 0c1e570): for every linear weight of the decoder layers, by its
// GGUF name ("blk.N.attn_q.weight"), each input column's square over all calibration tokens
// (in_sum2) and the number of tokens (counts); like llama-imatrix without --process-output, the
// output head and the token embedding are not collected. The tokens are qforge's calibration windows
// (data/calibration.h: `chunks` windows of `ctx` tokens evenly spread over the data's training split,
// as `qforge quantize` calibrates), so chunk_count = chunks and chunk_size = ctx; llama-imatrix would
// cut its own windows from the text and put BOS first in each.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "models/transformer.h"

namespace qf::trainer {

struct ImatrixArgs {
  std::string data;         // a recipe whose data: section gives the text, or a text file; "" = a run's own data
  std::string out = "imatrix.gguf";
  std::string save_tokens;  // also write the windows used (safetensors: tokens) when set
  int64_t chunks = 128;     // calibration windows
  int64_t ctx = 0;          // tokens per window; 0 = the recipe's data.seq_len
  int64_t batch_size = 8;   // windows per layer forward
  bool force = false;       // replace an existing --out
};

struct ImatrixResult {
  std::string out;
  int64_t entries = 0, chunks = 0, ctx = 0;
  double seconds = 0;
};

// `src`: a run dir / step dir (float weights) or a Hugging Face dir; `overrides` apply to a run's recipe.
ImatrixResult imatrix_run(const std::string& src, const std::vector<std::string>& overrides, const ImatrixArgs& a);

// qforge's decoder linears (full module names, "model.layers.0.self_attn.q_proj") -> their llama.cpp
// tensor names ("blk.0.attn_q.weight"), from the family's architecture spec.
std::map<std::string, std::string> linear_gguf_names(models::CausalLM& model);
// An imatrix file's importance weights per decoder linear of `model` (full name -> float32 [in]), as
// llama-quantize hands them to ggml_quantize_chunk (export/imatrix_file.h's Imatrix::weights);
// linears the file has no entry for are left out (logged). InputError when nothing matches or sizes differ.
std::map<std::string, at::Tensor> importance_weights(const std::string& path, models::CausalLM& model);

}  // namespace qf::trainer
