#include "trainer/adamw8bit.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "core/error.h"
#include "quant/nf4.h"

namespace qf::trainer {

namespace {

constexpr int64_t kGrid = 65536;

// Grid point j of [-1, 1] as bitsandbytes' CPU search resolves it: v_j = j / 65535 * 2 - 1 in fp32,
// mapped to the code just below it or the next one when that is strictly nearer.
std::vector<uint8_t> build_grid_codes(const std::array<float, 256>& code) {
  std::vector<uint8_t> out(kGrid);
  for (int64_t j = 0; j < kGrid; ++j) {
    const float v = static_cast<float>(j) / 65535.0f * 2.0f - 1.0f;
    int64_t lo = std::upper_bound(code.begin(), code.end(), v) - code.begin() - 1;
    lo = std::clamp<int64_t>(lo, 0, 255);
    if (lo < 255 && std::fabs(v - code[lo + 1]) < std::fabs(v - code[lo])) ++lo;
    out[j] = static_cast<uint8_t>(lo);
  }
  return out;
}

// The code values and the grid table of one map, as tensors on one device (built once per device).
struct Codebook {
  at::Tensor code;  // fp32 [256]
  at::Tensor grid;  // uint8 [65536]
};

const Codebook& codebook(bool is_signed, const at::Device& device) {
  static std::mutex mu;
  static std::map<std::tuple<bool, int, int>, Codebook> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(is_signed, static_cast<int>(device.type()), static_cast<int>(device.index()));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const auto& map = dynamic_map(is_signed);
  static const std::vector<uint8_t> grid_s = build_grid_codes(dynamic_map(true));
  static const std::vector<uint8_t> grid_u = build_grid_codes(dynamic_map(false));
  const auto& grid = is_signed ? grid_s : grid_u;
  Codebook cb;
  cb.code = at::from_blob(const_cast<float*>(map.data()), {256}, at::kFloat).to(device, /*non_blocking=*/false, /*copy=*/true);
  cb.grid = at::from_blob(const_cast<uint8_t*>(grid.data()), {kGrid}, at::kByte).to(device, false, true);
  return cache.emplace(key, std::move(cb)).first->second;
}

int64_t n_blocks(int64_t n) { return (n + kAdam8BlockSize - 1) / kAdam8BlockSize; }

}  // namespace

const std::array<float, 256>& dynamic_map(bool is_signed) {
  static const std::array<float, 256> s = quant::dynamic_map_signed(), u = quant::dynamic_map_unsigned();
  return is_signed ? s : u;
}

Blockwise8 quantize_blockwise8(const at::Tensor& x, bool is_signed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantize_blockwise8: expected fp32, got ", x.scalar_type());
  const auto flat = x.contiguous().view(-1);
  const int64_t n = flat.numel(), nb = n_blocks(n);
  // A partial last block is padded with zeros, which change neither its absmax nor its other codes.
  const auto blocks = (n % kAdam8BlockSize ? at::constant_pad_nd(flat, {0, nb * kAdam8BlockSize - n}) : flat)
                          .view({nb, kAdam8BlockSize});
  auto absmax = blocks.abs().amax(1);
  // x * (1 / absmax) in fp32, as bitsandbytes' compiled loop computes x / absmax (x / absmax itself
  // differs in the last bit for a few values in a million, enough to change their code); an all-zero block
  // gives 0 * inf = NaN: grid point 0, code 0, as bitsandbytes stores. Then the grid point
  // round((z + 1) / 2 * 65535) in bitsandbytes' fp32 steps.
  auto z = blocks * absmax.reciprocal().unsqueeze(1);
  z.nan_to_num_(-1.0, 1.0, -1.0);
  const auto j = z.add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5).to(at::kInt).view(-1);
  const auto& cb = codebook(is_signed, x.device());
  auto codes = cb.grid.index_select(0, j);
  if (codes.numel() != n) codes = codes.slice(0, 0, n);
  return {codes.view(x.sizes()), absmax};
}

