#include "trainer/trainer.h"

#include "core/threads.h"

#include "peft/adapter.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "core/fs.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/tensorboard.h"
#include "models/hf.h"
#include "quant/qat.h"
#include "trainer/checkpoint.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

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

at::Tensor token_loss_sum(models::CausalLM& m, const data::Batch& b, at::Device dev, bool bf16) {
  at::Tensor logits;
  {
    AutocastGuard ag(bf16, dev.type());
    logits = m.forward(b.input_ids.to(dev));
  }
  const int64_t V = logits.size(-1);
  return at::cross_entropy_loss(logits.reshape({-1, V}).to(at::kFloat), b.labels.to(dev).reshape({-1}), {},
                                at::Reduction::Sum, -100);
}

}  // namespace

void set_threads(int64_t threads) {
  // 0: every core this process may use (its affinity mask, not the machine's count).
  at::set_num_threads(threads > 0 ? static_cast<int>(threads) : qf::threads::usable_cores());
}

at::Device pick_device(DeviceChoice d) {
  bool cuda = torch::cuda::is_available();
  if (d == DeviceChoice::Cuda) {
    QF_CHECK(cuda, "trainer.device: cuda was requested but no CUDA device is available (use cpu or auto)");
    return at::Device(at::kCUDA, 0);
  }
  if (d == DeviceChoice::Auto && cuda) return at::Device(at::kCUDA, 0);
  return at::Device(at::kCPU);
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
    sum += token_loss_sum(m, b, dev, bf16).item<double>();
    tokens += static_cast<double>((b.labels != -100).sum().item<int64_t>());
  }
  if (world > 1) shard.sum(sum, tokens);
  if (was) m.train();
  r.tokens = static_cast<int64_t>(tokens);
  r.loss = r.tokens ? sum / tokens : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

Trainer::Trainer(RunConfig cfg) : cfg_(std::move(cfg)) {}

peft::ApplyReport apply_peft(torch::nn::Module& model, const peft::LoraConfig& pc, bool verbose) {
  auto rep = peft::apply_lora(model, pc, "lm_head");
  if (!pc.init_adapter.empty()) {
    auto info = peft::load_adapter(model, pc.init_adapter, pc.dropout);
    if (verbose) log::info("LoRA: loaded adapter ", pc.init_adapter, " (", info.modules.size(), " layers, r ", info.r, ")");
    peft::count_parameters(model, rep);
  }
  if (verbose) {
    log::info("LoRA: r ", pc.r, ", alpha ", pc.alpha, pc.rslora ? " (rsLoRA)" : "", ", scaling ", pc.scaling(), " on ",
              rep.wrapped.size(), " layers", pc.exact_merge ? " (exact merge: the fake quantizer sees W + s*BA)" : "",
              "; frozen base ", peft::base_format_name(pc.base),
              rep.n_frozen_converted ? str(" (", rep.n_frozen_converted, " linears re-stored)") : std::string());
    log::info("LoRA: ", rep.summary());
  }
  return rep;
}
static bool holds_nothing_but_config(const std::string& dir);

Trainer::~Trainer() {
  if (pg_) quant::set_observer_sync(nullptr);
  // A run that failed in the directory it created itself leaves nothing behind when nothing of value
  // was written there (only config.yaml and empty files); a pre-existing run dir is never removed.
  if (created_run_dir_ && !finished_ && is_rank0() && holds_nothing_but_config(cfg_.run.out_dir)) {
    log::warn("removing ", cfg_.run.out_dir, ": this failed run created it and wrote nothing there but its config");
    fs::remove_tree(cfg_.run.out_dir);
  }
}

// True when `dir` holds no file but config.yaml and empty files (a run that never got going).
static bool holds_nothing_but_config(const std::string& dir) {
  std::error_code ec;
  if (!sfs::is_directory(dir, ec)) return false;
  for (auto it = sfs::recursive_directory_iterator(dir, ec); !ec && it != sfs::recursive_directory_iterator();
       it.increment(ec)) {
    if (it->is_directory(ec)) continue;
    const bool config = it.depth() == 0 && it->path().filename() == "config.yaml";
    if (!config && !(it->is_regular_file(ec) && it->file_size(ec) == 0)) return false;
  }
  return !ec;
}

