#include "trainer/evaluate.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "models/checkpoint.h"

namespace qf::trainer {

namespace {

// RAII bf16 autocast, mirroring torch.autocast's enter/exit (thread-local state).
class AutocastGuard {
 public:
  AutocastGuard(bool on, at::DeviceType dev) : on_(on), dev_(dev) {
    if (!on_) return;
    prev_ = at::autocast::is_autocast_enabled(dev_);
    prev_dtype_ = at::autocast::get_autocast_dtype(dev_);
    at::autocast::set_autocast_enabled(dev_, true);
    at::autocast::set_autocast_dtype(dev_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dev_, prev_);
    at::autocast::set_autocast_dtype(dev_, prev_dtype_);
  }

 private:
  bool on_, prev_ = false;
  at::DeviceType dev_;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

}  // namespace

at::Tensor eval_hidden(models::CausalLM& m, const at::Tensor& ids, at::Device dev, bool bf16) {
  AutocastGuard ag(bf16, dev.type());
  return m.hidden(ids.to(dev));
}

at::Tensor eval_logits(models::CausalLM& m, const at::Tensor& h, at::Device dev, bool bf16) {
  at::Tensor l;
  {
    AutocastGuard ag(bf16, dev.type());
    l = m.logits(h);
  }
  return l.to(at::kFloat);
}

int64_t loss_chunk_rows(int64_t setting, int64_t vocab) {
  if (setting >= 0) return setting;
  return std::max<int64_t>(64, (int64_t{1} << 25) / std::max<int64_t>(1, vocab));
}

at::Tensor token_loss_sum(models::CausalLM& m, const data::Batch& b, at::Device dev, bool bf16, int64_t chunk_tokens) {
  auto ids = b.input_ids.to(dev);
  at::Tensor h;
  {
    AutocastGuard ag(bf16, dev.type());
    h = m.hidden(ids);
  }
  return hidden_loss_sum(m, h, b.labels, dev, bf16, chunk_tokens);
}

at::Tensor hidden_loss_sum(models::CausalLM& m, at::Tensor h, const at::Tensor& batch_labels, at::Device dev, bool bf16,
                           int64_t chunk_tokens, const DistillTarget* kd) {
  auto labels = batch_labels.to(dev).reshape({-1});
  const int64_t N = labels.numel(), chunk = loss_chunk_rows(chunk_tokens, m.cfg.vocab_size);
  at::Tensor th;  // the teacher's hidden rows
  if (kd) {
    th = kd->hidden.reshape({N, kd->hidden.size(-1)});
    QF_CHECK(kd->teacher->cfg.vocab_size == m.cfg.vocab_size, "distill: the teacher's vocabulary (",
             kd->teacher->cfg.vocab_size, ") differs from the student's (", m.cfg.vocab_size, ")");
  }
  // The loss of rows [s, e) of hidden states against their labels: the output layer under the
  // forward's autocast, the cross-entropy (and the distillation term) in fp32 outside it.
  auto rows_loss = [&m, bf16, dev, kd, th](const at::Tensor& h, const at::Tensor& lab, int64_t s, int64_t e) {
    at::Tensor logits;
    {
      AutocastGuard ag(bf16, dev.type());
      logits = m.logits(h);
    }
    const int64_t V = logits.size(-1);
    logits = logits.reshape({-1, V}).to(at::kFloat);
    if (!kd) return at::cross_entropy_loss(logits, lab, {}, at::Reduction::Sum, -100);
    const double T = kd->temperature;
    at::Tensor log_pt;
    {
      at::NoGradGuard ng;
      at::Tensor tl;
      {
        AutocastGuard ag(bf16, dev.type());
        tl = kd->teacher->logits(th.slice(0, s, e));
      }
      log_pt = at::log_softmax(tl.reshape({-1, V}).to(at::kFloat) / T, -1);
    }
    auto log_ps = at::log_softmax(logits / T, -1);
    auto kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1);  // KL(teacher || student) per row
    auto loss = (kl_rows * (lab != -100).to(at::kFloat)).sum() * (kd->kd_weight * T * T);
    if (kd->ce_weight > 0)
      loss = loss + at::cross_entropy_loss(logits, lab, {}, at::Reduction::Sum, -100) * kd->ce_weight;
    return loss;
  };
  h = h.reshape({N, h.size(-1)});
  if (chunk == 0 || chunk >= N) return rows_loss(h, labels, 0, N);
  // Chunked: at most `chunk` rows of logits exist at a time. In a training forward each chunk is
  // checkpointed over the output layer's trainable parameters, so backward recomputes one chunk's
  // logits at a time instead of keeping them all; over a frozen output layer the chunk's gradient
  // is computed in the forward instead (no recompute).
  std::vector<at::Tensor> head_params;
  for (auto& p : m.head_module().parameters())
    if (p.requires_grad()) head_params.push_back(p);
  const bool grad = at::GradMode::is_enabled() && (h.requires_grad() || !head_params.empty());
  auto labelled = (labels != -100).to(at::kLong).cumsum(0).cpu();  // labelled rows before each end
  const int64_t* cum = labelled.data_ptr<int64_t>();
  at::Tensor total;
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t e = std::min(N, s + chunk);
    if (cum[e - 1] == (s > 0 ? cum[s - 1] : 0)) continue;  // no labelled row: adds nothing
    auto lab = labels.slice(0, s, e);
    auto hc = h.slice(0, s, e);
    auto fn = [rows_loss, lab, s, e](const at::Tensor& x) { return rows_loss(x, lab, s, e); };
    // A frozen output layer (LoRA, QLoRA): the chunk's gradient is taken right away, no recompute.
    auto l = !grad ? fn(hc) : head_params.empty() ? models::scalar_with_eager_grad(fn, hc) : models::checkpoint(fn, hc, head_params);
    total = total.defined() ? total + l : l;
  }
  return total.defined() ? total : rows_loss(h.slice(0, 0, 0), labels.slice(0, 0, 0), 0, 0);
}

