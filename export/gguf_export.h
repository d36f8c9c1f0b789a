// `qforge export --format gguf`: a run's model as a llama.cpp GGUF file (architecture "llama").
//  - Linears that qforge quantized with a llama.cpp preset (QAT + convert, or PTQ) are written with
//    their packed blocks as they are: the file holds exactly the weights qforge computes with.
//  - Float linears are quantized with --quant (f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k) by
//    llama.cpp's reference quantizers (quant/ggml_blocks).
//  - Tensors qforge holds in float (embeddings, lm_head, norms) are written F32 (F16 with --quant
//    f16), so the file reproduces qforge's logits; quantize them at training time (quant.embedding)
//    to make them small.
//  - Q and K rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's, as
//    convert_hf_to_gguf.py does; a row permutation keeps every quantization block intact.
//  - Metadata: llama.* hyper-parameters and the tokenizer block (sentencepiece vocabularies).
// Invariant: written atomically; a width that the block size does not divide is an error naming the
// tensor (no silent fallback).
#pragma once
#include <string>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct GgufExportResult {
  std::string path;
  int64_t n_tensors = 0, bytes = 0;
  std::vector<std::string> rows;  // "name  type  shape" per tensor, for the report
};

GgufExportResult export_gguf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& quant, const std::string& name);

}  // namespace qf::exporter
