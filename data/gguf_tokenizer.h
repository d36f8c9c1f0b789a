// A GGUF file's tokenizer (its tokenizer.ggml.* block) as qforge's tokenizers, the inverse of what
// export/gguf_export.cpp writes and what llama.cpp's vocabulary loader reads:
//  - "llama" (SentencePiece, llama.cpp's SPM): tokens, scores and token types become a sentencepiece
//    BPE model (merges by piece score, byte fallback when BYTE tokens exist, identity normalisation
//    with the dummy prefix as tokenizer.ggml.add_space_prefix says: what llama.cpp applies of a
//    sentencepiece model), loaded by libsentencepiece;
//  - "gpt2" (byte-level BPE): tokens, merges and the pre-tokenizer named by tokenizer.ggml.pre
//    ("gpt-2"/"default", "llama-bpe"/"llama3", "qwen2") become a tokenizer.json (control and
//    user-defined tokens as added tokens; Llama 3's ignore_merges, as llama.cpp sets it for that
//    pre-tokenizer), loaded by data/hf_tokenizer.
// BOS/EOS/PAD are the tokenizer.ggml.*_token_id keys; other vocabularies ("bert", "rwkv", ...) and
// pre-tokenizers are refused naming the key and value.
// Invariant: encode() gives llama.cpp's ids for the same file (llama_tokenize with
// parse_special = true, without BOS), decode() its text (tests/interop/test_gguf_in.py).
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "data/tokenizer.h"

namespace qf::data {

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path);
// The tokenizer.json a "gpt2" vocabulary is rebuilt as (for re-exporting it to GGUF).
nlohmann::json gguf_bpe_tokenizer_json(const std::string& path);
// The sentencepiece model (serialized ModelProto) a "llama" vocabulary is rebuilt as (a tokenizer.model).
std::string gguf_sentencepiece_model(const std::string& path);
// tokenizer.ggml.add_bos_token, else llama.cpp's default for the vocabulary (llama: true, gpt2: false).
bool gguf_adds_bos(const std::string& path);
// The split regexes of the byte-level pre-tokenizers llama.cpp names (tokenizer.ggml.pre): Llama 3's
// (digits in runs of up to three, "llama-bpe") and Qwen2's (single digits, "qwen2").
extern const char* const kLlama3Split;
extern const char* const kQwen2Split;

}  // namespace qf::data
