// Fake quantization with straight-through estimators.
// Invariant: forward = dequant(quant(x)) exactly as convert() and the exporters will store it;
// backward = upstream gradient * clipping mask (values that fell outside [qmin, qmax] get none).
// LSQ / LSQ+ make the scale (and offset) learnable with the papers' gradients and grad scaling.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <string>

#include "core/config.h"
#include "quant/affine.h"
#include "quant/spec.h"

namespace qf::quant {

// dequant(quant(x)) with a clipped straight-through gradient (no learned parameters).
at::Tensor fake_quant_ste(const at::Tensor& x, const QuantSpec& spec);
// Plain fake quant values (no autograd) for weights or activations; ggml rules, affine, fp8.
at::Tensor fake_quant_values(const at::Tensor& x, const QuantSpec& spec);

// LSQ: y = clamp(round(x/s), qmin, qmax) * s (LSQ+: on x - beta, plus beta). s, beta have shape
// [rows, n_blocks] of x viewed as [rows, n_blocks, block]. Gradients: d/dx = inside mask;
// d/ds = (round(v) - v) inside, qmin/qmax outside; d/dbeta = outside mask; both scaled by
// grad_scale = 1/sqrt(block * qmax) (Esser et al. 2020; Bhalgat et al. 2020).
at::Tensor lsq_fake_quant(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& beta, int64_t qmin,
                          int64_t qmax, int64_t block);

enum class ObserverType { Dynamic, MinMax, MovingAverage, Mse, Percentile };
const cfg::Names<ObserverType>& observer_type_names();  // quant.observer.type

struct ObserverConfig {
  ObserverType type = ObserverType::Dynamic;  // dynamic: qparams from the current tensor every forward
  double averaging_constant = 0.01;            // moving-average min-max
  double percentile = 99.99;                   // percentile observer (of |x| per block)
  int64_t freeze_after = 0;                    // steps after which statistics stop updating (0 = never)
  static ObserverConfig from_config(cfg::Reader& r);
  YAML::Node to_yaml() const;  // what from_config reads back as this
};

// Data parallel: each forward's observed activation statistics (min, max per block) are combined
// across ranks before they are folded in, so every rank quantizes identically. `exact` is true for
// min-max and moving-average observers, whose statistics of the global batch are the min of the
// ranks' mins and the max of their maxes (then equal to one process's); mse/percentile statistics
// are averaged instead. The trainer installs it for a distributed run; null = one process.
using StatSync = std::function<void(at::Tensor& mn, at::Tensor& mx, bool exact)>;
void set_observer_sync(StatSync f);

// One quantizer for one tensor (a weight or a Linear's input activation).
class FakeQuantizer : public torch::nn::Module {
 public:
  FakeQuantizer(QuantSpec spec, ObserverConfig obs, bool is_activation);
  at::Tensor forward(const at::Tensor& x);
  // Creates learned parameters (LSQ) and observer buffers for a weight, eagerly (before the
  // optimizer is built and before a checkpoint is loaded into them).
  void initialize(const at::Tensor& x);
  void set_step(int64_t step, int64_t enable_after);
  bool enabled() const { return enabled_; }
  const QuantSpec& spec() const { return spec_; }
  // qparams that the next forward / convert uses for x (learned, observed or computed from x).
  QParams qparams_for(const at::Tensor& x);
  void pretty_print(std::ostream& s) const override;

  at::Tensor scale, beta;          // LSQ parameters (undefined unless learned)
  at::Tensor obs_min, obs_max;     // observer statistics (undefined unless a static observer)
  at::Tensor obs_n;                // number of observations folded in (int64 scalar)

 private:
  void observe(const at::Tensor& x);
  QuantSpec spec_;
  ObserverConfig obs_;
  bool is_activation_;
  bool enabled_ = true;
  bool frozen_ = false;
};

}  // namespace qf::quant
