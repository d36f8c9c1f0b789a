#include "models/linear.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/init.h>

#include "core/error.h"
#include "core/safetensors.h"

namespace qf::models {

DenseLinear::DenseLinear(int64_t in, int64_t out, bool has_bias) : LinearBase(in, out) {
  weight = register_parameter("weight", at::empty({out, in}));
  if (has_bias) bias = register_parameter("bias", at::zeros({out}));
}

at::Tensor DenseLinear::forward(const at::Tensor& x) { return at::linear(x, weight, bias); }

namespace {
// y = x W^T + b with W materialized on demand, in forward and again in backward (see FrozenLinear).
struct FrozenMatmulFn : public torch::autograd::Function<FrozenMatmulFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const FrozenLinear* m) {
    ctx->saved_data["m"] = reinterpret_cast<int64_t>(m);
    auto b = m->bias.defined() ? m->bias.to(x.scalar_type()) : at::Tensor();
    auto y = at::linear(x, m->materialize(x.scalar_type()), b);
    // With a bias, linear of a 3-D input returns a view of its 2-D addmm; a custom Function's output
    // must not be a view (LoRA adds to it in place), so it gets its own storage.
    return y.is_view() ? y.clone() : y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto* m = reinterpret_cast<const FrozenLinear*>(ctx->saved_data["m"].toInt());
    return {at::matmul(g[0], m->materialize(g[0].scalar_type())), at::Tensor()};
  }
};
}  // namespace

at::Tensor FrozenLinear::forward(const at::Tensor& x) {
  // Without grad (eval, generation) the custom function's bookkeeping is skipped.
  if (!x.requires_grad() || !at::GradMode::is_enabled()) {
    auto b = bias.defined() ? bias.to(x.scalar_type()) : at::Tensor();
    return at::linear(x, materialize(x.scalar_type()), b);
  }
  return FrozenMatmulFn::apply(x, this);
}

HalfLinear::HalfLinear(LinearBase& dense, at::ScalarType storage)
    : HalfLinear(dense.effective_weight(), dense.bias_or_undefined(), storage) {}

HalfLinear::HalfLinear(const at::Tensor& w, const at::Tensor& b, at::ScalarType storage)
    : FrozenLinear(w.size(1), w.size(0)) {
  weight = register_buffer("weight", w.detach().to(storage));
  if (b.defined()) bias = register_buffer("bias", b.detach().clone());
}

DeferredLinear::DeferredLinear(const at::Tensor& src, const at::Tensor& b) : LinearBase(src.size(1), src.size(0)), source(src) {
  if (b.defined()) bias = register_parameter("bias", b, /*requires_grad=*/false);
}

at::Tensor DeferredLinear::forward(const at::Tensor&) {
  QF_CHECK(false, "DeferredLinear: the weight of this ", out_features, "x", in_features,
           " linear has not been loaded from its checkpoint yet (load() it first)");
  return {};
}

at::Tensor DeferredLinear::effective_weight() { return source.to(at::kFloat); }

std::shared_ptr<DenseLinear> DeferredLinear::load(at::ScalarType dtype, at::Device device) const {
  at::NoGradGuard ng;
  auto d = std::make_shared<DenseLinear>(in_features, out_features, bias.defined());
  // A copy in any case (never the mapped pages themselves, which are dropped next).
  d->weight.set_data(source.to(device, dtype, /*non_blocking=*/false, /*copy=*/true).contiguous());
  if (bias.defined()) d->bias.set_data(bias.detach().to(device, dtype));
  st::drop_pages(source);
  return d;
}

void DeferredLinear::pretty_print(std::ostream& s) const {
  s << "DeferredLinear(in=" << in_features << ", out=" << out_features << ", file dtype "
    << c10::toString(source.scalar_type()) << (bias.defined() ? ", bias" : "") << ")";
}

void HalfLinear::pretty_print(std::ostream& s) const {
  s << "HalfLinear(in=" << in_features << ", out=" << out_features << ", storage=" << c10::toString(weight.scalar_type())
    << (bias.defined() ? ", bias" : "") << ")";
}

void DenseLinear::pretty_print(std::ostream& s) const {
  s << "DenseLinear(in=" << in_features << ", out=" << out_features << ", bias=" << bias.defined() << ")";
}

LinearSlot::LinearSlot(torch::nn::Module* parent, std::string name, std::shared_ptr<LinearBase> m)
    : parent_(parent), name_(std::move(name)), mod_(std::move(m)) {
  parent_->register_module(name_, mod_);
}

void LinearSlot::replace(std::shared_ptr<LinearBase> m) {
  QF_CHECK(m, "LinearSlot::replace(", name_, "): null module");
  QF_CHECK(m->in_features == mod_->in_features && m->out_features == mod_->out_features, "replacing linear '", name_,
           "' [", mod_->out_features, "x", mod_->in_features, "] with a module of shape [", m->out_features, "x",
           m->in_features, "]");
  parent_->replace_module(name_, m);
  mod_ = std::move(m);
}

DenseEmbedding::DenseEmbedding(int64_t num, int64_t dim) : EmbeddingBase(num, dim) {
  weight = register_parameter("weight", at::empty({num, dim}));
}

void DenseEmbedding::pretty_print(std::ostream& s) const {
  s << "DenseEmbedding(" << num_embeddings << ", " << embedding_dim << ")";
}

EmbeddingSlot::EmbeddingSlot(torch::nn::Module* parent, std::string name, std::shared_ptr<EmbeddingBase> m)
    : parent_(parent), name_(std::move(name)), mod_(std::move(m)) {
  parent_->register_module(name_, mod_);
}

void EmbeddingSlot::replace(std::shared_ptr<EmbeddingBase> m) {
  QF_CHECK(m && m->num_embeddings == mod_->num_embeddings && m->embedding_dim == mod_->embedding_dim,
           "replacing embedding '", name_, "' with a table of a different shape");
  parent_->replace_module(name_, m);
  mod_ = std::move(m);
}

static void collect(torch::nn::Module& m, const std::string& prefix, std::vector<NamedSlot>& out) {
  auto* host = dynamic_cast<HasLinearSlots*>(&m);
  for (auto& item : m.named_children()) {
    std::string full = prefix.empty() ? item.key() : prefix + "." + item.key();
    LinearSlot* slot = host ? host->linear_slot(item.key()) : nullptr;
    if (slot) {
      out.push_back({full, slot});
    } else {
      collect(*item.value(), full, out);
    }
  }
}

std::vector<NamedSlot> linear_slots(torch::nn::Module& root) {
  std::vector<NamedSlot> out;
  collect(root, "", out);
  return out;
}

}  // namespace qf::models
