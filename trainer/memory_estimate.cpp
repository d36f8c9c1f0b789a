#include "trainer/memory_estimate.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include "models/arch.h"

namespace qf::trainer {

std::string gib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return b;
}

std::string MemoryEstimate::describe() const {
  return "gradients " + gib(grads) + ", optimizer " + gib(optim) + ", activations " + gib(activations) + ", logits " +
         gib(logits);
}

MemoryEstimate estimate_training_memory(const MemoryInputs& in) {
  const auto& c = in.model;
  const double tokens = static_cast<double>(in.batch) * static_cast<double>(in.seq);
  const double D = static_cast<double>(c.dim), F = static_cast<double>(c.ffn());
  const double q = static_cast<double>(c.n_heads * c.hdim()), kv = static_cast<double>(c.kv_heads() * c.hdim());
  const bool gated = models::arch_spec(c.family).gated_mlp || models::arch_spec(c.family).fused_gate_up;
  // Elements one layer keeps per token for backward: the norms' inputs and outputs, q/k/v (and
  // their RoPE'd and GQA-expanded copies), attention output, the MLP's hidden activations.
  double per_token = 6 * D + 3 * q + 4 * kv + q + (gated ? 4 * F : 2 * F);
  if (in.lora_r > 0) per_token += 7 * static_cast<double>(in.lora_r);
  if (!in.frozen_linears) per_token += D;  // weight gradients read each linear's input (mostly counted)
  const double elem = in.bf16 ? 3.0 : 4.0;  // autocast: bf16 matmul outputs beside fp32 norms
  double layer = per_token * tokens * elem;
  // Explicit softmax attention (soft-capped scores) keeps [heads, T, T] scores and probabilities.
  if (c.attn_softcap > 0) layer += 3.0 * static_cast<double>(in.batch * c.n_heads) * in.seq * in.seq * 4.0;
  const double L = static_cast<double>(c.n_layers);
  double act;
  if (in.checkpoint_every > 0) {
    const double ck = std::ceil(L / static_cast<double>(in.checkpoint_every));
    // Checkpointed layers keep their input; the rest keep everything; backward recomputes one
    // layer and holds its activations and their gradients.
    act = ck * tokens * D * 4.0 + (L - ck) * layer + 2.0 * layer;
  } else {
    act = L * layer + layer;  // + one layer's activation gradients in flight
  }
  const double V = static_cast<double>(c.vocab_size);
  const double rows = in.loss_chunk_rows > 0 ? std::min<double>(tokens, static_cast<double>(in.loss_chunk_rows)) : tokens;
  // Logits (model dtype), their fp32 copy, softmax and gradient.
  const double logits = rows * V * ((in.bf16 ? 2.0 : 4.0) + 12.0) + tokens * D * 8.0;
  MemoryEstimate e;
  e.grads = in.trainable * 4;
  e.optim = static_cast<int64_t>(static_cast<double>(in.trainable) * in.optim_bytes_per_element);
  e.activations = static_cast<int64_t>(act);
  e.logits = static_cast<int64_t>(logits);
  return e;
}

namespace {

int64_t read_i64(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s) || s == "max") return -1;
  try {
    return std::stoll(s);
  } catch (...) {
    return -1;
  }
}

}  // namespace

int64_t available_host_bytes() {
  if (const char* o = std::getenv("QFORGE_HOST_MEMORY_BYTES"); o && *o) {
    try {
      return std::stoll(o);
    } catch (...) {
    }
  }
  int64_t avail = std::numeric_limits<int64_t>::max();
  std::ifstream mi("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (mi >> key >> kb >> unit)
    if (key == "MemAvailable:") {
      avail = kb * 1024;
      break;
    }
  const int64_t max = read_i64("/sys/fs/cgroup/memory.max"), cur = read_i64("/sys/fs/cgroup/memory.current");
  if (max > 0 && cur >= 0) avail = std::min(avail, std::max<int64_t>(0, max - cur));
  return avail;
}

}  // namespace qf::trainer
