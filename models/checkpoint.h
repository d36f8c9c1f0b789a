// Activation checkpointing (PyTorch's torch.utils.checkpoint, reentrant flavour, without its
// pitfalls): checkpoint(fn, x, params) runs fn(x) without keeping its activations and recomputes
// them in backward.
// Invariants:
// - Gradients equal the un-checkpointed run's: the recompute runs under the forward's autocast
//   state and RNG state (CPU and the input's CUDA device), so dropout draws the same mask.
// - The trainable tensors fn reads (`params`) are inputs of the checkpoint node; backward gets
//   their gradients with autograd::grad and returns them, so each parameter is accumulated once per
//   backward, as without checkpointing (DataParallel's post-accumulate hooks fire once).
// - While recomputing, recomputing() is true on that thread: stateful forwards (observers) skip
//   their update, having done it in the first forward.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace qf::models {

using SegmentFn = std::function<at::Tensor(const at::Tensor&)>;

// fn must be a pure function of x, `params` and tensors that need no gradient (captured).
at::Tensor checkpoint(SegmentFn fn, const at::Tensor& x, const std::vector<at::Tensor>& params);

// For a scalar-valued fn that reads no trainable tensor but x: computes fn(x) and its gradient
// d fn / dx in one pass (forward), keeping only that gradient [x's shape] for backward, which
// scales it by the incoming gradient. Memory as checkpoint(), without the recompute (a chunked
// loss over a frozen output layer: QLoRA, LoRA).
at::Tensor scalar_with_eager_grad(SegmentFn fn, const at::Tensor& x);

// True while a checkpointed segment is being recomputed in backward (this thread).
bool recomputing();

}  // namespace qf::models