void Trainer::setup() {
  const auto& run = cfg_.run;
  denv_ = dist::read_env();
  device_ = pick_device(cfg_.trainer.device);
  if (denv_.distributed() && device_.is_cuda()) {
    // One process per GPU: LOCAL_RANK picks this node's device.
    const auto n = static_cast<int64_t>(torch::cuda::device_count());
    QF_CHECK_INPUT(denv_.local_rank < n, "data parallel: LOCAL_RANK=", denv_.local_rank, " but this node has ", n,
                   " CUDA devices; start one rank per GPU (--nproc-per-node ", n, ")");
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(denv_.local_rank));
    c10::impl::getDeviceGuardImpl(at::kCUDA)->setDevice(device_);
  }
  if (denv_.distributed()) {
    if (!is_rank0()) {
      log::set_quiet(true);  // rank 0 speaks for the group; warnings and errors still show
      ::setenv("QFORGE_PROGRESS", "0", 1);
    }
    auto kind = cfg_.dist.backend;
    if (kind == dist::BackendKind::Auto) kind = device_.is_cuda() ? dist::BackendKind::Nccl : dist::BackendKind::Gloo;
    QF_CHECK_INPUT(kind != dist::BackendKind::Nccl || device_.is_cuda() || !torch::cuda::is_available(),
                   "dist.backend: nccl reduces CUDA tensors but trainer.device is cpu; use gloo or trainer.device=cuda");
    pg_ = dist::init_backend(denv_, kind, std::chrono::milliseconds(static_cast<int64_t>(cfg_.dist.timeout_s * 1000)));
    quant::set_observer_sync([this](at::Tensor& mn, at::Tensor& mx, bool exact) {
      std::vector<at::Tensor> a{mn}, b{mx};
      collective(denv_, step_ + 1, "observer statistics all-reduce", [&] {
        pg_->allreduce(a, c10d::AllreduceOptions{exact ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM})->wait();
        pg_->allreduce(b, c10d::AllreduceOptions{exact ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM})->wait();
      });
      if (!exact) {
        mn.div_(static_cast<double>(denv_.world_size));
        mx.div_(static_cast<double>(denv_.world_size));
      }
    });
    log::info("data parallel: ", denv_.world_size, " ranks (", denv_.source, " environment), ", pg_->getBackendName(),
              ", rendezvous at ", denv_.master_addr, ":", denv_.master_port);
  }
  // Ranks sharing a node share its cores (run.threads 0 = this rank's share).
  set_threads(run.threads > 0 || denv_.local_world_size <= 1
                  ? run.threads
                  : std::max<int64_t>(1, qf::threads::usable_cores() / denv_.local_world_size));
  // An unwritable run directory fails before any work; it is created only once the inputs loaded.
  fs::check_writable_dir(run.out_dir);
  // One writer per run: an existing run dir is locked before anything reads or cleans it.
  if (is_rank0() && sfs::is_directory(run.out_dir)) run_lock_.acquire(run.out_dir);
  // Data parallel: rank 0 trains a missing tokenizer and writes the token caches; the others wait,
  // then read what it wrote (no rank trains into the same path as another).
  if (!is_rank0()) barrier();
  tok_ = data::load_or_train_tokenizer(cfg_.tokenizer);
  auto& mc = cfg_.model;
  if (mc.vocab_size == 0) {
    mc.vocab_size = tok_->vocab_size();
  } else if (mc.vocab_size < tok_->vocab_size()) {
    // Under model.from the size is the checkpoint's (its embedding rows): the tokenizer is the misfit.
    throw ConfigError({mc.from.empty()
                           ? str("model.vocab_size: ", mc.vocab_size, " is smaller than the tokenizer's vocabulary of ",
                                 tok_->vocab_size(), " (", tok_->path(), "); use 0 to take it from the tokenizer")
                           : str("tokenizer.path: ", tok_->path(), " has ", tok_->vocab_size(),
                                 " tokens but the model.from checkpoint ", mc.from, " has ", mc.vocab_size,
                                 " embedding rows (config.json vocab_size), so it is not that model's tokenizer; drop "
                                 "the tokenizer section to use the checkpoint's own tokenizer.json / tokenizer.model")});
  }
  ds_ = data::build_dataset(cfg_.data, *tok_);
  if (is_rank0()) {
    created_run_dir_ = !sfs::exists(run.out_dir);
    // Finish a re-save a kill interrupted and drop the temp dirs of killed saves (dead PIDs only),
    // before any rank looks for the checkpoint to resume from.
    for (const char* sub : {"/checkpoints", "/converted", "/merged"}) recover_checkpoints(run.out_dir + sub);
  }
  if (is_rank0()) barrier();
  if (is_rank0()) {
    fs::ensure_dir(run.out_dir);
    run_lock_.acquire(run.out_dir);
  }

  at::manual_seed(static_cast<uint64_t>(run.seed));
  model_ = models::build_model(mc, /*init=*/mc.from.empty());
  if (mc.from.empty()) model_->init_weights(static_cast<uint64_t>(run.seed));
  if (!mc.from.empty()) {
    models::load_hf_weights(*model_, models::read_hf_checkpoint(mc.from));
    log::info("loaded Hugging Face checkpoint ", mc.from);
  }
  if (!run.init_from.empty()) {
    std::string ck = resolve_checkpoint(run.init_from);
    QF_CHECK_INPUT(!ck.empty(), "run.init_from: no checkpoint found under '", run.init_from, "'");
    load_model_state(*model_, load_checkpoint(ck, false).model, ck + "/model.safetensors");
    log::info("initialised weights from ", ck);
  }
  // The checkpoint a resumed run continues from (its weights replace anything set up below).
  const std::string resume_ck = cfg_.trainer.resume == Resume::Auto ? resolve_checkpoint(run.out_dir) : "";
  if (cfg_.quant.enabled && cfg_.quant.init.method != quant::PtqMethod::None && resume_ck.empty()) {
    model_->to(device_);
    ptq_ = run_ptq_init(*model_, cfg_, *tok_, ds_.train);
  }
  if (cfg_.quant.enabled) {
    auto rep = quant::prepare(*model_, cfg_.quant);
    if (ptq_) {
      if (auto n = quant::seed_learned_scales(*model_, *ptq_)) log::info("QAT: ", n, " learned scales start at GPTQ's");
    }
    log::info("QAT: ", rep.n_swapped, " linear layers now fake-quantize", cfg_.quant.fake_quant_after_steps > 0 ? str(" from step ", cfg_.quant.fake_quant_after_steps) : std::string());
    for (auto& row : rep.rows) log::info("  ", row);
  }
  if (cfg_.peft.enabled) apply_peft(*model_, cfg_.peft, true);
  model_->to(device_);
  model_->train();
  if (pg_) broadcast_model();

  for (auto& p : model_->parameters())
    if (p.requires_grad()) trainable_.push_back(p);
  if (pg_) {
    zero_ = cfg_.dist.zero;
    if (zero_ > 0) {
      owner_ = dist::partition(trainable_, denv_.world_size);
      for (auto& p : trainable_)  // the parameter all-gather moves one flat buffer per owner
        QF_CHECK_INPUT(p.scalar_type() == trainable_[0].scalar_type(), "dist.zero: ", zero_,
                       " needs every trainable parameter in one dtype; found ", trainable_[0].scalar_type(), " and ",
                       p.scalar_type(), " (use dist.zero=0)");
    }
    dist::ReducerOptions ro;
    ro.bucket_bytes = static_cast<int64_t>(cfg_.dist.bucket_mb * (1 << 20));
    ro.first_bucket_bytes = static_cast<int64_t>(cfg_.dist.first_bucket_mb * (1 << 20));
    ro.overlap = cfg_.dist.overlap;
    ro.to_owner = zero_ == 2;
    if (!trainable_.empty())
      reducer_ = std::make_unique<dist::GradReducer>(pg_, denv_, trainable_, ro, ro.to_owner ? owner_ : std::vector<int>{});
  } else if (cfg_.dist.zero > 0) {
    log::info("dist.zero: ", cfg_.dist.zero, " has nothing to shard in a single process; the optimizer is not sharded");
  }

  // AdamW, decoupled weight decay on matrices only (no decay on norms and biases). Under ZeRO each
  // rank's AdamW holds only the parameters it owns.
  std::vector<at::Tensor> decay, no_decay;
  for (size_t i = 0; i < trainable_.size(); ++i)
    if (owns(i)) (trainable_[i].dim() >= 2 ? decay : no_decay).push_back(trainable_[i]);
  const auto& o = cfg_.trainer.optim;
  auto base = torch::optim::AdamWOptions(o.lr).betas({o.betas[0], o.betas[1]}).eps(o.eps);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(o.weight_decay)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(0.0)));
  opt_ = std::make_unique<torch::optim::AdamW>(std::move(groups), base);
  if (zero_ > 0) {
    int64_t mine = 0, all = 0;
    for (size_t i = 0; i < trainable_.size(); ++i) {
      all += trainable_[i].numel();
      mine += owns(i) ? trainable_[i].numel() : 0;
    }
    log::info("ZeRO-", zero_, ": rank 0 holds optimizer state for ", mine, " of ", all, " trainable elements (",
              denv_.world_size, " shards)", zero_ == 2 ? "; gradients are reduced to their owners" : "");
  }

  sampler_ = std::make_unique<data::Sampler>(ds_.train.size(), cfg_.trainer.batch_size,
                                             static_cast<uint64_t>(cfg_.data.seed), true,
                                             static_cast<int>(denv_.rank), static_cast<int>(denv_.world_size));

  if (!resume_ck.empty()) restore(resume_ck);
  // Only now, with the model built and the checkpoint to resume from checked against it, is the run
  // directory written: a config that does not fit the run leaves its config.yaml untouched.
  if (is_rank0())
    fs::write_atomic(run.out_dir + "/config.yaml",
                     "# resolved config of run '" + run.name + "' (from " + cfg_.source + ")\n" + cfg::dump(cfg_.resolved));
  // A fresh run starts a fresh metrics file; a resumed one keeps the lines up to its checkpoint.
  if (is_rank0()) metrics_.open(run.out_dir, resume_ck.empty() ? -1 : step_);
  int64_t n_train = 0;
  for (auto& p : model_->parameters()) n_train += p.requires_grad() ? p.numel() : 0;
  log::info("model: ", mc.family_name(), " ", model_->num_parameters(), " parameters (", n_train, " trainable), ",
            mc.n_layers, " layers, dim ", mc.dim, ", heads ", mc.n_heads, "/", mc.kv_heads(), ", vocab ", mc.vocab_size,
            " on ", device_.str());
  log::info("data: ", ds_.train.size(), " train / ", ds_.val.size(), " val sequences of ", cfg_.data.seq_len,
            " tokens; ", sampler_->batches_per_epoch(), " steps per epoch at batch ", cfg_.trainer.batch_size,
            denv_.distributed() ? str(" x ", denv_.world_size, " ranks") : std::string());
}