at::Tensor dequantize_blockwise8(const at::Tensor& codes, const at::Tensor& absmax, bool is_signed) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, "dequantize_blockwise8: expected uint8 codes, got ", codes.scalar_type());
  const int64_t n = codes.numel(), full = n / kAdam8BlockSize;
  TORCH_CHECK(absmax.numel() == n_blocks(n), "dequantize_blockwise8: ", n, " codes need ", n_blocks(n),
              " absmax values, got ", absmax.numel());
  const auto& cb = codebook(is_signed, codes.device());
  auto out = cb.code.index_select(0, codes.contiguous().view(-1).to(at::kInt));
  const auto am = absmax.view(-1);
  if (full > 0)
    out.slice(0, 0, full * kAdam8BlockSize).view({full, kAdam8BlockSize}).mul_(am.slice(0, 0, full).unsqueeze(1));
  if (full * kAdam8BlockSize < n) out.slice(0, full * kAdam8BlockSize).mul_(am.slice(0, full));
  return out.view(codes.sizes());
}

AdamW8bit::AdamW8bit(std::vector<torch::optim::OptimizerParamGroup> groups, torch::optim::AdamWOptions defaults)
    : Optimizer(std::move(groups), std::make_unique<torch::optim::AdamWOptions>(defaults)) {
  for (auto& g : param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(g.options());
    TORCH_CHECK(!o.amsgrad(), "AdamW8bit: amsgrad is not supported (bitsandbytes' AdamW8bit refuses it too)");
    TORCH_CHECK(o.lr() >= 0 && o.eps() >= 0 && o.weight_decay() >= 0, "AdamW8bit: negative lr, eps or weight_decay");
    TORCH_CHECK(std::get<0>(o.betas()) >= 0 && std::get<0>(o.betas()) < 1 && std::get<1>(o.betas()) >= 0 &&
                    std::get<1>(o.betas()) < 1,
                "AdamW8bit: betas must lie in [0, 1)");
  }
}

AdamW8bit::AdamW8bit(std::vector<at::Tensor> params, torch::optim::AdamWOptions defaults)
    : AdamW8bit({torch::optim::OptimizerParamGroup(std::move(params))}, defaults) {}

void AdamW8bit::set_chunk_elements(int64_t n) {
  TORCH_CHECK(n > 0 && n % kAdam8BlockSize == 0, "AdamW8bit: chunk of ", n, " elements is not a positive multiple of ",
              kAdam8BlockSize);
  chunk_ = n;
}

at::Tensor AdamW8bit::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode grad(true);
    loss = closure();
  }
  for (auto& g : param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(g.options());
    for (auto& p : g.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = state_[p.unsafeGetTensorImpl()];
      if (!slot) slot = std::make_unique<AdamW8bitParamState>();
      update(p, o, static_cast<AdamW8bitParamState&>(*slot));
    }
  }
  return loss;
}

