// The one table of llama.cpp (ggml) tensor types qforge computes, reads or writes (as llama.cpp's
// type_traits[]): each type's qforge spelling (presets, --quant, mixtures), ggml's and gguf-py's
// names, its GGUF type id (ggml_type), the block geometry, and the qforge rule that computes it
// with the preset's code width and symmetry. ggml_blocks, spec, ggml_mix, gguf_writer and
// gguf_export read their sizes and names from here; nothing else defines a block size.
// Torch-free.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant/spec.h"

namespace qf::quant::ggml {

struct TypeTraits {
  uint32_t gguf_id;       // ggml_type / GGUF tensor type
  const char* name;       // qforge's spelling: "q4_0", "q4_k", "f16"
  const char* ggml_name;  // ggml_type_name(): "q4_0", "q4_K", "f16" (llama-quantize's messages)
  const char* gguf_name;  // gguf-py's GGMLQuantizationType: "Q4_0", "Q4_K", "F16"
  Rule rule;              // Rule::Affine for the float types
  int64_t block;          // values per block (1 for the float types)
  int64_t bytes;          // bytes per block
  int bits;               // code width of the preset (16/32 for the float types)
  bool symmetric;         // codes centred on zero (one scale per block, no minimum)
};

const std::vector<TypeTraits>& type_table();
// The row of a block rule; throws qf::Error for Rule::Affine / IntZeroPoint (not a block format)
// and for a llama.cpp rule without a row ("not implemented").
const TypeTraits& traits(Rule r);
// Every Rule's lower-case spelling ("q4_k", "iq4_nl", "affine"), rows or not: for messages.
const char* rule_label(Rule r);
// nullptr when no row has that name / id.
const TypeTraits* traits_by_name(const std::string& name);
const TypeTraits* traits_by_gguf_id(uint32_t id);

}  // namespace qf::quant::ggml
