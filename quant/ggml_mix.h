// llama-quantize's per-tensor type choice (llama.cpp src/llama-quant.cpp at 0c1e570, the commit
// llama-cpp-python 0.3.36 vendors), so a qforge GGUF holds the same types a llama.cpp user gets:
//  - a mixture's base type for every 2-D weight (token_embd included); 1-D tensors stay F32;
//  - output.weight (or token_embd when the embeddings are tied) -> Q6_K, or Q8_0 when its width is
//    not a multiple of 256; the q8_0 mixture keeps Q8_0;
//  - q4_k_m: attn_v and ffn_down -> Q6_K in the layers use_more_bits() picks
//    (i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2);
//  - a width the chosen block does not divide falls back as llama.cpp does: Q4_K -> Q5_0,
//    Q6_K -> Q8_0, and to F16 when even that (or a 32-block type) does not divide it.
// Each weight's role comes from its family's architecture spec (models/arch.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/arch.h"
#include "quant/spec.h"

namespace qf::quant {

using models::TensorRole;

struct MixChoice {
  Rule rule = Rule::Affine;  // a llama.cpp block rule, or Affine = float (see f16)
  bool f16 = false;          // float choice: F16 (mixtures' shape fallback, --quant f16) vs F32
  std::string fallback;      // non-empty when the width forced a fallback (llama.cpp's warning text)
};

// Mixtures: f32 f16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q6_k q4_k_m (q4_k / q6_k: that type everywhere
// but the output layer). Throws InputError listing them for anything else.
const std::vector<std::string>& mix_names();
bool is_mix(const std::string& name);
uint32_t mix_file_type(const std::string& mix);  // general.file_type (LLAMA_FTYPE_*)
bool use_more_bits(int64_t i_layer, int64_t n_layers);
// `cols` = the row width (input features); `tied` = no separate output tensor (token_embd is it).
// `fallback` (a mixture name: q8_0 q5_0 q5_1 q4_0 q4_1 f16 f32) replaces llama.cpp's fallback type
// for a width the chosen block does not divide; InputError when it does not divide it either.
MixChoice mix_choice(const std::string& mix, TensorRole role, int64_t layer, int64_t n_layers, int64_t cols, bool tied,
                     const std::string& fallback = "");

}  // namespace qf::quant