void Trainer::restore(const std::string& ck) {
  auto d = load_checkpoint(ck, true);
  load_model_state(*model_, d.model, ck + "/model.safetensors");
  load_optimizer_state(*model_, *opt_, d.optimizer, ck + "/optimizer.safetensors");
  // (load_checkpoint checked these keys' types: trainer/checkpoint.cpp check_state)
  step_ = d.state.value("step", int64_t{0});
  tokens_seen_ = d.state.value("tokens_seen", int64_t{0});
  last_val_ = d.state.value("last_val_loss", -1.0);
  data::Sampler::State s;
  const auto sampler = d.state.value("sampler", nlohmann::json::object());
  s.epoch = sampler.value("epoch", int64_t{0});
  s.cursor = sampler.value("cursor", int64_t{0});
  QF_CHECK_INPUT(s.cursor <= sampler_->batches_per_epoch(), ck, "/trainer_state.json: 'sampler.cursor': expected at most ",
                 sampler_->batches_per_epoch(), " (this run's batches per epoch), found ", s.cursor,
                 "; was the checkpoint made with other data or batch settings?");
  sampler_->set_state(s);
  for (auto& [n, t] : d.extra)
    if (n == "rng.cpu") {
      at::Generator g = at::detail::getDefaultCPUGenerator();
      try {
        g.set_state(t);
      } catch (const c10::Error& e) {  // a tensor of another size or dtype
        throw InputError(qf::str(ck, "/extra.safetensors: 'rng.cpu' (shape ", t.sizes(), ", ", t.dtype(),
                             ") is not a CPU generator state: ", first_line(e.what_without_backtrace())));
      }
    }
  if (d.state.value("config_hash", "") != cfg_.hash())
    log::warn("resuming from ", ck, " whose config differs from this run's (config hash ",
              d.state.value("config_hash", "?"), " vs ", cfg_.hash(), ")");
  resumed_ = true;
  log::info("resumed from ", ck, " at step ", step_, " (epoch ", s.epoch, ", batch ", s.cursor, ")");
}

