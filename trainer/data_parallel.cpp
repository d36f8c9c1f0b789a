#include "trainer/data_parallel.h"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>

#include <chrono>
#include <cmath>
#include <map>

#include "core/log.h"
#include "quant/fake_quant.h"
#include "trainer/checkpoint.h"

namespace qf::trainer {

using dist::collective;

namespace {
at::Tensor flatten(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> v;
  for (auto& t : ts) v.push_back(t.detach().reshape({-1}));
  return at::cat(v, 0);
}
}  // namespace

at::Device local_rank_device(const dist::Env& env, at::Device device) {
  if (!env.distributed() || !device.is_cuda()) return device;
  const auto n = static_cast<int64_t>(torch::cuda::device_count());
  QF_CHECK_INPUT(env.local_rank < n, "data parallel: LOCAL_RANK=", env.local_rank, " but this node has ", n,
                 " CUDA devices; start one rank per GPU (--nproc-per-node ", n, ")");
  const at::Device d(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  c10::impl::getDeviceGuardImpl(at::kCUDA)->setDevice(d);
  return d;
}

DataParallel::DataParallel(c10::intrusive_ptr<c10d::Backend> pg, dist::Env env, at::Device device, DistConfig cfg)
    : pg_(std::move(pg)), env_(std::move(env)), device_(device), cfg_(cfg) {
  QF_CHECK(pg_ || env_.world_size == 1, "DataParallel: a world of ", env_.world_size, " needs a process group");
}

DataParallel::~DataParallel() { stop_observer_sync(); }

std::unique_ptr<DataParallel> DataParallel::connect(const dist::Env& env, at::Device device, const DistConfig& cfg) {
  c10::intrusive_ptr<c10d::Backend> pg;
  if (env.distributed()) {
    auto kind = cfg.backend;
    if (kind == dist::BackendKind::Auto) kind = device.is_cuda() ? dist::BackendKind::Nccl : dist::BackendKind::Gloo;
    QF_CHECK_INPUT(kind != dist::BackendKind::Nccl || device.is_cuda() || !torch::cuda::is_available(),
                   "dist.backend: nccl reduces CUDA tensors but trainer.device is cpu; use gloo or trainer.device=cuda");
    pg = dist::init_backend(env, kind, std::chrono::milliseconds(static_cast<int64_t>(cfg.timeout_s * 1000)));
    log::info("data parallel: ", env.world_size, " ranks (", env.source, " environment), ", pg->getBackendName(),
              ", rendezvous at ", env.master_addr, ":", env.master_port);
  }
  return std::make_unique<DataParallel>(pg, env, device, cfg);
}

void DataParallel::broadcast_model(const std::vector<at::Tensor>& params, const std::string& config_hash, int64_t step) {
  if (!pg_) return;
  at::NoGradGuard ng;
  // The same recipe on every rank, or the group is not training one model.
  const auto h = static_cast<int64_t>(std::stoull(config_hash, nullptr, 16));
  std::vector<at::Tensor> hv{at::full({1}, h, at::TensorOptions().dtype(at::kLong).device(device_))};
  collective(env_, step, "config check", [&] { pg_->broadcast(hv, c10d::BroadcastOptions{0})->wait(); });
  QF_CHECK_INPUT(hv[0].item<int64_t>() == h, "data parallel: rank ", env_.rank, "'s resolved config (hash ", config_hash,
                 ") differs from rank 0's; every rank must run the same recipe with the same overrides");
  for (auto& p : params) {
    std::vector<at::Tensor> v{p.data()};
    collective(env_, step, "parameter broadcast", [&] { pg_->broadcast(v, c10d::BroadcastOptions{0})->wait(); });
  }
}

void DataParallel::attach(std::vector<at::Tensor> trainable) {
  QF_CHECK(trainable_.empty() && !reducer_, "DataParallel::attach: called twice");
  trainable_ = std::move(trainable);
  if (!pg_) {
    if (cfg_.zero > 0)
      log::info("dist.zero: ", cfg_.zero, " has nothing to shard in a single process; the optimizer is not sharded");
    return;
  }
  zero_ = cfg_.zero;
  if (zero_ > 0) {
    owner_ = dist::partition(trainable_, env_.world_size);
    for (auto& p : trainable_)  // the parameter all-gather moves one flat buffer per owner
      QF_CHECK_INPUT(p.scalar_type() == trainable_[0].scalar_type(), "dist.zero: ", zero_,
                     " needs every trainable parameter in one dtype; found ", trainable_[0].scalar_type(), " and ",
                     p.scalar_type(), " (use dist.zero=0)");
  }
  dist::ReducerOptions ro;
  ro.bucket_bytes = static_cast<int64_t>(cfg_.bucket_mb * (1 << 20));
  ro.first_bucket_bytes = static_cast<int64_t>(cfg_.first_bucket_mb * (1 << 20));
  ro.overlap = cfg_.overlap;
  ro.to_owner = zero_ == 2;
  if (!trainable_.empty())
    reducer_ = std::make_unique<dist::GradReducer>(pg_, env_, trainable_, ro, ro.to_owner ? owner_ : std::vector<int>{});
  if (zero_ > 0) {
    int64_t mine = 0, all = 0;
    for (size_t i = 0; i < trainable_.size(); ++i) {
      all += trainable_[i].numel();
      mine += owns(i) ? trainable_[i].numel() : 0;
    }
    log::info("ZeRO-", zero_, ": rank ", env_.rank, " holds optimizer state for ", mine, " of ", all, " trainable elements (",
              env_.world_size, " shards)", zero_ == 2 ? "; gradients are reduced to their owners" : "");
  }
}

std::vector<at::Tensor> DataParallel::owned() const {
  std::vector<at::Tensor> v;
  for (size_t i = 0; i < trainable_.size(); ++i)
    if (owns(i)) v.push_back(trainable_[i]);
  return v;
}

int64_t DataParallel::grad_bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < trainable_.size(); ++i)  // ZeRO-2 keeps only its own gradients
    if (zero_ < 2 || owns(i)) n += trainable_[i].numel() * trainable_[i].element_size();
  return n;
}

