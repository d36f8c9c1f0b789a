// Hugging Face `tokenizer.json` tokenizers (the `tokenizers` library's format), for BPE models:
//  - byte-level BPE (GPT-2, Llama-3, Qwen2): ByteLevel pre-tokenizer with the GPT-2 regex, or a
//    Sequence of Split(Regex, Isolated) + ByteLevel(use_regex false); PCRE2 (UTF + UCP) runs the
//    patterns; ignore_merges (Llama-3) honoured;
//  - SentencePiece-style BPE (Llama-2, Mistral exports): normalizer Prepend("▁") + Replace(" " ->
//    "▁") or a Metaspace pre-tokenizer; byte fallback to <0xXX> tokens; the matching decoders;
//  - added tokens (special or not) split out of the text before the model runs.
// Unsupported pieces (WordPiece/Unigram/WordLevel models, NFKC or other normalizers, other
// pre-tokenizers) are refused at load with the component named.
// Invariant: encode() gives the ids `tokenizers.Tokenizer.encode(text, add_special_tokens=False)`
// gives (tests/interop/test_hf_tokenizers.py); decode(encode(s)) == s for text the vocabulary covers.
#pragma once
#include <memory>
#include <string>

#include "data/tokenizer.h"

namespace qf::data {

// `path`: a tokenizer.json file or a directory holding one (tokenizer_config.json next to it, when
// present, names the BOS/EOS/PAD tokens).
// Throws InputError naming the file (and the token, id or merge) on a malformed one: ids must be
// integers in [0, 2^31), unique and dense; merges must name tokens of model.vocab, as `tokenizers`
// requires. encode() throws InputError on text that is not valid UTF-8 (data/utf8.h).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);
// The same from the file's text (no tokenizer_config.json is read); `origin` names it in messages.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& json_text, const std::string& origin);

}  // namespace qf::data