EvalResult evaluate_model(models::CausalLM& m, const data::PackedSet& set, int64_t bs, int64_t max_batches,
                          at::Device dev, bool bf16, const EvalShard& shard) {
  EvalResult r;
  if (set.size() == 0) return r;
  at::NoGradGuard ng;
  bool was = m.is_training();
  m.eval();
  // Sharded only when every rank gets sequences of the first batch (observers may sync on it).
  const int64_t world = shard.world > 1 && set.size() >= shard.world ? shard.world : 1;
  const int64_t gb = bs * world;
  double sum = 0, tokens = 0;
  int64_t nb = (set.size() + gb - 1) / gb;
  if (max_batches > 0) nb = std::min(nb, max_batches);
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t lo = i * gb, len = std::min(set.size(), lo + gb) - lo;
    const int64_t r = world > 1 ? shard.rank : 0;
    std::vector<int64_t> idx;
    for (int64_t j = lo + r * len / world; j < lo + (r + 1) * len / world; ++j) idx.push_back(j);
    if (idx.empty()) continue;
    auto b = data::make_batch(set, idx);
    sum += token_loss_sum(m, b, dev, bf16, -1).item<double>();
    tokens += static_cast<double>((b.labels != -100).sum().item<int64_t>());
  }
  if (world > 1) shard.sum(sum, tokens);
  if (was) m.train();
  r.tokens = static_cast<int64_t>(tokens);
  r.loss = r.tokens ? sum / tokens : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

}  // namespace qf::trainer

namespace qf::trainer {

LayerwiseEval::LayerwiseEval(models::CausalLM& m, const data::PackedSet& set, int64_t bs, at::Device dev, bool bf16,
                             int64_t max_batches)
    : m_(m), dev_(dev), bf16_(bf16) {
  at::NoGradGuard ng;
  for (int64_t lo = 0; lo < set.size() && (max_batches <= 0 || lo < max_batches * bs); lo += bs) {
    std::vector<int64_t> idx;
    for (int64_t j = lo; j < std::min(set.size(), lo + bs); ++j) idx.push_back(j);
    auto b = data::make_batch(set, idx);
    labels_.push_back(b.labels);
    AutocastGuard ag(bf16_, dev_.type());
    h_.push_back(m_.embed(b.input_ids.to(dev_)));
  }
}

void LayerwiseEval::advance(int64_t i) {
  at::NoGradGuard ng;
  AutocastGuard ag(bf16_, dev_.type());
  for (auto& h : h_) h = m_.layer_forward(i, h);
}

int64_t LayerwiseEval::bytes() const {
  int64_t n = 0;
  for (auto& h : h_) n += h.numel() * h.element_size();
  return n;
}

EvalResult LayerwiseEval::finish() {
  at::NoGradGuard ng;
  double sum = 0, tokens = 0;
  for (size_t k = 0; k < h_.size(); ++k) {
    at::Tensor h;
    {
      AutocastGuard ag(bf16_, dev_.type());
      h = m_.head_input(h_[k]);
    }
    h_[k] = at::Tensor();
    sum += hidden_loss_sum(m_, h, labels_[k], dev_, bf16_, -1).item<double>();
    tokens += static_cast<double>((labels_[k] != -100).sum().item<int64_t>());
  }
  h_.clear();
  EvalResult r;
  r.tokens = static_cast<int64_t>(tokens);
  r.loss = r.tokens ? sum / tokens : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

}  // namespace qf::trainer