void DataParallel::begin_backward(bool sync) {
  if (reducer_) reducer_->begin_backward(sync);
}

void DataParallel::finish_backward(int64_t step) {
  if (reducer_) reducer_->finish(step);
}

double DataParallel::clip_grad_norm(double max_norm, int64_t step) {
  if (zero_ == 2) return clip_sharded_grads(max_norm, step);
  return torch::nn::utils::clip_grad_norm_(trainable_, max_norm);
}

double DataParallel::clip_sharded_grads(double max_norm, int64_t step) {
  // torch's clip_grad_norm_: total = ||(||g_i||)_i||, coefficient max/(total + 1e-6) clamped to 1.
  double sq = 0;
  for (size_t i = 0; i < trainable_.size(); ++i)
    if (owns(i) && trainable_[i].grad().defined()) sq += trainable_[i].grad().to(at::kDouble).pow(2).sum().item<double>();
  const double total = std::sqrt(allreduce_sum(sq, step));
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    at::NoGradGuard ng;
    for (size_t i = 0; i < trainable_.size(); ++i)
      if (owns(i) && trainable_[i].grad().defined()) trainable_[i].mutable_grad().mul_(coef);
  }
  return total;
}

void DataParallel::sync_params(int64_t step) {
  if (zero_ == 0) return;
  // All-gather of the updated shards, as one broadcast per owner of its flattened parameters.
  at::NoGradGuard ng;
  for (int64_t r = 0; r < env_.world_size; ++r) {
    std::vector<at::Tensor> mine;
    int64_t n = 0;
    for (size_t i = 0; i < trainable_.size(); ++i)
      if (owner_[i] == r) {
        mine.push_back(trainable_[i]);
        n += trainable_[i].numel();
      }
    if (mine.empty()) continue;
    std::vector<at::Tensor> flat{r == env_.rank ? flatten(mine) : at::empty({n}, mine[0].options())};
    collective(env_, step, "parameter all-gather", [&] { pg_->broadcast(flat, c10d::BroadcastOptions{r})->wait(); });
    if (r == env_.rank) continue;
    int64_t off = 0;
    for (auto& p : mine) {
      p.detach().copy_(flat[0].slice(0, off, off + p.numel()).view(p.sizes()));
      off += p.numel();
    }
  }
}

