// `qforge export --format hf`: a run's model as a Hugging Face checkpoint directory that
// transformers.AutoModelForCausalLM.from_pretrained loads unchanged: config.json, safetensors
// (sharded above a size, with model.safetensors.index.json), tokenizer files.
// What is written is the model as it computes: LoRA adapters merged, fake-quant / converted / NF4
// weights dequantized to the values the forward pass uses, in fp32, bf16 or fp16.
// Invariants: built in a temp directory, re-read with models/hf (every tensor compared with what was
// meant to be written) and only then renamed into place; an existing non-empty --out is refused.
#pragma once
#include <ATen/core/ScalarType.h>

#include <string>

#include "core/fs.h"
#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct HfExportResult {
  std::string dir;
  int64_t n_tensors = 0, bytes = 0, n_shards = 0;
};

// Output directories: check_out_dir refuses an existing non-empty `out` and an unwritable parent;
// stage_dir does that and returns a fresh temp dir beside it; commit_dir renames the finished temp
// dir into place.
void check_out_dir(const std::string& out);
std::string stage_dir(const std::string& out);
void commit_dir(const std::string& tmp, const std::string& out);
// Runs fill(tmp) in a fresh stage_dir beside `out` and renames it into place when fill returns
// (its result carries the outcome); if anything throws, the temp dir is removed and `out` is left
// as it was.
template <class F>
auto write_staged_dir(const std::string& out, F&& fill) {
  const std::string tmp = stage_dir(out);
  try {
    auto r = fill(tmp);
    commit_dir(tmp, out);
    return r;
  } catch (...) {
    fs::remove_tree(tmp);
    throw;
  }
}
// tokenizer.model (+ a LlamaTokenizer config) or tokenizer.json, and tokenizer_config.json.
void copy_tokenizer(const data::Tokenizer& tok, const std::string& dir);

// `tokenizer_path`: the run's sentencepiece .model or tokenizer.json (or its directory).
HfExportResult export_hf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                         at::ScalarType dtype, int64_t max_shard_bytes);

}  // namespace qf::exporter
