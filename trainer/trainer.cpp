#include "trainer/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "core/fs.h"
#include "core/gguf_file.h"
#include "core/log.h"
#include "export/gguf_in.h"
#include "core/progress.h"
#include "core/threads.h"
#include "models/hf.h"
#include "peft/adapter.h"
#include "peft/lora.h"
#include "quant/qat.h"
#include "trainer/adamw8bit.h"
#include "trainer/checkpoint.h"
#include "trainer/data_parallel.h"
#include "trainer/memory_estimate.h"

namespace qf::trainer {
namespace sfs = std::filesystem;

namespace {

// True when `dir` holds no file but config.yaml and empty files (a run that never got going).
bool holds_nothing_but_config(const std::string& dir) {
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

// model.vocab_size 0 takes the tokenizer's; a smaller one is an error naming the misfit.
void fit_vocab(models::ModelConfig& mc, const data::Tokenizer& tok) {
  if (mc.vocab_size == 0) {
    mc.vocab_size = tok.vocab_size();
  } else if (mc.vocab_size < tok.vocab_size()) {
    // Under model.from the size is the checkpoint's (its embedding rows): the tokenizer is the misfit.
    throw ConfigError({mc.from.empty()
                           ? str("model.vocab_size: ", mc.vocab_size, " is smaller than the tokenizer's vocabulary of ",
                                 tok.vocab_size(), " (", tok.path(), "); use 0 to take it from the tokenizer")
                           : str("tokenizer.path: ", tok.path(), " has ", tok.vocab_size(),
                                 " tokens but the model.from checkpoint ", mc.from, " has ", mc.vocab_size,
                                 " embedding rows (config.json vocab_size), so it is not that model's tokenizer; drop "
                                 "the tokenizer section to use the checkpoint's own tokenizer.json / tokenizer.model")});
  }
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
              "; frozen base ", peft::base_name(pc),
              rep.n_frozen_converted ? str(" (", rep.n_frozen_converted, " linears re-stored)") : std::string());
    log::info("LoRA: ", rep.summary());
  }
  return rep;
}

Trainer::~Trainer() {
  // A run that failed in the directory it created itself leaves nothing behind when nothing of value
  // was written there (only config.yaml and empty files); a pre-existing run dir is never removed.
  if (created_run_dir_ && !finished_ && is_rank0() && holds_nothing_but_config(cfg_.run.out_dir)) {
    log::warn("removing ", cfg_.run.out_dir, ": this failed run created it and wrote nothing there but its config");
    fs::remove_tree(cfg_.run.out_dir);
  }
}


void Trainer::setup() {
  init_distributed();
  load_inputs();
  load_teacher();
  create_model();
  // The checkpoint a resumed run continues from (its weights replace anything set up below).
  const std::string resume_ck = cfg_.trainer.resume == Resume::Auto ? resolve_checkpoint(cfg_.run.out_dir) : "";
  transform_model(/*ptq_init=*/resume_ck.empty());
  attach_data_parallel();
  build_optimizer();
  check_memory();
  sampler_ = std::make_unique<data::Sampler>(ds_.train.size(), cfg_.trainer.batch_size,
                                             static_cast<uint64_t>(cfg_.data.seed), true,
                                             static_cast<int>(denv_.rank), static_cast<int>(denv_.world_size));
  if (!resume_ck.empty()) restore(resume_ck);
  write_run_files(!resume_ck.empty());
  log_setup();
}

void Trainer::init_distributed() {
  denv_ = dist::read_env();
  device_ = local_rank_device(denv_, pick_device(cfg_.trainer.device));
  if (denv_.distributed() && !is_rank0()) {
    log::set_quiet(true);  // rank 0 speaks for the group; warnings and errors still show
    ::setenv("QFORGE_PROGRESS", "0", 1);
  }
  dp_ = DataParallel::connect(denv_, device_, cfg_.dist);
  dp_->start_observer_sync([this] { return step_ + 1; });
  // Ranks sharing a node share its cores (run.threads 0 = this rank's share).
  const auto& run = cfg_.run;
  set_threads(run.threads > 0 || denv_.local_world_size <= 1
                  ? run.threads
                  : std::max<int64_t>(1, qf::threads::usable_cores() / denv_.local_world_size));
}

void Trainer::load_inputs() {
  const auto& run = cfg_.run;
  // An unwritable run directory fails before any work; it is created only once the inputs loaded.
  fs::check_writable_dir(run.out_dir);
  // One writer per run: an existing run dir is locked before anything reads or cleans it.
  if (is_rank0() && sfs::is_directory(run.out_dir)) run_lock_.acquire(run.out_dir);
  // Data parallel: rank 0 trains a missing tokenizer and writes the token caches; the others wait,
  // then read what it wrote (no rank trains into the same path as another).
  if (!is_rank0()) dp_->barrier(step_);
  tok_ = data::load_or_train_tokenizer(cfg_.tokenizer);
  fit_vocab(cfg_.model, *tok_);
  ds_ = data::build_dataset(cfg_.data, *tok_);
  if (is_rank0()) {
    created_run_dir_ = !sfs::exists(run.out_dir);
    // Finish a re-save a kill interrupted and drop the temp dirs of killed saves (dead PIDs only),
    // before any rank looks for the checkpoint to resume from.
    for (const char* sub : {"/checkpoints", "/converted", "/merged"}) recover_checkpoints(run.out_dir + sub);
    dp_->barrier(step_);
    fs::ensure_dir(run.out_dir);
    run_lock_.acquire(run.out_dir);
  }
}

void Trainer::load_teacher() {
  const auto& d = cfg_.distill;
  if (!d.enabled()) return;
  // init: the weights this run starts from, as that run / checkpoint / HF dir / GGUF holds them.
  const std::string path = d.teacher != "init" ? d.teacher : !cfg_.run.init_from.empty() ? cfg_.run.init_from : cfg_.model.from;
  // (Checked here, not when parsing: commands that re-read a finished run's config clear its init_from.)
  QF_CHECK_INPUT(!path.empty(), "distill.teacher: init distills from the weights this run starts from, but it starts from "
                                "random ones (no run.init_from or model.from); name a teacher model instead");
  auto t = load_model(path, {});
  check_same_vocabulary(*tok_, *t.tok, cfg_.run.name, path);
  teacher_ = t.model;
  teacher_->to(device_);
  teacher_->eval();
  for (auto& p : teacher_->parameters()) p.set_requires_grad(false);
  log::info("distill: teacher ", path, d.teacher == "init" ? " (the run's initial weights)" : "", ", ",
            teacher_->num_parameters(), " parameters (", t.format, "); loss = ", d.kd_weight, " x T^2 KL(teacher || model)",
            d.ce_weight > 0 ? str(" + ", d.ce_weight, " x CE") : std::string(), ", T ", d.temperature);
}

void Trainer::create_model() {
  const auto& run = cfg_.run;
  const auto& mc = cfg_.model;
  at::manual_seed(static_cast<uint64_t>(run.seed));
  model_ = models::build_model(mc, /*init=*/mc.from.empty());
  if (mc.from.empty()) model_->init_weights(static_cast<uint64_t>(run.seed));
  if (!mc.from.empty()) {
    const bool gguf = gguf_in::is_gguf_file(mc.from);
    const auto ck = gguf ? models::HfCheckpoint{} : models::read_hf_checkpoint(mc.from);
    // QLoRA (peft.base nf4 / bf16): the frozen base linears are built tensor by tensor while the
    // checkpoint streams in, so the full-precision model is never resident as a whole; apply_peft
    // keeps them. Not under quant rules (the bases may fake-quantize) nor run.init_from (its weights
    // replace the dense ones next).
    const auto& pc = cfg_.peft;
    if (pc.enabled && pc.base != peft::BaseFormat::Fp32 && !cfg_.quant.enabled && run.init_from.empty()) {
      const auto streamer = peft::frozen_base_streamer(*model_, pc, "lm_head");
      if (gguf) exporter::load_gguf_weights(*model_, exporter::read_gguf(mc.from), true, &streamer);
      else models::load_hf_weights(*model_, ck, true, /*populate=*/false, &streamer);
    } else if (gguf) {
      exporter::load_gguf_weights(*model_, exporter::read_gguf(mc.from));
    } else {
      models::load_hf_weights(*model_, ck);
    }
    log::info("loaded ", gguf ? "GGUF file " : "Hugging Face checkpoint ", mc.from);
  }
  if (!run.init_from.empty()) {
    std::string ck = resolve_checkpoint(run.init_from);
    QF_CHECK_INPUT(!ck.empty(), "run.init_from: no checkpoint found under '", run.init_from, "'");
    load_model_state(*model_, load_checkpoint(ck, false).model, ck + "/model.safetensors");
    log::info("initialised weights from ", ck);
  }
}

void Trainer::transform_model(bool ptq_init) {
  // Importance-weighted RTN blocks are kept only while no training re-rounds the weights.
  QF_CHECK_INPUT(cfg_.quant.init.imatrix.empty() || cfg_.trainer.max_steps == 0 || !ptq_init,
                 "quant.imatrix: importance-weighted rounding (llama-quantize --imatrix) gives packed blocks that "
                 "training would round again without it; use it with trainer.max_steps: 0 or `qforge quantize --imatrix`");
  if (cfg_.quant.enabled && cfg_.quant.init.method != quant::PtqMethod::None && ptq_init) {
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
  setup_peak_rss_ = peak_rss_bytes();  // the load's peak (QLoRA: NF4 model + one tensor)
  const auto& t = cfg_.trainer;
  model_->checkpoint_every = t.activation_checkpointing ? t.activation_checkpointing_every : 0;
}

void Trainer::attach_data_parallel() {
  dp_->broadcast_model(model_->parameters(), cfg_.hash(), step_);
  std::vector<at::Tensor> trainable;
  for (auto& p : model_->parameters())
    if (p.requires_grad()) trainable.push_back(p);
  dp_->attach(std::move(trainable));
}

void Trainer::build_optimizer() {
  // AdamW (torch's, or bitsandbytes' 8-bit AdamW8bit), decoupled weight decay on matrices only (no
  // decay on norms and biases). Under ZeRO each rank's AdamW holds only the parameters it owns.
  std::vector<at::Tensor> decay, no_decay;
  for (auto& p : dp_->owned()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  const auto& o = cfg_.trainer.optim;
  auto base = torch::optim::AdamWOptions(o.lr).betas({o.betas[0], o.betas[1]}).eps(o.eps);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(o.weight_decay)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(0.0)));
  if (o.name == OptimName::AdamW8bit)
    opt_ = std::make_unique<AdamW8bit>(std::move(groups), base);
  else
    opt_ = std::make_unique<torch::optim::AdamW>(std::move(groups), base);
}

void Trainer::check_memory() const {
  const auto& t = cfg_.trainer;
  MemoryInputs in;
  in.model = model_->cfg;
  in.batch = t.batch_size;
  in.seq = cfg_.data.seq_len;
  in.bf16 = t.precision == Precision::BF16;
  in.checkpoint_every = model_->checkpoint_every;
  in.loss_chunk_rows = loss_chunk_rows(t.loss_chunk_tokens, model_->cfg.vocab_size);
  double optim = 0;
  for (auto& p : dp_->owned()) {
    // AdamW8bit keeps large tensors in 8-bit blocks (two moments + an fp32 absmax each per block).
    const bool q8 = t.optim.name == OptimName::AdamW8bit && p.numel() >= kAdam8MinSize;
    optim += static_cast<double>(p.numel()) * (q8 ? 2.0 + 8.0 / static_cast<double>(kAdam8BlockSize) : 8.0);
  }
  for (auto& p : model_->parameters()) in.trainable += p.requires_grad() ? p.numel() : 0;
  in.optim_bytes_per_element = in.trainable > 0 ? optim / static_cast<double>(in.trainable) : 8.0;
  if (cfg_.peft.enabled) {
    in.lora_r = cfg_.peft.r;
    in.frozen_linears = true;
  }
  const auto e = estimate_training_memory(in);
  log::info("memory estimate for training: ", gib(e.total()), " on top of the loaded model (", e.describe(), ")");
  if (!t.memory_check || !device_.is_cpu()) return;
  const int64_t avail = available_host_bytes();
  if (e.total() <= avail) return;
  std::string fix;
  if (in.checkpoint_every != 1) {
    auto ck = in;
    ck.checkpoint_every = 1;
    fix += str("set trainer.activation_checkpointing: true (estimate then ", gib(estimate_training_memory(ck).total()), "); ");
  }
  if (in.loss_chunk_rows == 0) fix += "set trainer.loss_chunk_tokens: -1 (chunked loss); ";
  if (t.optim.name == OptimName::AdamW && in.trainable > (int64_t{1} << 24)) fix += "set trainer.optim.name: adamw8bit; ";
  throw ConfigError({str("trainer: training needs an estimated ", gib(e.total()), " on top of the loaded model (",
                         e.describe(), " at batch ", in.batch, " x seq ", in.seq, ") but this host has ", gib(avail),
                         " available. ", fix, "or lower data.seq_len (", in.seq, ") / trainer.batch_size (", in.batch,
                         "). trainer.memory_check: false skips this check")});
}

void Trainer::write_run_files(bool resumed) {
  if (!is_rank0()) return;
  const auto& run = cfg_.run;
  // Only now, with the model built and the checkpoint to resume from checked against it, is the run
  // directory written: a config that does not fit the run leaves its config.yaml untouched.
  fs::write_atomic(run.out_dir + "/config.yaml",
                   "# resolved config of run '" + run.name + "' (from " + cfg_.source + ")\n" + cfg::dump(cfg_.resolved));
  // A fresh run starts a fresh metrics file; a resumed one keeps the lines up to its checkpoint.
  metrics_.open(run.out_dir, resumed ? step_ : -1);
}

void Trainer::log_setup() const {
  const auto& mc = cfg_.model;
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

at::Tensor Trainer::distill_loss_sum(const data::Batch& b, bool bf16) {
  const auto& d = cfg_.distill;
  DistillTarget kd;
  kd.teacher = teacher_.get();
  {
    at::NoGradGuard ng;
    kd.hidden = eval_hidden(*teacher_, b.input_ids, device_, bf16);
  }
  kd.kd_weight = d.kd_weight;
  kd.ce_weight = d.ce_weight;
  kd.temperature = d.temperature;
  auto h = eval_hidden(*model_, b.input_ids, device_, bf16);
  return hidden_loss_sum(*model_, h, b.labels, device_, bf16, cfg_.trainer.loss_chunk_tokens, &kd);
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
  const double n_step = dp_->allreduce_sum(static_cast<double>(n_tokens), step_ + 1);
  if (cfg_.quant.enabled) quant::set_qat_step(*model_, step_, cfg_.quant.fake_quant_after_steps);
  const double lr = t.optim.lr * t.schedule.factor(step_, t.max_steps);
  for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  model_->zero_grad();  // every gradient: under ZeRO the optimizer knows only its own parameters
  double loss_sum = 0;
  for (size_t a = 0; a < micro.size(); ++a) {
    dp_->begin_backward(a + 1 == micro.size());  // no sync on accumulation micro-steps
    // Normalise by the tokens of the whole optimizer step, so k x (B/k) == B exactly in expectation.
    auto loss = teacher_ ? distill_loss_sum(micro[a], bf16) / std::max(1.0, n_step)
                         : token_loss_sum(*model_, micro[a], device_, bf16, t.loss_chunk_tokens) / std::max(1.0, n_step);
    double v = loss.item<double>();
    if (!std::isfinite(v))
      throw DivergedError(str("non-finite loss (", v, ") at step ", step_ + 1, ", micro-batch ", a,
                              "; nothing was saved. Lower trainer.optim.lr (now ", t.optim.lr,
                              ") or enable trainer.grad_clip; the last checkpoint is still intact"));
    loss.backward();
    loss_sum += v;
  }
  dp_->finish_backward(step_ + 1);
  loss_sum = dp_->allreduce_sum(loss_sum, step_ + 1);
  double gnorm = 0;
  if (t.grad_clip > 0) {
    gnorm = dp_->clip_grad_norm(t.grad_clip, step_ + 1);
    if (!std::isfinite(gnorm))
      throw DivergedError(str("non-finite gradient norm at step ", step_ + 1, "; nothing was saved"));
  }
  opt_->step();
  dp_->sync_params(step_);  // ZeRO: the owners' updated parameters to every rank
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
  if (dp_->active()) {
    shard = {denv_.rank, denv_.world_size, [this](double& loss, double& tokens) {
               auto s = dp_->allreduce_sums({loss, tokens}, "validation all-reduce", step_);
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
  res.grad_bytes = dp_->grad_bytes();  // ZeRO-2 keeps only its own gradients
  for (auto& [n, s] : optimizer_state(*model_, *opt_)) res.optim_bytes += s.numel() * s.element_size();
  if (cfg_.quant.enabled) quant::set_qat_step(*model_, step_, cfg_.quant.fake_quant_after_steps);
  if (ds_.val.size() > 0) {
    auto e = eval();
    res.val_after = e.loss;
    log::info("step ", step_, ": validation loss ", e.loss, ", perplexity ", e.ppl);
  }
  if (res.checkpoint.empty() || step_ > res.start_step) res.checkpoint = save_checkpoint();
  res.end_step = step_;
  dp_->stop_observer_sync();  // what follows runs on rank 0 alone
  shard = {};
  finished_ = true;
  if (!is_rank0()) return res;  // adapters, merged and converted models, the summary: rank 0 writes them
  finalize(res, eval);
  return res;
}

std::string Trainer::save_checkpoint() {
  auto optim = dp_->gather_optimizer_state(*model_, *opt_, step_);  // ZeRO: every rank sends its shard to rank 0
  if (!is_rank0()) {
    dp_->barrier(step_);  // rank 0 writes; the others wait until the checkpoint is complete
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
  dp_->barrier(step_);
  return dir;
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

void Trainer::cleanup() {
  metrics_.close();
}

EvalResult Trainer::evaluate(const data::PackedSet& set, int64_t max_batches) {
  return evaluate_model(*model_, set, cfg_.trainer.batch_size, max_batches, device_,
                        cfg_.trainer.precision == Precision::BF16);
}

}  // namespace qf::trainer