void Trainer::write_metrics(const nlohmann::json& j) {
  if (is_rank0()) metrics_.write(j);
}

double Trainer::train_step() {
  const auto& t = cfg_.trainer;
  const bool bf16 = t.precision == Precision::BF16;
  std::vector<data::Batch> micro;
  int64_t n_tokens = 0;
  for (int64_t a = 0; a < t.grad_accum; ++a) {
    micro.push_back(data::make_batch(ds_.train, sampler_->next()));
    n_tokens += (micro.back().labels != -100).sum().item<int64_t>();
  }
  // Data parallel: every rank normalises by the tokens of the whole global step, so the summed
  // gradients equal one process's gradient over the global batch.
  const double n_step = pg_ ? allreduce_sum(static_cast<double>(n_tokens)) : static_cast<double>(n_tokens);
  if (cfg_.quant.enabled) quant::set_qat_step(*model_, step_, cfg_.quant.fake_quant_after_steps);
  const double lr = t.optim.lr * t.schedule.factor(step_, t.max_steps);
  for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  model_->zero_grad();  // every gradient: under ZeRO the optimizer knows only its own parameters
  double loss_sum = 0;
  for (size_t a = 0; a < micro.size(); ++a) {
    if (reducer_) reducer_->begin_backward(a + 1 == micro.size());  // no sync on accumulation micro-steps
    // Normalise by the tokens of the whole optimizer step, so k x (B/k) == B exactly in expectation.
    auto loss = token_loss_sum(*model_, micro[a], device_, bf16) / std::max(1.0, n_step);
    double v = loss.item<double>();
    if (!std::isfinite(v))
      throw DivergedError(str("non-finite loss (", v, ") at step ", step_ + 1, ", micro-batch ", a,
                              "; nothing was saved. Lower trainer.optim.lr (now ", t.optim.lr,
                              ") or enable trainer.grad_clip; the last checkpoint is still intact"));
    loss.backward();
    loss_sum += v;
  }
  if (pg_) {
    if (reducer_) reducer_->finish(step_ + 1);
    loss_sum = allreduce_sum(loss_sum);
  }
  double gnorm = 0;
  if (t.grad_clip > 0) {
    gnorm = zero_ == 2 ? clip_sharded_grads(t.grad_clip) : torch::nn::utils::clip_grad_norm_(model_->parameters(), t.grad_clip);
    if (!std::isfinite(gnorm))
      throw DivergedError(str("non-finite gradient norm at step ", step_ + 1, "; nothing was saved"));
  }
  opt_->step();
  if (zero_ > 0) sync_params();
  ++step_;
  tokens_seen_ += static_cast<int64_t>(micro.size()) * micro[0].input_ids.numel() * denv_.world_size;
  if (step_ % t.log_every == 0 || step_ == t.max_steps)
    write_metrics({{"step", step_}, {"loss", loss_sum}, {"lr", lr}, {"grad_norm", gnorm}, {"tokens", tokens_seen_}});
  return loss_sum;
}