void AdamW8bit::update(at::Tensor& p, const torch::optim::AdamWOptions& o, AdamW8bitParamState& s) {
  const int64_t n = p.numel();
  if (n == 0) return;
  if (!s.state1().defined()) {  // bitsandbytes' init_state
    const bool eight = n >= kAdam8MinSize;
    const auto dt = p.options().dtype(eight ? at::kByte : at::kFloat);
    s.state1(at::zeros(p.sizes(), dt));
    s.state2(at::zeros(p.sizes(), dt));
    if (eight) {
      s.absmax1(at::zeros({n_blocks(n)}, p.options().dtype(at::kFloat)));
      s.absmax2(at::zeros({n_blocks(n)}, p.options().dtype(at::kFloat)));
    }
  }
  s.step(s.step() + 1);
  const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
  const double lr = o.lr(), eps = o.eps(), wd = o.weight_decay();
  const double step = static_cast<double>(s.step());
  const double c1 = 1.0 - std::pow(beta1, step);
  const double c2 = std::sqrt(1.0 - std::pow(beta2, step));

  // fp32 working copy of the parameter (the parameter itself when it is fp32 and contiguous).
  const bool direct = p.scalar_type() == at::kFloat && p.is_contiguous();
  at::Tensor pf = direct ? p.detach().view(-1) : p.detach().to(at::kFloat).contiguous().view(-1);
  const at::Tensor g = p.grad().detach().to(at::kFloat).contiguous().view(-1);

  if (!s.is_8bit()) {
    // bitsandbytes' 32-bit Adam update (its _optimizer_update_32bit_cpu, max_unorm off).
    auto m = s.state1().view(-1), v = s.state2().view(-1);
    m.mul_(beta1).add_(g, 1.0 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
    const double step_size = -lr * c2 / c1;
    if (wd > 0.0) pf.mul_(1.0 - lr * wd);
    pf.add_(m / (v.sqrt() + eps * c2), step_size * 1.0);
  } else {
    // bitsandbytes' blockwise 8-bit Adam update: dequantize, fp32 Adam with the bias corrections
    // applied to v's root and to the step, decoupled decay, requantize. Chunks of whole blocks.
    auto q1 = s.state1().view(-1), q2 = s.state2().view(-1);
    auto a1 = s.absmax1(), a2 = s.absmax2();
    for (int64_t e0 = 0; e0 < n; e0 += chunk_) {
      const int64_t e1 = std::min(n, e0 + chunk_);
      const int64_t b0 = e0 / kAdam8BlockSize, b1 = n_blocks(e1);
      auto pc = pf.slice(0, e0, e1);
      auto gc = g.slice(0, e0, e1);
      auto m = dequantize_blockwise8(q1.slice(0, e0, e1), a1.slice(0, b0, b1), true);
      auto v = dequantize_blockwise8(q2.slice(0, e0, e1), a2.slice(0, b0, b1), false);
      m.mul_(beta1).add_(gc, 1.0 - beta1);
      v.mul_(beta2).addcmul_(gc, gc, 1.0 - beta2);
      auto denom = (v.sqrt() / c2).add_(eps);
      if (wd > 0.0) pc.mul_(1.0 - lr * wd);
      pc.addcdiv_(m, denom, -lr / c1);
      auto r1 = quantize_blockwise8(m, true);
      auto r2 = quantize_blockwise8(v, false);
      q1.slice(0, e0, e1).copy_(r1.codes);
      q2.slice(0, e0, e1).copy_(r2.codes);
      a1.slice(0, b0, b1).copy_(r1.absmax);
      a2.slice(0, b0, b1).copy_(r2.absmax);
    }
  }
  if (!direct) p.detach().copy_(pf.view(p.sizes()));
}

std::vector<std::pair<std::string, at::Tensor>> adamw8bit_state(const torch::nn::Module& m, AdamW8bit& opt) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto& st = opt.state();
  for (auto& p : m.named_parameters()) {
    auto it = st.find(p.value().unsafeGetTensorImpl());
    if (it == st.end()) continue;
    const auto& s = static_cast<const AdamW8bitParamState&>(*it->second);
    if (!s.state1().defined()) continue;  // a parameter with no elements
    out.emplace_back("state1/" + p.key(), s.state1());
    out.emplace_back("state2/" + p.key(), s.state2());
    if (s.is_8bit()) {
      out.emplace_back("absmax1/" + p.key(), s.absmax1());
      out.emplace_back("absmax2/" + p.key(), s.absmax2());
    }
    out.emplace_back("step/" + p.key(), at::scalar_tensor(s.step(), at::kLong));
  }
  return out;
}

