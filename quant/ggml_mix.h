// llama-quantize's per-tensor type choice (llama_tensor_get_type in llama.cpp src/llama-quant.cpp at
// 0c1e570, the commit llama-cpp-python 0.3.36 vendors), so a qforge GGUF holds the same types a
// llama.cpp user gets, for dense (non-MoE) models:
//  - a mixture's base type for every 2-D weight (token_embd included); 1-D tensors stay F32;
//  - output.weight (or token_embd when the embeddings are tied) -> Q6_K, or Q8_0 when the base
//    type's block does not divide its width; the q8_0 mixture keeps Q8_0;
//  - attn_v (and a fused attn_qkv, which llama.cpp counts as attn_v): q2_k -> Q3_K (Q4_K when
//    n_gqa >= 4), q2_k_s -> Q4_K when n_gqa >= 4, q3_k_m -> Q5_K in layers 0-1 then Q4_K,
//    q3_k_l -> Q5_K, q4_k_s -> Q5_K in layers 0-3, q4_k_m / q5_k_m -> Q6_K in the layers
//    use_more_bits() picks (i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2), iq4_nl / iq4_xs -> Q5_K when
//    n_gqa >= 4; a 70B model's Q3_K / Q4_K attn_v -> Q5_K;
//  - ffn_down: q2_k -> Q3_K, q2_k_s -> Q4_K in the first n/8 layers, q3_k_m -> Q5_K in the first
//    n/16 then Q4_K, q3_k_l -> Q5_K, q4_k_m / q5_k_m -> Q6_K in the use_more_bits layers, q4_k_s ->
//    Q5_K in the first n/8, iq4_nl / iq4_xs -> Q5_K in the first n/8 unless an importance matrix is
//    used, and with one q4_0 / q5_0 -> Q4_1 / Q5_1 in the first n/8;
//  - attn_output: q2_k -> Q3_K, q3_k_m -> Q4_K, q3_k_l -> Q5_K;
//  - token_embd: tq1_0 / tq2_0 / q2_0 -> Q4_K;
//  - qforge's plain q3_k / q4_k / q5_k (and q6_k): the base type everywhere but the output (file type
//    Q3_K_S / Q4_K_S / Q5_K_S; q3_k and q5_k choose exactly what q3_k_s / q5_k_s do for a dense
//    model, q4_k_s differs in its Q5_K layers);
//  - q2_k_s refuses Q2_K tensors without an importance matrix, as llama-quantize does;
//  - a width the chosen block does not divide falls back as llama.cpp does: Q2_K / Q3_K / TQ1_0 /
//    TQ2_0 / Q2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, and to F16
//    when even that (or a 32-block type) does not divide it; Q1_0 has none (InputError, as
//    llama-quantize stops).
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

// Mixtures: f32 f16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q2_k_s q3_k q3_k_s q3_k_m q3_k_l q4_k q4_k_s
// q4_k_m q5_k q5_k_s q5_k_m q6_k iq4_nl iq4_xs tq1_0 tq2_0 q1_0 q2_0 (llama-quantize's, by its
// names; q3_k / q4_k / q5_k / q6_k: that type everywhere but the output layer). Throws InputError
// listing them for anything else.
const std::vector<std::string>& mix_names();
bool is_mix(const std::string& name);
uint32_t mix_file_type(const std::string& mix);  // general.file_type (LLAMA_FTYPE_*)
bool use_more_bits(int64_t i_layer, int64_t n_layers);
// `cols` = the row width (input features); `tied` = no separate output tensor (token_embd is it).
// `fallback` (a mixture name: q8_0 q5_0 q5_1 q4_0 q4_1 f16 f32) replaces llama.cpp's fallback type
// for a width the chosen block does not divide; InputError when it does not divide it either.
// `n_gqa` = query heads per KV head (integer, llama.cpp's n_gqa()); `has_imatrix`: the weights are
// quantized with an importance matrix; `is_70b`: llama.cpp sees the model as LLM_TYPE_70B (is_70b()).
MixChoice mix_choice(const std::string& mix, TensorRole role, int64_t layer, int64_t n_layers, int64_t cols, bool tied,
                     const std::string& fallback = "", int64_t n_gqa = 1, bool has_imatrix = false,
                     bool is_70b = false);
// llama.cpp's LLM_TYPE_70B as its loader derives it for the architectures qforge writes: "llama"
// with 80 layers and fewer KV heads than heads, "qwen2" with 80 layers.
bool is_70b(const std::string& gguf_arch, int64_t n_layers, int64_t n_heads, int64_t n_kv_heads);

}  // namespace qf::quant