TrainResult Trainer::train() {
  const auto& t = cfg_.trainer;
  const bool bf16 = t.precision == Precision::BF16;
  TrainResult res;
  res.start_step = step_;
  // Validation is sharded over the ranks until the rank-0-only part at the end.
  EvalShard shard;
  if (pg_) {
    shard = {denv_.rank, denv_.world_size, [this](double& loss, double& tokens) {
               auto s = allreduce_sums({loss, tokens}, "validation all-reduce", step_);
               loss = s[0];
               tokens = s[1];
             }};
  }
  auto eval = [&]() {
    auto e = evaluate_model(*model_, ds_.val, t.batch_size, t.eval_batches, device_, bf16, shard);
    last_val_ = e.loss;
    write_metrics({{"step", step_}, {"val_loss", e.loss}, {"val_ppl", e.ppl}});
    return e;
  };
  if (cfg_.quant.enabled) quant::set_qat_step(*model_, step_, cfg_.quant.fake_quant_after_steps);
  if (!resumed_ && ds_.val.size() > 0) {
    auto e = eval();
    res.val_before = e.loss;
    log::info("step ", step_, ": validation loss ", e.loss, ", perplexity ", e.ppl);
  }
  core::ProgressBar bar("train", t.max_steps, step_);
  const int64_t tokens_per_step = t.batch_size * t.grad_accum * cfg_.data.seq_len * denv_.world_size;  // global
  auto t0 = std::chrono::steady_clock::now();
  double ema = -1;
  while (step_ < t.max_steps) {
    double l = train_step();
    res.losses.push_back(l);
    ema = ema < 0 ? l : 0.9 * ema + 0.1 * l;
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double tps = secs > 0 ? static_cast<double>(tokens_per_step * (step_ - res.start_step)) / secs : 0;
    res.tokens_per_s = tps;
    char post[160];
    std::snprintf(post, sizeof post, "loss %.4f | lr %.2e | %s tok/s%s", ema, t.optim.lr * t.schedule.factor(step_ - 1, t.max_steps),
                  core::ProgressBar::format_rate(tps).c_str(), last_val_ >= 0 ? str(" | val ppl ", std::round(std::exp(last_val_) * 100) / 100).c_str() : "");
    bar.update(step_, post);
    if (t.eval_every > 0 && step_ % t.eval_every == 0 && step_ < t.max_steps && ds_.val.size() > 0) eval();
    if (t.save_every > 0 && step_ % t.save_every == 0 && step_ < t.max_steps) res.checkpoint = save_checkpoint();
  }
  bar.finish();
  // Training memory, as held during the steps: weights as stored, gradients, AdamW moments.
  res.train_weight_bytes = quant::model_bytes(*model_);
  for (size_t i = 0; i < trainable_.size(); ++i)  // ZeRO-2 keeps only its own gradients
    if (zero_ < 2 || owns(i)) res.grad_bytes += trainable_[i].numel() * trainable_[i].element_size();
  for (auto& [n, s] : optimizer_state(*model_, *opt_)) res.optim_bytes += s.numel() * s.element_size();
  if (cfg_.quant.enabled) quant::set_qat_step(*model_, step_, cfg_.quant.fake_quant_after_steps);
  if (ds_.val.size() > 0) {
    auto e = eval();
    res.val_after = e.loss;
    log::info("step ", step_, ": validation loss ", e.loss, ", perplexity ", e.ppl);
  }
  if (res.checkpoint.empty() || step_ > res.start_step) res.checkpoint = save_checkpoint();
  res.end_step = step_;
  quant::set_observer_sync(nullptr);  // what follows runs on rank 0 alone
  shard = {};
  finished_ = true;
  if (!is_rank0()) return res;  // adapters, merged and converted models, the summary: rank 0 writes them
  finalize(res, eval);
  return res;
}