void load_adamw8bit_state(const torch::nn::Module& m, AdamW8bit& opt,
                          const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& origin,
                          const std::string& advice) {
  static const std::set<std::string> kinds{"state1", "state2", "absmax1", "absmax2", "step"};
  std::map<std::string, at::Tensor> trainable;
  for (auto& p : m.named_parameters())
    if (p.value().requires_grad()) trainable[p.key()] = p.value();
  std::map<std::string, std::map<std::string, at::Tensor>> by;  // parameter -> kind -> tensor
  for (auto& [k, t] : state) {
    const auto slash = k.find('/');
    const std::string kind = k.substr(0, slash), name = slash == std::string::npos ? "" : k.substr(slash + 1);
    QF_CHECK_INPUT(kinds.count(kind), origin, ": entry '", k,
                   "' is not 8-bit AdamW state (state1/, state2/, absmax1/, absmax2/ or step/<parameter>)", advice);
    QF_CHECK_INPUT(trainable.count(name), origin, ": holds optimizer state for '", name,
                   "', which is not a trainable parameter of this model", advice);
    by[name][kind] = t;
  }
  std::set<const void*> mine;  // under data parallel an optimizer may hold a share of the parameters
  for (auto& g : opt.param_groups())
    for (auto& p : g.params()) mine.insert(p.unsafeGetTensorImpl());
  auto& st = opt.state();
  for (auto& [name, e] : by) {
    const auto& p = trainable[name];
    const int64_t n = p.numel();
    const bool eight = n >= kAdam8MinSize;
    for (const char* k : {"state1", "state2", "step"})
      QF_CHECK_INPUT(e.count(k), origin, ": incomplete optimizer state for '", name, "': no ", k, "/", name,
                     " (state1/, state2/ and step/ go together)", advice);
    QF_CHECK_INPUT(e["step"].numel() == 1, origin, ": 'step/", name, "' has shape ", e["step"].sizes(),
                   ", expected a scalar step count", advice);
    const auto want = eight ? at::kByte : at::kFloat;
    for (const char* k : {"state1", "state2"}) {
      const auto& t = e[k];
      QF_CHECK_INPUT(t.sizes() == p.sizes(), origin, ": optimizer state '", k, "/", name, "' has shape ", t.sizes(),
                     " but parameter '", name, "' has shape ", p.sizes(), advice);
      QF_CHECK_INPUT(t.scalar_type() == want, origin, ": optimizer state '", k, "/", name, "' is ", t.scalar_type(),
                     " but parameter '", name, "' has ", n, " elements, so its state is ",
                     eight ? "8-bit (uint8 codes, >= 4096 elements)" : "fp32 (< 4096 elements)", advice);
    }
    for (const char* k : {"absmax1", "absmax2"}) {
      if (!eight) {
        QF_CHECK_INPUT(!e.count(k), origin, ": '", k, "/", name, "' given for parameter '", name, "' of ", n,
                       " elements, whose state is fp32 (< 4096 elements)", advice);
        continue;
      }
      QF_CHECK_INPUT(e.count(k), origin, ": incomplete 8-bit optimizer state for '", name, "': no ", k, "/", name, advice);
      const auto& t = e[k];
      QF_CHECK_INPUT(t.dim() == 1 && t.numel() == n_blocks(n) && t.scalar_type() == at::kFloat, origin, ": '", k, "/",
                     name, "' is ", t.scalar_type(), " ", t.sizes(), ", expected fp32 [", n_blocks(n),
                     "] (one absmax per 256 elements)", advice);
    }
    if (!mine.count(p.unsafeGetTensorImpl())) continue;
    auto s = std::make_unique<AdamW8bitParamState>();
    s->step(e["step"].item<int64_t>());
    s->state1(e["state1"].to(p.device()).clone());
    s->state2(e["state2"].to(p.device()).clone());
    if (eight) {
      s->absmax1(e["absmax1"].to(p.device()).clone());
      s->absmax2(e["absmax2"].to(p.device()).clone());
    }
    st[p.unsafeGetTensorImpl()] = std::move(s);
  }
}

}  // namespace qf::trainer
