// Hugging Face `tokenizer.json` tokenizers (the `tokenizers` library's format), for BPE models, in
// the layouts of GPT-2/OPT, Llama 3.x, Qwen2/2.5/3, Llama 2/TinyLlama/Mistral/Phi-3 and Gemma 2/3:
//  - normalizers: NFC (Qwen), Prepend and Replace with a String pattern (sentencepiece conversions),
//    in Sequences;
//  - pre-tokenizers: ByteLevel (GPT-2 regex or none), Split with a Regex or String pattern, any
//    delimiter behaviour, inverted or not (Llama 3/Qwen patterns, Gemma's " " merged with previous),
//    Metaspace (prepend_scheme always/first/never, split or not); PCRE2 (UTF + UCP) runs regexes;
//  - BPE with ignore_merges, byte fallback to <0xXX> tokens, unk_token and fuse_unk;
//  - added tokens cut out of the text first (leftmost-longest), with their single_word, lstrip,
//    rstrip and normalized flags as `tokenizers` applies them;
//  - decoders ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, as `tokenizers` decodes any
//    ids (byte sequences that are not UTF-8 become U+FFFD).
// Unsupported pieces (WordPiece/Unigram/WordLevel models, NFKC, Replace with a Regex and other
// normalizers, other pre-tokenizers and decoders) are refused at load with the component named.
// Invariant: encode() gives the ids `tokenizers.Tokenizer.encode(text, add_special_tokens=False)`
// gives and decode() the text `Tokenizer.decode(ids, skip_special_tokens=False)` gives
// (tests/interop/test_hf_tokenizers.py); decode(encode(s)) == s (byte-level: s normalized) for text
// the vocabulary covers.
#pragma once
#include <memory>
#include <string>

#include "data/tokenizer.h"

namespace qf::data {

// `path`: a tokenizer.json file or a directory holding one. BOS/EOS/PAD are found as transformers'
// AutoTokenizer finds them in that directory: tokenizer_config.json's bos_token/eos_token/pad_token,
// else special_tokens_map.json's, else the defaults of the tokenizer class (tokenizer_config.json's
// tokenizer_class, else the one config.json's model_type maps to: GPT-2's own files name none).
// Throws InputError naming the file (and the token, id or merge) on a malformed one: ids must be
// integers in [0, 2^31), unique and dense; merges must name tokens of model.vocab, as `tokenizers`
// requires. encode() throws InputError on text that is not valid UTF-8 (data/utf8.h).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path);
// The same from the file's text (no tokenizer_config.json is read); `origin` names it in messages.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& json_text, const std::string& origin);

}  // namespace qf::data