std::string Trainer::save_checkpoint() {
  auto optim = gather_optimizer_state();  // ZeRO: every rank sends its shard to rank 0
  if (!is_rank0()) {
    barrier();  // rank 0 writes; the others wait until the checkpoint is complete
    return "";
  }
  CheckpointData d;
  d.model = model_state(*model_);
  d.optimizer = std::move(optim);
  d.extra.emplace_back("rng.cpu", at::detail::getDefaultCPUGenerator().get_state());
  auto s = sampler_->state();
  d.state = {{"step", step_},
             {"tokens_seen", tokens_seen_},
             {"last_val_loss", last_val_},
             {"sampler", {{"epoch", s.epoch}, {"cursor", s.cursor}}},
             {"config_hash", cfg_.hash()}};
  model_meta(cfg_.quant.enabled ? ModelFormat::FakeQuant : ModelFormat::Fp, cfg_.peft.enabled, false).write_to(d.state);
  auto dir = trainer::save_checkpoint(cfg_.run.out_dir + "/checkpoints", step_, d, cfg_.trainer.keep_last);
  log::info("saved checkpoint ", dir);
  barrier();
  return dir;
}

using dist::collective;

void Trainer::broadcast_model() {
  at::NoGradGuard ng;
  // The same recipe on every rank, or the group is not training one model.
  const std::string hash = cfg_.hash();
  const auto h = static_cast<int64_t>(std::stoull(hash, nullptr, 16));
  std::vector<at::Tensor> hv{at::full({1}, h, at::TensorOptions().dtype(at::kLong).device(device_))};
  collective(denv_, step_, "config check", [&] { pg_->broadcast(hv, c10d::BroadcastOptions{0})->wait(); });
  QF_CHECK_INPUT(hv[0].item<int64_t>() == h, "data parallel: rank ", denv_.rank, "'s resolved config (hash ", hash,
                 ") differs from rank 0's; every rank must run the same recipe with the same overrides");
  for (auto& p : model_->parameters()) {
    std::vector<at::Tensor> v{p.data()};
    collective(denv_, step_, "parameter broadcast", [&] { pg_->broadcast(v, c10d::BroadcastOptions{0})->wait(); });
  }
}

