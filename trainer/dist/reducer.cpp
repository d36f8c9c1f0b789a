#include "trainer/dist/reducer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <chrono>
#include <numeric>

namespace qf::trainer::dist {

namespace {
struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(GradReducer* r, size_t i) : r_(r), i_(i) {}
  void operator()(const torch::autograd::Variable&) override { r_->ready(i_); }
  GradReducer* r_;
  size_t i_;
};
}  // namespace

std::vector<int> partition(const std::vector<at::Tensor>& params, int64_t world) {
  std::vector<int64_t> load(static_cast<size_t>(world), 0);
  std::vector<int> owner;
  owner.reserve(params.size());
  for (auto& p : params) {
    const auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    load[r] += p.numel();
    owner.push_back(static_cast<int>(r));
  }
  return owner;
}

GradReducer::GradReducer(c10::intrusive_ptr<c10d::Backend> pg, Env env, std::vector<at::Tensor> params,
                         ReducerOptions opts, std::vector<int> owner)
    : pg_(std::move(pg)), env_(std::move(env)), params_(std::move(params)), opts_(opts), owner_(std::move(owner)) {
  QF_CHECK(!opts_.to_owner || owner_.size() == params_.size(), "GradReducer: to_owner needs an owner per parameter");
  // DDP's initial order: the reverse of registration, roughly the order backward produces gradients.
  std::vector<size_t> order(params_.size());
  std::iota(order.rbegin(), order.rend(), size_t{0});
  build(order);
  for (size_t i = 0; i < params_.size(); ++i)
    torch::autograd::impl::set_post_acc_grad_hooks(params_[i], std::make_unique<ReadyHook>(this, i));
}

GradReducer::~GradReducer() {
  for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradReducer::build(const std::vector<size_t>& order) {
  buckets_.clear();
  bucket_of_.assign(params_.size(), 0);
  int64_t bytes = 0;
  for (size_t i : order) {
    const auto& p = params_[i];
    const int64_t cap = buckets_.size() <= 1 ? opts_.first_bucket_bytes : opts_.bucket_bytes;
    const bool new_bucket = buckets_.empty() || bytes >= cap ||
                            params_[buckets_.back().front()].scalar_type() != p.scalar_type() ||
                            params_[buckets_.back().front()].device() != p.device();
    if (new_bucket) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().push_back(i);
    bucket_of_[i] = buckets_.size() - 1;
    bytes += p.numel() * p.element_size();
  }
}

void GradReducer::begin_backward(bool sync) {
  sync_ = sync;
  if (!sync) return;
  pending_.assign(buckets_.size(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = static_cast<int64_t>(buckets_[b].size());
  launched_.assign(buckets_.size(), 0);
  next_ = 0;
  ready_order_.clear();
}

void GradReducer::ready(size_t i) {
  if (!sync_) return;  // accumulation micro-step: the gradient stays local
  if (!rebuilt_) ready_order_.push_back(i);
  const size_t b = bucket_of_[i];
  if (--pending_[b] > 0 || !opts_.overlap) return;
  while (next_ < buckets_.size() && pending_[next_] == 0) {
    launch(next_++);
    ++stats_.launched_in_backward;
  }
}

void GradReducer::launch(size_t b) {
  launched_[b] = 1;
  InFlight f;
  f.bucket = b;
  for (size_t i : buckets_[b])
    if (params_[i].grad().defined()) f.params.push_back(i);
  if (f.params.empty()) return;  // every parameter of the bucket unused this step (same on every rank)
  // One flat buffer per destination: all-reduce -> one; ZeRO-2 -> one per owning rank.
  std::vector<int> dests;
  for (size_t i : f.params) {
    const int d = opts_.to_owner ? owner_[i] : -1;
    if (std::find(dests.begin(), dests.end(), d) == dests.end()) dests.push_back(d);
  }
  for (int d : dests) {
    std::vector<at::Tensor> views;
    for (size_t i : f.params)
      if ((opts_.to_owner ? owner_[i] : -1) == d) views.push_back(params_[i].grad().reshape({-1}));
    std::vector<at::Tensor> buf{at::cat(views, 0)};
    stats_.bytes += buf[0].numel() * buf[0].element_size();
    ++stats_.collectives;
    if (d < 0) {
      f.works.push_back(pg_->allreduce(buf));
    } else {
      c10d::ReduceOptions ro;
      ro.rootRank = d;
      f.works.push_back(pg_->reduce(buf, ro));
    }
    f.parts.emplace_back(d, buf[0]);
  }
  if (opts_.to_owner) {
    // The sum of a gradient this rank does not own is another rank's business: drop it now.
    for (size_t i : f.params)
      if (owner_[i] != env_.rank) params_[i].mutable_grad().reset();
  }
  inflight_.push_back(std::move(f));
  // ZeRO-2 bounds the gradient memory: at most two buckets' buffers in flight.
  if (opts_.to_owner && inflight_.size() > 2) {
    complete(inflight_.front());
    inflight_.erase(inflight_.begin());
  }
}

void GradReducer::complete(InFlight& f) {
  for (auto& w : f.works) w->wait();
  for (auto& [d, buf] : f.parts) {
    if (d >= 0 && d != env_.rank) continue;  // a reduce's result lives on its root only
    int64_t off = 0;
    for (size_t i : f.params) {
      if ((opts_.to_owner ? owner_[i] : -1) != d) continue;
      auto g = params_[i].mutable_grad();
      g.copy_(buf.slice(0, off, off + g.numel()).view(g.sizes()));
      off += g.numel();
    }
  }
}

void GradReducer::finish(int64_t step) {
  const auto t0 = std::chrono::steady_clock::now();
  collective(env_, step, "gradient all-reduce", [&] {
    for (size_t b = 0; b < buckets_.size(); ++b)
      if (!launched_[b]) launch(b);  // unused parameters held the bucket back, or overlap is off
    for (auto& f : inflight_) complete(f);
  });
  inflight_.clear();
  sync_ = false;
  stats_.exposed_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++stats_.steps;
  if (!rebuilt_) {
    // DDP rebuilds its buckets once, in the order gradients actually arrived; rank 0's order wins
    // so every rank issues identical collectives.
    rebuilt_ = true;
    std::vector<size_t> order = ready_order_;
    for (size_t i = params_.size(); i-- > 0;)
      if (std::find(order.begin(), order.end(), i) == order.end()) order.push_back(i);
    std::vector<at::Tensor> t{at::empty({static_cast<int64_t>(order.size())}, at::kLong)};
    for (size_t k = 0; k < order.size(); ++k) t[0][static_cast<int64_t>(k)] = static_cast<int64_t>(order[k]);
    if (params_.front().is_cuda()) t[0] = t[0].cuda();
    collective(env_, step, "bucket order broadcast", [&] { pg_->broadcast(t, c10d::BroadcastOptions{0})->wait(); });
    auto cpu = t[0].cpu();
    for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<size_t>(cpu[static_cast<int64_t>(k)].item<int64_t>());
    build(order);
  }
}

}  // namespace qf::trainer::dist
