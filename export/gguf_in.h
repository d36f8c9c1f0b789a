// GGUF files as models: `model.from: FILE.gguf` and every command that takes a model. The file is
// mapped and fully validated (core/gguf_file.h with the type table's geometry) before any weight is
// read; the config comes from its metadata (models/gguf_config.h) and its rope tables
// (rope_freqs -> Llama 3 scaling, rope_factors_long/short -> Phi-3 LongRoPE); every weight is
// dequantized from its stored type to float32: the type table's rows through quant::ggml::dequantize
// (F32/F16/BF16 as they are), the read-only rows through quant/ggml_more.h, exactly as gguf-py's
// dequantize computes them. The inverse of export/gguf_export's layout transforms: llama's Q/K rows go
// back to Hugging Face's rotate-half order (a row permutation: exact), Gemma's norms from 1 + w to w.
// Invariants:
//  - every tensor is checked (name known to the family, shape, type) and every parameter found
//    before anything is copied; problems are listed together, each naming file, tensor and rule;
//  - with a LinearStreamer, claimed linears are built one at a time after everything else has loaded;
//    one whose streamer has build_blocks is first offered its llama.cpp blocks as the file holds them
//    (peft.base of that type keeps the bytes: no dequantize + requantize); otherwise it gets the
//    dequantized weight in the model dtype, like a dense one.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/gguf_file.h"
#include "models/gguf_config.h"
#include "models/hf.h"
#include "models/transformer.h"

namespace qf::exporter {

struct GgufCheckpoint {
  std::shared_ptr<gguf_in::File> file;
  models::GgufModelInfo info;  // config completed with the rope tables
};
// Opens, validates (check_tensors against qforge's type geometry) and reads the config.
GgufCheckpoint read_gguf(const std::string& path);

struct GgufLoadReport {
  std::vector<std::pair<std::string, std::string>> tensors;  // (GGUF tensor, its type) for every weight loaded
  std::vector<std::string> kept_packed;                      // linears a streamer kept as their blocks
};
void load_gguf_weights(models::CausalLM& model, const GgufCheckpoint& ck, bool progress = true,
                       const models::LinearStreamer* streamer = nullptr, GgufLoadReport* report = nullptr);
// read + build (fp32 or bf16) + load.
std::shared_ptr<models::CausalLM> load_gguf_model(const std::string& path, models::DType dtype, bool progress = true,
                                                  const models::LinearStreamer* streamer = nullptr,
                                                  GgufLoadReport* report = nullptr);

// One tensor dequantized to float32 in its GGUF layout (PyTorch order of ne; no layout transform):
// what gguf-py's dequantize returns for it. InputError naming file, tensor and type when qforge
// cannot dequantize the type.
at::Tensor gguf_tensor_f32(const gguf_in::File& f, const gguf_in::TensorInfo& t);
// What qforge does with a tensor of this type on load ("dequantized (Q4_K, table)", "kept as F32", ...),
// or "" when it cannot read it.
std::string gguf_type_support(uint32_t type);

}  // namespace qf::exporter