double Trainer::clip_sharded_grads(double max_norm) {
  // torch's clip_grad_norm_: total = ||(||g_i||)_i||, coefficient max/(total + 1e-6) clamped to 1.
  double sq = 0;
  for (size_t i = 0; i < trainable_.size(); ++i)
    if (owns(i) && trainable_[i].grad().defined()) sq += trainable_[i].grad().to(at::kDouble).pow(2).sum().item<double>();
  const double total = std::sqrt(allreduce_sum(sq));
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    at::NoGradGuard ng;
    for (size_t i = 0; i < trainable_.size(); ++i)
      if (owns(i) && trainable_[i].grad().defined()) trainable_[i].mutable_grad().mul_(coef);
  }
  return total;
}

void Trainer::sync_params() {
  // All-gather of the updated shards, as one broadcast per owner of its flattened parameters.
  at::NoGradGuard ng;
  for (int64_t r = 0; r < denv_.world_size; ++r) {
    std::vector<at::Tensor> mine;
    int64_t n = 0;
    for (size_t i = 0; i < trainable_.size(); ++i)
      if (owner_[i] == r) {
        mine.push_back(trainable_[i]);
        n += trainable_[i].numel();
      }
    if (mine.empty()) continue;
    std::vector<at::Tensor> flat{r == denv_.rank ? [&] {
      std::vector<at::Tensor> v;
      for (auto& p : mine) v.push_back(p.detach().reshape({-1}));
      return at::cat(v, 0);
    }()
                                                 : at::empty({n}, mine[0].options())};
    collective(denv_, step_, "parameter all-gather", [&] { pg_->broadcast(flat, c10d::BroadcastOptions{r})->wait(); });
    if (r == denv_.rank) continue;
    int64_t off = 0;
    for (auto& p : mine) {
      p.detach().copy_(flat[0].slice(0, off, off + p.numel()).view(p.sizes()));
      off += p.numel();
    }
  }
}

