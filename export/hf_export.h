// `qforge export --format hf`: a run's model as a Hugging Face checkpoint directory that
// transformers.AutoModelForCausalLM.from_pretrained loads unchanged: config.json, safetensors
// (sharded above a size, with model.safetensors.index.json), tokenizer files.
// What is written is the model as it computes: LoRA adapters merged, fake-quant / converted / NF4
// weights dequantized to the values the forward pass uses, in fp32, bf16 or fp16. The caller's
// model is not changed (layers are merged one at a time into the copy being written: layer_view.h).
// Invariants: built in a temp directory, re-read with models/hf (every tensor compared with what was
// meant to be written) and only then renamed into place; an existing non-empty --out is refused
// unless `force` (then replaced only once the new one is complete).
#pragma once
#include <ATen/core/ScalarType.h>

#include <nlohmann/json.hpp>
#include <string>

#include "core/fault.h"
#include "core/fs.h"
#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct HfExportResult {
  std::string dir;
  int64_t n_tensors = 0, bytes = 0, n_shards = 0;
};

// Outputs of export / quantize (directories and single files such as .gguf):
//  - check_out refuses, even with `force`, an `out` inside a checkpoint directory (a dir holding
//    `latest`, e.g. <run>/checkpoints/), an `out` that is the source (`source`: a run or Hugging
//    Face dir) or contains it, and an existing entry of the source dir that the source owns
//    (config.yaml, checkpoints/, ... of a run; anything in a Hugging Face dir); without `force` it
//    refuses any existing `out` (a non-empty dir or a file). It also removes temp siblings that killed
//    exports left (<out>.tmp<PID>, <out>.tmp.<PID>, <out>.old<PID> whose PID is dead; an
//    <out>.old<PID> with no <out> is the old output a killed --force replacement set aside: restored).
//  - check_out_dir: check_out without a source, for formats that write a directory.
//  - stage_dir checks and returns a fresh temp dir beside `out`; commit_dir renames the finished
//    temp dir into place (with force, an existing `out` is moved aside first and removed after).
void check_out(const std::string& out, const std::string& source, bool force);
void check_out_dir(const std::string& out, bool force = false);
std::string stage_dir(const std::string& out, bool force = false);
void commit_dir(const std::string& tmp, const std::string& out);
// Runs fill(tmp) in a fresh stage_dir beside `out` and renames it into place when fill returns
// (its result carries the outcome); if anything throws, the temp dir is removed and `out` is left
// as it was. A kill leaves only <out>.tmp<PID>, which the next check_out removes.
template <class F>
auto write_staged_dir(const std::string& out, bool force, F&& fill) {
  const std::string tmp = stage_dir(out, force);
  try {
    auto r = fill(tmp);
    fault("export_staged", out);
    commit_dir(tmp, out);
    fault("export_committed", out);
    return r;
  } catch (...) {
    fs::remove_tree(tmp);
    throw;
  }
}
// tokenizer.model (+ a LlamaTokenizer config) or tokenizer.json, and tokenizer_config.json.
void copy_tokenizer(const data::Tokenizer& tok, const std::string& dir);
// config.json's bos/eos/pad_token_id from the tokenizer (null where it has none); without them a
// family's config class defaults to its own vocabulary's ids (Phi-3: 32000).
nlohmann::json hf_special_token_ids(const data::Tokenizer& tok);

// `tok`: the run's tokenizer, written beside the weights (copy_tokenizer); `dtype`: the stored
// precision (kFloat, kBFloat16 or kHalf); `max_shard_bytes`: shards
// above this size get a model.safetensors.index.json; `force`: replace an existing --out (check_out).
HfExportResult export_hf(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                         at::ScalarType dtype, int64_t max_shard_bytes, bool force = false);

}  // namespace qf::exporter
