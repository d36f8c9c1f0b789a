// Datasets: text files/directories and JSONL -> token ids (cached on disk) -> packed fixed-length
// sequences -> train/validation split. Invariant: for a given (sources, tokenizer fingerprint,
// data config) the packed tensors are identical on every run and every machine.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "data/tokenizer.h"

namespace qf::data {

struct SourceConfig {
  enum class Format { Auto, Text, Jsonl };
  enum class Split { File, BlankLine, Line };
  std::string path;           // a file or a directory (recursed, sorted by path for determinism)
  Format format = Format::Auto;  // auto: .jsonl/.json-lines -> Jsonl, everything else -> Text
  std::string pattern = "*";  // glob on file names when path is a directory, e.g. "*.rst.txt"
  // Text: how a file is cut into documents. file: one document per file; blank_line: paragraphs
  // separated by blank lines; line: one document per non-empty line.
  Split split = Split::File;
  // Jsonl: field names. A record with `prompt_field` and `response_field` is an instruction
  // example (loss masked on the prompt); otherwise `text_field` is used.
  std::string text_field = "text";
  std::string prompt_field = "prompt";
  std::string response_field = "response";
};

// The recipe spellings of data.sources[].format / .split (also the token cache key's).
const cfg::Names<SourceConfig::Format>& source_format_names();
const cfg::Names<SourceConfig::Split>& source_split_names();

struct DataConfig {
  std::vector<SourceConfig> sources;
  int64_t seq_len = 256;          // tokens per training sequence (inputs); each sample holds seq_len+1 ids
  double val_fraction = 0.05;     // fraction of packed sequences held out (taken from the end of the stream)
  int64_t max_documents = 0;      // 0 = all
  bool add_bos = true;            // prepend BOS to every document (if the tokenizer has one)
  bool add_eos = true;            // append EOS to every document
  std::string cache_dir = ".cache/qforge/tokens";
  int64_t seed = 1234;            // shuffling seed for the sampler
  static DataConfig from_config(cfg::Reader& r);  // validates; calls r.finish()
};

// Packed sequences: tokens [N, seq_len+1] int64, loss_mask [N, seq_len] bool (true where the
// label token at position t+1 contributes to the loss: false on prompt tokens of instruction data).
struct PackedSet {
  at::Tensor tokens;
  at::Tensor loss_mask;
  int64_t size() const { return tokens.defined() ? tokens.size(0) : 0; }
};

struct Dataset {
  PackedSet train, val;
  int64_t n_documents = 0;
  int64_t n_tokens = 0;        // total tokens in the stream before packing
  std::string cache_file;      // where token ids were cached
  bool cache_hit = false;
};

// Reads, tokenizes (or loads from cache), packs and splits. Throws InputError for a missing or
// empty corpus, naming the path; throws ConfigError when too few tokens for one train and one
// validation sequence at seq_len.
Dataset build_dataset(const DataConfig& cfg, const Tokenizer& tok);

// A batch for the model: input_ids [B, T] int64, labels [B, T] int64 with -100 where masked.
struct Batch {
  at::Tensor input_ids;
  at::Tensor labels;
};
Batch make_batch(const PackedSet& set, const std::vector<int64_t>& indices);

}  // namespace qf::data