models::NamedTensors DataParallel::gather_optimizer_state(const torch::nn::Module& model, torch::optim::Optimizer& opt,
                                                          int64_t step) {
  auto local = optimizer_state(model, opt);
  if (zero_ == 0) return local;
  QF_CHECK(dynamic_cast<torch::optim::AdamW*>(&opt), "DataParallel::gather_optimizer_state: ZeRO shards AdamW state only");
  // Each parameter's AdamW state goes from its owner to rank 0 (a flag first: a parameter that
  // never received a gradient has none).
  std::map<std::string, at::Tensor> by(local.begin(), local.end());
  std::vector<std::string> names;
  for (auto& p : model.named_parameters())
    if (p.value().requires_grad()) names.push_back(p.key());
  QF_CHECK(names.size() == trainable_.size(), "DataParallel::gather_optimizer_state: the model trains ", names.size(),
           " parameters but ", trainable_.size(), " were attached");
  const bool rank0 = env_.rank == 0;
  models::NamedTensors out;
  int tag = 0;
  for (size_t i = 0; i < trainable_.size(); ++i, tag += 4) {
    const int o = owner_[i];
    const std::string keys[3] = {"exp_avg/" + names[i], "exp_avg_sq/" + names[i], "step/" + names[i]};
    if (o == 0) {
      if (rank0 && by.count(keys[0]))
        for (auto& k : keys) out.emplace_back(k, by[k]);
      continue;
    }
    if (env_.rank != o && !rank0) continue;
    collective(env_, step, "optimizer state gather", [&] {
      const auto on = at::TensorOptions().device(trainable_[i].device());  // NCCL sends device tensors
      std::vector<at::Tensor> flag{at::full({1}, env_.rank == o ? int64_t(by.count(keys[0])) : 0, on.dtype(at::kLong))};
      if (env_.rank == o) {
        pg_->send(flag, 0, tag)->wait();
        if (!by.count(keys[0])) return;
        for (int k = 0; k < 3; ++k) {
          std::vector<at::Tensor> v{by[keys[k]].to(on.device()).contiguous()};
          pg_->send(v, 0, tag + 1 + k)->wait();
        }
        return;
      }
      pg_->recv(flag, o, tag)->wait();
      if (flag[0].item<int64_t>() == 0) return;
      const auto& p = trainable_[i];
      std::vector<at::Tensor> v[3] = {{at::empty_like(p.detach())}, {at::empty_like(p.detach())}, {at::empty({}, on.dtype(at::kLong))}};
      for (int k = 0; k < 3; ++k) {
        pg_->recv(v[k], o, tag + 1 + k)->wait();
        out.emplace_back(keys[k], k == 2 ? v[k][0].cpu() : v[k][0]);
      }
    });
  }
  return out;
}

std::vector<double> DataParallel::allreduce_sums(std::vector<double> v, const char* what, int64_t step) {
  if (!pg_) return v;
  std::vector<at::Tensor> t{at::tensor(v, at::kDouble).to(device_)};  // NCCL reduces device tensors
  collective(env_, step, what, [&] { pg_->allreduce(t)->wait(); });
  auto h = t[0].cpu();
  for (size_t i = 0; i < v.size(); ++i) v[i] = h[static_cast<int64_t>(i)].item<double>();
  return v;
}

void DataParallel::barrier(int64_t step) {
  if (pg_) collective(env_, step, "barrier", [&] { pg_->barrier()->wait(); });
}

void DataParallel::sync_observer(at::Tensor& mn, at::Tensor& mx, bool exact, int64_t step) {
  if (!pg_) return;
  std::vector<at::Tensor> a{mn}, b{mx};
  collective(env_, step, "observer statistics all-reduce", [&] {
    pg_->allreduce(a, c10d::AllreduceOptions{exact ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM})->wait();
    pg_->allreduce(b, c10d::AllreduceOptions{exact ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM})->wait();
  });
  if (!exact) {
    mn.div_(static_cast<double>(env_.world_size));
    mx.div_(static_cast<double>(env_.world_size));
  }
}

void DataParallel::start_observer_sync(std::function<int64_t()> step) {
  if (!pg_) return;
  quant::set_observer_sync([this, step = std::move(step)](at::Tensor& mn, at::Tensor& mx, bool exact) {
    sync_observer(mn, mx, exact, step());
  });
  observer_sync_ = true;
}

void DataParallel::stop_observer_sync() {
  if (observer_sync_) quant::set_observer_sync(nullptr);
  observer_sync_ = false;
}

nlohmann::json DataParallel::summary() const {
  if (!pg_) return nlohmann::json::object();
  const auto st = reducer_ ? reducer_->stats() : dist::ReducerStats{};
  const double n = static_cast<double>(std::max<int64_t>(1, st.steps));
  return {{"world_size", env_.world_size},
          {"backend", pg_->getBackendName()},
          {"zero", zero_},
          {"overlap", cfg_.overlap},
          {"buckets", reducer_ ? reducer_->buckets().size() : 0},
          {"collectives_per_step", static_cast<double>(st.collectives) / n},
          {"buckets_launched_in_backward_per_step", static_cast<double>(st.launched_in_backward) / n},
          {"gradient_bytes_per_step", static_cast<double>(st.bytes) / n},
          // time after backward spent finishing the gradient sync (not hidden by it)
          {"exposed_comm_s_per_step", st.exposed_s / n}};
}

}  // namespace qf::trainer