NamedTensors Trainer::gather_optimizer_state() {
  auto local = optimizer_state(*model_, *opt_);
  if (zero_ == 0) return local;
  // Each parameter's AdamW state goes from its owner to rank 0 (a flag first: a parameter that
  // never received a gradient has none). The file is the same as a single process writes, so a
  // checkpoint saved by N ranks resumes on any M.
  std::map<std::string, at::Tensor> by(local.begin(), local.end());
  const auto names = [&] {
    std::vector<std::string> v;
    for (auto& p : model_->named_parameters())
      if (p.value().requires_grad()) v.push_back(p.key());
    return v;
  }();
  NamedTensors out;
  int tag = 0;
  for (size_t i = 0; i < trainable_.size(); ++i, tag += 4) {
    const int o = owner_[i];
    const std::string keys[3] = {"exp_avg/" + names[i], "exp_avg_sq/" + names[i], "step/" + names[i]};
    if (o == 0) {
      if (is_rank0() && by.count(keys[0]))
        for (auto& k : keys) out.emplace_back(k, by[k]);
      continue;
    }
    if (denv_.rank != o && !is_rank0()) continue;
    collective(denv_, step_, "optimizer state gather", [&] {
      const auto on = at::TensorOptions().device(trainable_[i].device());  // NCCL sends device tensors
      std::vector<at::Tensor> flag{at::full({1}, denv_.rank == o ? int64_t(by.count(keys[0])) : 0, on.dtype(at::kLong))};
      if (denv_.rank == o) {
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

std::vector<double> Trainer::allreduce_sums(std::vector<double> v, const char* what, int64_t step) {
  std::vector<at::Tensor> t{at::tensor(v, at::kDouble).to(device_)};  // NCCL reduces device tensors
  collective(denv_, step, what, [&] { pg_->allreduce(t)->wait(); });
  auto h = t[0].cpu();
  for (size_t i = 0; i < v.size(); ++i) v[i] = h[static_cast<int64_t>(i)].item<double>();
  return v;
}

void Trainer::barrier() {
  if (pg_) collective(denv_, step_, "barrier", [&] { pg_->barrier()->wait(); });
}

ModelMeta Trainer::model_meta(ModelFormat format, bool lora, bool with_bytes) const {
  ModelMeta m;
  m.format = format;
  m.lora = lora;
  m.family = cfg_.model.family_name();
  m.vocab_size = cfg_.model.vocab_size;
  if (with_bytes) m.model_bytes = quant::model_bytes(*model_);
  return m;
}

std::string Trainer::save_model_dir(const std::string& sub, ModelFormat format) {
  CheckpointData d;
  d.model = model_state(*model_);
  d.state = {{"step", step_}, {"config_hash", cfg_.hash()}};
  const ModelMeta meta = model_meta(format, false, true);
  meta.write_to(d.state);
  auto path = trainer::save_checkpoint(cfg_.run.out_dir + "/" + sub, step_, d, 1);
  log::info("saved ", meta.describe(), " model ", path, " (", meta.model_bytes, " bytes of weights)");
  return path;
}

std::string Trainer::save_converted() {
  const int64_t n = quant::convert(*model_);
  log::info("converted ", n, " fake-quant modules to packed integer weights");
  if (ptq_ && !ptq_->packed.empty() && step_ == 0 && !cfg_.peft.enabled) {
    // No training happened: keep GPTQ's own codes and scales (re-rounding its output may differ).
    quant::apply_packed(*model_, *ptq_);
    log::info("kept GPTQ's packed weights for ", ptq_->packed.size(), " linears");
  }
  return save_model_dir("converted", ModelFormat::Converted);
}

void Trainer::cleanup() {
  metrics_.close();
}

EvalResult Trainer::evaluate(const data::PackedSet& set, int64_t max_batches) {
  return evaluate_model(*model_, set, cfg_.trainer.batch_size, max_batches, device_,
                        cfg_.trainer.precision == Precision::BF16);
}

}  // namespace qf::trainer
