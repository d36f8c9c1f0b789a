// A GGUF file's model read back as qforge's: the ModelConfig its metadata describes and each
// tensor's qforge parameter. The inverse of export/gguf_export.cpp's write_metadata and tensor plan
// (and of convert_hf_to_gguf.py for the same architectures): llama (Llama 1-3, Mistral; Q/K rows in
// llama.cpp's interleaved RoPE layout), qwen2 (the llama family with q/k/v biases), qwen3, gemma2,
// gemma3 (norm weights stored as 1 + w), phi3 (fused qkv and gate_up), gpt2. Any other
// general.architecture is refused, naming it. Torch-free.
// Invariant: the ModelConfig builds a model whose every parameter is named by exactly one GGUF tensor
// (gguf_param), except what llama.cpp's architecture fixes (Gemma's tied output, positions).
#pragma once
#include <string>
#include <vector>

#include "core/gguf_file.h"
#include "models/arch.h"
#include "models/config.h"

namespace qf::models {

struct GgufModelInfo {
  std::string arch;                // general.architecture
  ModelConfig config;              // dtype F32, from empty
  std::vector<std::string> notes;  // what the user should know (settings llama.cpp fixes)
  bool permuted_qk = false;        // Q/K rows in llama.cpp's interleaved RoPE order (llama)
  bool norm_plus_one = false;      // norm weights stored as 1 + w (Gemma)
};

using gguf_in::is_gguf_file;
// The architecture names read (for messages): "llama, qwen2, qwen3, gemma2, gemma3, phi3, gpt2".
const char* gguf_architectures();
// Config from the metadata, tensor shapes (vocabulary rows, tied output) and the rope tables stored as
// F32 tensors: rope_freqs (Llama 3 scaling: its factor, low/high frequency factors and original
// context recovered from the divisors and checked against every one) and rope_factors_long/short
// (Phi-3 LongRoPE).
GgufModelInfo gguf_model_info(const gguf_in::File& f);
// The qforge parameter a GGUF tensor loads into ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight");
// "" when the name is not one of the family's (rope tables are not parameters: "" too).
std::string gguf_param(const ArchSpec& a, const ModelConfig& c, const std::string& gguf_name);

}  // namespace qf::models
