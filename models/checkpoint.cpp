#include "models/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/custom_class.h>

#include <optional>

#include "core/error.h"

namespace qf::models {
namespace {

thread_local bool t_recomputing = false;

// Everything the recompute needs besides the saved input: the function, the RNG states the first
// forward started from, and the autocast state it ran under.
struct Segment : torch::CustomClassHolder {
  SegmentFn fn;
  std::vector<at::Tensor> params;  // the trainable tensors fn reads (all require grad)
  at::Tensor cpu_rng;
  std::optional<at::Device> cuda;
  at::Tensor cuda_rng;
  at::DeviceType autocast_dev = at::kCPU;
  bool autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16;
};

// Sets the generators to the segment's saved states; restores the current ones on destruction.
class RngFork {
 public:
  explicit RngFork(const Segment& s) {
    cpu_ = at::detail::getDefaultCPUGenerator();
    cpu_saved_ = cpu_.get_state();
    cpu_.set_state(s.cpu_rng);
    if (s.cuda) {
      cuda_ = at::globalContext().defaultGenerator(*s.cuda);
      cuda_saved_ = cuda_.get_state();
      cuda_.set_state(s.cuda_rng);
    }
  }
  ~RngFork() {
    cpu_.set_state(cpu_saved_);
    if (cuda_.defined()) cuda_.set_state(cuda_saved_);
  }

 private:
  at::Generator cpu_, cuda_;
  at::Tensor cpu_saved_, cuda_saved_;
};

// Applies the segment's autocast state for the recompute (backward may run on another thread,
// whose thread-local autocast state is off), restoring the previous one after.
class AutocastAs {
 public:
  explicit AutocastAs(const Segment& s) : dev_(s.autocast_dev) {
    prev_ = at::autocast::is_autocast_enabled(dev_);
    prev_dtype_ = at::autocast::get_autocast_dtype(dev_);
    at::autocast::set_autocast_enabled(dev_, s.autocast);
    at::autocast::set_autocast_dtype(dev_, s.autocast_dtype);
    if (s.autocast) at::autocast::increment_nesting();
    on_ = s.autocast;
  }
  ~AutocastAs() {
    if (on_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dev_, prev_);
    at::autocast::set_autocast_dtype(dev_, prev_dtype_);
  }

 private:
  at::DeviceType dev_;
  bool prev_ = false, on_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

struct RecomputeFlag {
  bool prev = t_recomputing;
  RecomputeFlag() { t_recomputing = true; }
  ~RecomputeFlag() { t_recomputing = prev; }
};

struct CheckpointFn : torch::autograd::Function<CheckpointFn> {
  // `params` (== seg->params) are inputs only so that autograd routes their gradients through this node.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList /*params*/,
                            c10::intrusive_ptr<Segment> seg) {
    seg->cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
    if (x.is_cuda()) {
      seg->cuda = x.device();
      seg->cuda_rng = at::globalContext().defaultGenerator(x.device()).get_state();
    }
    seg->autocast_dev = x.device().type();
    seg->autocast = at::autocast::is_autocast_enabled(seg->autocast_dev);
    seg->autocast_dtype = at::autocast::get_autocast_dtype(seg->autocast_dev);
    ctx->save_for_backward({x});
    ctx->saved_data["segment"] = c10::IValue::make_capsule(seg);
    return seg->fn(x);  // grad mode is off here: no activation is kept
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto seg = c10::static_intrusive_pointer_cast<Segment>(ctx->saved_data["segment"].toCapsule());
    const auto n_params = static_cast<int64_t>(seg->params.size());  // the forward's `params` list
    auto x = ctx->get_saved_variables()[0];
    auto xd = x.detach().requires_grad_(x.requires_grad());
    at::Tensor y;
    {
      RngFork rng(*seg);
      AutocastAs ac(*seg);
      RecomputeFlag flag;
      at::AutoGradMode grad(true);
      y = seg->fn(xd);
    }
    // Inputs whose gradient backward returns: x (when it needs one) and the trainable params.
    std::vector<at::Tensor> wrt;
    if (xd.requires_grad()) wrt.push_back(xd);
    for (auto& p : seg->params) wrt.push_back(p);
    torch::autograd::variable_list out(2 + n_params);  // x, each param, the segment
    if (wrt.empty() || !grad_out[0].defined() || !y.requires_grad()) return out;
    auto g = torch::autograd::grad({y}, wrt, {grad_out[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    size_t k = 0;
    if (xd.requires_grad()) out[0] = g[k++];
    for (int64_t i = 0; i < n_params; ++i) out[1 + i] = g[k++];
    return out;
  }
};

struct EagerGradFn : torch::autograd::Function<EagerGradFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const SegmentFn& fn) {
    auto xd = x.detach().requires_grad_(true);
    at::Tensor y, g;
    {
      at::AutoGradMode grad(true);
      y = fn(xd);
      QF_CHECK(y.numel() == 1, "scalar_with_eager_grad: fn returned ", y.sizes(), ", expected a scalar");
      g = y.requires_grad() ? torch::autograd::grad({y}, {xd}, {}, false, false, true)[0] : at::Tensor();
    }
    ctx->save_for_backward({g.defined() ? g : at::zeros_like(x)});
    return y.detach();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto g = ctx->get_saved_variables()[0];
    return {grad_out[0].defined() ? g * grad_out[0].to(g.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor scalar_with_eager_grad(SegmentFn fn, const at::Tensor& x) {
  if (!x.requires_grad() || !at::GradMode::is_enabled()) return fn(x);
  return EagerGradFn::apply(x, fn);
}

bool recomputing() { return t_recomputing; }

at::Tensor checkpoint(SegmentFn fn, const at::Tensor& x, const std::vector<at::Tensor>& params) {
  auto seg = c10::make_intrusive<Segment>();
  seg->fn = std::move(fn);
  for (auto& p : params)
    if (p.requires_grad()) seg->params.push_back(p);
  // A copy of the list: Function::apply takes the params as inputs (at::TensorList views it).
  std::vector<at::Tensor> inputs = seg->params;
  return CheckpointFn::apply(x, at::TensorList(inputs), seg);
}

}  // namespace qf::models
