// Training memory, estimated before the first step, so a seq_len / batch that cannot fit is an
// error naming the setting to change instead of an OOM kill an hour into loading.
// The model is counted as it is (the process's RSS once loaded and transformed); the estimate adds
// what training allocates on top: gradients of the trainable tensors, optimizer state, the
// activations a micro-batch keeps for backward (per decoder layer, or only each checkpointed
// layer's input plus one layer recomputed), and the output layer's logits (whole or one chunk).
// Invariant: an analytic upper-side estimate from the shapes, never a measurement; the coefficients
// were checked against peak RSS at the Llama-3.2-1B shape (bench/scale.sh, README).
#pragma once
#include <cstdint>
#include <string>

#include "models/config.h"

namespace qf::trainer {

struct MemoryInputs {
  models::ModelConfig model;
  int64_t batch = 1, seq = 1;     // one micro-batch
  bool bf16 = false;              // autocast: matmul outputs in bf16
  int64_t checkpoint_every = 0;   // 0 = no activation checkpointing
  int64_t loss_chunk_rows = 0;    // 0 = the whole [tokens, vocab] logits
  int64_t trainable = 0;          // trainable elements (fp32 gradients)
  double optim_bytes_per_element = 8.0;  // AdamW: 8; AdamW8bit: ~2.03
  int64_t lora_r = 0;             // > 0: LoRA adapters on the linears (their inputs are kept)
  bool frozen_linears = false;    // LoRA/QLoRA: base linears keep no input for a weight gradient
};

struct MemoryEstimate {
  int64_t grads = 0, optim = 0, activations = 0, logits = 0;
  int64_t total() const { return grads + optim + activations + logits; }
  std::string describe() const;  // "gradients 1.2 GiB, optimizer 2.4 GiB, activations ..."
};

MemoryEstimate estimate_training_memory(const MemoryInputs& in);

// Bytes this process may still allocate on the host: MemAvailable, capped by the cgroup's
// memory.max - memory.current; QFORGE_HOST_MEMORY_BYTES overrides it (a budget below the machine's).
int64_t available_host_bytes();

std::string gib(int64_t bytes);  // "3.14 GiB"

}  // namespace qf::trainer
