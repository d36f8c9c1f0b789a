// `qforge export --format gguf`: a model as a llama.cpp GGUF file (architecture "llama").
//  - Linears (and a token embedding) that qforge quantized with a llama.cpp preset (QAT + convert,
//    or PTQ) are written with their packed blocks as they are: the file holds exactly the weights
//    qforge computes with, and what qforge holds in float stays float (F32; F16 with --quant f16),
//    so llama.cpp reproduces qforge's logits.
//  - A float model is quantized with --quant, a llama.cpp type mixture (f32 f16 q8_0 q4_0 q4_1
//    q5_0 q5_1 q4_k q4_k_m q6_k), choosing each tensor's type as llama-quantize does
//    (quant/ggml_mix: output Q6_K, q4_k_m's attn_v/ffn_down, shape fallbacks with a warning each)
//    and quantizing with llama.cpp's reference quantizers (quant/ggml_blocks): byte-identical to
//    convert_hf_to_gguf.py --outtype f32 + llama-quantize without an imatrix; with `imatrix_path`
//    (llama.cpp's imatrix file, export/imatrix_file.h) the tensors it has are quantized with their
//    importance weights and the mixture follows llama-quantize's --imatrix choices: the bytes of
//    llama-quantize --imatrix.
//  - A model that holds packed blocks and float tensors (token_embd, output, a linear left in float):
//    FloatTensors::Exact (the default) keeps those float, as above; FloatTensors::Mixture
//    (`--float-tensors mixture`) gives each the type llama-quantize's --quant mixture gives it (shape
//    fallbacks included; 1-D tensors stay F32) and quantizes it as llama-quantize does, with the
//    imatrix's weights where it has the tensor: the file llama-quantize writes from the exact export,
//    the packed blocks byte for byte.
//  - Q and K rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's, as
//    convert_hf_to_gguf.py does; a row permutation keeps every quantization block intact.
//  - Metadata: llama.* hyper-parameters and the tokenizer block (sentencepiece vocabularies).
// Streaming: tensors are produced one at a time in row chunks while the file is written (never two
// copies of the model; the pages of a memory-mapped source checkpoint are released as each tensor
// is done); the file is re-read and checked, and appears only complete (gguf::Writer: temp file + fsync
// + rename). An existing `out` is refused unless `force`, a directory always (exporter::check_out).
// The model is not changed: LoRA layers are merged and fake-quant layers packed one at a time as
// their tensors are written (export/layer_view.h), giving the bytes merge_lora + convert would.
// Inside: metadata (general.* + <arch>.*), the tokenizer block, then the tensor plan (each tensor's
// type decided up front, its bytes made by a producer when the writer reaches it).
#pragma once
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

// What becomes of the float tensors of a model that holds packed llama.cpp blocks (a float model is
// quantized by the mixture either way): Exact keeps them F32 (F16 with --quant f16), Mixture gives
// them llama-quantize's types for --quant.
enum class FloatTensors { Exact, Mixture };
FloatTensors parse_float_tensors(const std::string& s);  // "exact" | "mixture"; InputError naming the flag otherwise
const char* to_string(FloatTensors f);

struct GgufExportResult {
  std::string path;
  int64_t n_tensors = 0, bytes = 0, n_fallback = 0;
  int64_t input_bytes = 0;        // bytes of the weights read (as the model holds them)
  bool exact = false;             // packed QAT/PTQ blocks written as they are
  bool float_mixture = false;     // exact, and the float tensors in the mixture's types (FloatTensors::Mixture)
  int64_t n_off_mixture = 0;      // packed tensors whose type is not the one the mixture picks for them
  int64_t n_imatrix = 0;          // tensors quantized with importance weights
  std::vector<std::string> rows;  // "name  type  shape" per tensor, for the report
};

GgufExportResult export_gguf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& quant, const std::string& name, bool progress = true,
                             const std::string& fallback = "", bool force = false, const std::string& imatrix_path = "",
                             FloatTensors float_tensors = FloatTensors::Exact);

// `qforge export RUN --format gguf-lora --out DIR`: a LoRA run as llama.cpp runs a base with an adapter.
// DIR/base.gguf is export_gguf of the run with every LoRA layer replaced by its base (no merge: a
// llama.cpp-blocks base writes its own blocks, so the file is the base the adapter trained on);
// DIR/adapter.gguf holds the adapters as llama.cpp's convert_lora_to_gguf.py writes them: general.type
// "adapter", adapter.type "lora", adapter.lora.alpha = s * r (llama.cpp scales by alpha / r; this keeps
// rsLoRA's s), tensors "<base tensor>.lora_a" = A [r, in] and ".lora_b" = B [out, r] in F32, B's rows
// permuted with the base's Q/K rows. llama.cpp's base + adapter then computes base(x) + s·B(A(x)): the
// unmerged model. Refused: no LoRA layers, exact-merge adapters (their model is fq(W + s·BA): export
// the merged --format gguf instead), a LoRA on the output layer (llama.cpp adapts decoder linears here).
struct GgufLoraResult {
  std::string dir;
  GgufExportResult base;
  int64_t n_adapters = 0, adapter_bytes = 0;
  double alpha = 0;  // adapter.lora.alpha written
};
GgufLoraResult export_gguf_lora(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                                const std::string& quant, const std::string& name, bool progress = true, bool force = false);

}  // namespace qf::exporter
