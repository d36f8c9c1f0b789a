// The tiny Llama shape the unit tests and interop drivers share: 2 layers, dim 64, 4 heads with 2
// KV heads (GQA), SwiGLU 128. Callers vary only the vocabulary, positions and init scale.
#pragma once
#include "models/config.h"

namespace qf::testing {

inline qf::models::ModelConfig tiny_llama(int64_t vocab = 64, int64_t max_seq_len = 32, double init_std = 0.1) {
  qf::models::ModelConfig c;
  c.vocab_size = vocab;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.ffn_dim = 128;
  c.max_seq_len = max_seq_len;
  c.init_std = init_std;
  return c;
}

}  // namespace qf::testing
