// The loss of a causal LM on packed token batches: one batch's summed next-token cross-entropy
// (forward under bf16 autocast when asked, loss in fp32, label -100 ignored) and the mean over a
// packed set, optionally sharded over data-parallel ranks.
// Invariant: sharded or not, evaluate_model returns what one process computes over the same batches.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "data/dataset.h"
#include "models/transformer.h"

namespace qf::trainer {

struct EvalResult {
  double loss = 0;  // mean cross-entropy (nats/token)
  double ppl = 0;
  int64_t tokens = 0;
};

// Sum over b's labelled tokens of the next-token cross-entropy (a scalar fp32 tensor, in the graph).
// chunk_tokens (trainer.loss_chunk_tokens): rows of logits computed at a time; 0 = all at once,
// -1 = auto (loss_chunk_rows). Chunked, the [tokens, vocab] logits and their gradient never exist
// whole: a training forward checkpoints each chunk (models/checkpoint.h). Equal to the unchunked
// sum up to fp32 summation order.
at::Tensor token_loss_sum(models::CausalLM& m, const data::Batch& b, at::Device dev, bool bf16, int64_t chunk_tokens);
// The same sum from the hidden state the output layer reads (m.hidden's result, [B, T, dim]) and the
// batch's labels [B, T]: token_loss_sum == hidden_loss_sum(m, m.hidden(ids), labels, ...).
// `kd` (optional, trainer `distill:`): each labelled row's term becomes ce_weight * CE +
// kd_weight * T^2 * KL(softmax(teacher_logits/T) || softmax(logits/T)), the teacher's logits computed
// chunk by chunk (no grad) from its hidden state kd->hidden ([B, T, teacher dim], eval_hidden's).
struct DistillTarget {
  models::CausalLM* teacher = nullptr;
  at::Tensor hidden;
  double kd_weight = 1.0, ce_weight = 0.0, temperature = 1.0;
};
at::Tensor hidden_loss_sum(models::CausalLM& m, at::Tensor h, const at::Tensor& labels, at::Device dev, bool bf16,
                           int64_t chunk_tokens, const DistillTarget* kd = nullptr);
// The forward as evaluation runs it (no grad is set up here): the hidden state the output layer
// reads for ids [B, T] on `dev`, and the output layer on rows of it, under bf16 autocast when asked;
// eval_logits returns fp32.
at::Tensor eval_hidden(models::CausalLM& m, const at::Tensor& ids, at::Device dev, bool bf16);
at::Tensor eval_logits(models::CausalLM& m, const at::Tensor& h, at::Device dev, bool bf16);
// The chunk size for a setting: itself when >= 0, else about 2^25 logits per chunk (128 MiB fp32),
// at least 64 rows.
int64_t loss_chunk_rows(int64_t setting, int64_t vocab);

// Mean next-token cross-entropy over a packed set (batches in order).
// Data parallel (shard.world > 1): each global batch of batch_size * world sequences is split
// across ranks and shard.sum adds (loss, tokens) over them, so every rank gets the number one
// process with that global batch computes, in 1/world of the time.
struct EvalShard {
  int64_t rank = 0, world = 1;
  std::function<void(double& loss_sum, double& tokens)> sum;
};
EvalResult evaluate_model(models::CausalLM& m, const data::PackedSet& set, int64_t batch_size, int64_t max_batches,
                          at::Device dev, bool bf16, const EvalShard& shard = {});

// evaluate_model's result (same batches, bit for bit) for a model run one decoder layer at a time, as
// streaming PTQ loads it: the constructor embeds every batch of the set, advance(i) runs layer i
// over all of them (call it for i = 0..n-1 while layer i holds the weights to evaluate), finish()
// applies the final norm and the output layer. Holds the whole set's hidden states meanwhile (bytes()).
// max_batches > 0: only the first ones (evaluate_model's max_batches).
class LayerwiseEval {
 public:
  LayerwiseEval(models::CausalLM& m, const data::PackedSet& set, int64_t batch_size, at::Device dev, bool bf16,
                int64_t max_batches = 0);
  void advance(int64_t i);
  EvalResult finish();
  int64_t bytes() const;

 private:
  models::CausalLM& m_;
  at::Device dev_;
  bool bf16_;
  std::vector<at::Tensor> h_, labels_;
};

}  // namespace qf::trainer
