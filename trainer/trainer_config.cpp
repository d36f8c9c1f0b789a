#include "trainer/trainer_config.h"

#include <cmath>
#include <filesystem>

namespace qf::trainer {

const cfg::Names<OptimName>& optim_names() {
  static const cfg::Names<OptimName> n{{"adamw", OptimName::AdamW}, {"adamw8bit", OptimName::AdamW8bit}};
  return n;
}

OptimConfig OptimConfig::from_config(cfg::Reader& r) {
  OptimConfig o;
  o.name = r.choice<OptimName>("name", o.name, optim_names());
  o.lr = r.f64("lr", o.lr, 0.0, 10.0);
  o.betas = r.f64s("betas", o.betas);
  if (o.betas.size() != 2 || o.betas[0] < 0 || o.betas[0] >= 1 || o.betas[1] < 0 || o.betas[1] >= 1)
    r.fail("betas", "expected two numbers in [0, 1), e.g. [0.9, 0.95]");
  o.eps = r.f64("eps", o.eps, 0.0, 1.0);
  o.weight_decay = r.f64("weight_decay", o.weight_decay, 0.0, 10.0);
  r.finish();
  return o;
}

ScheduleConfig ScheduleConfig::from_config(cfg::Reader& r, int64_t max_steps) {
  ScheduleConfig s;
  s.type = r.choice<Schedule>("type", s.type,
                              {{"cosine", Schedule::Cosine}, {"linear", Schedule::Linear}, {"constant", Schedule::Constant}});
  s.total_steps = r.i64("total_steps", s.total_steps, 0, 1LL << 40);
  s.warmup_steps = r.i64("warmup_steps", default_warmup(s.total_steps > 0 ? s.total_steps : max_steps), 0, 1LL << 40);
  s.min_lr_ratio = r.f64("min_lr_ratio", s.min_lr_ratio, 0.0, 1.0);
  r.finish();
  return s;
}

double ScheduleConfig::factor(int64_t step, int64_t max_steps) const {
  if (warmup_steps > 0 && step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (type == Schedule::Constant) return 1.0;
  if (total_steps > 0) max_steps = total_steps;
  int64_t span = std::max<int64_t>(1, max_steps - warmup_steps);
  double p = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(span));
  if (type == Schedule::Linear) return 1.0 - (1.0 - min_lr_ratio) * p;
  return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + std::cos(M_PI * p));
}

TrainerConfig TrainerConfig::from_config(cfg::Reader& r) {
  TrainerConfig t;
  t.max_steps = r.i64("max_steps", t.max_steps, 0, 1LL << 40);
  t.batch_size = r.i64("batch_size", t.batch_size, 1, 1 << 20);
  t.grad_accum = r.i64("grad_accum", t.grad_accum, 1, 1 << 20);
  t.grad_clip = r.f64("grad_clip", t.grad_clip, 0.0, 1e6);
  t.precision = r.choice<Precision>("precision", t.precision, {{"fp32", Precision::F32}, {"bf16", Precision::BF16}});
  t.device = r.choice<DeviceChoice>("device", t.device,
                                    {{"auto", DeviceChoice::Auto}, {"cpu", DeviceChoice::Cpu}, {"cuda", DeviceChoice::Cuda}});
  t.eval_every = r.i64("eval_every", t.eval_every, 0, 1LL << 40);
  t.eval_batches = r.i64("eval_batches", t.eval_batches, 0, 1LL << 40);
  t.save_every = r.i64("save_every", t.save_every, 0, 1LL << 40);
  t.keep_last = r.i64("keep_last", t.keep_last, 1, 1000);
  t.log_every = r.i64("log_every", t.log_every, 1, 1LL << 40);
  t.resume = r.choice<Resume>("resume", t.resume, {{"auto", Resume::Auto}, {"never", Resume::Never}});
  t.activation_checkpointing = r.boolean("activation_checkpointing", t.activation_checkpointing);
  t.activation_checkpointing_every = r.i64("activation_checkpointing_every", t.activation_checkpointing_every, 1, 1 << 20);
  t.loss_chunk_tokens = r.i64("loss_chunk_tokens", t.loss_chunk_tokens, -1, 1LL << 40);
  t.memory_check = r.boolean("memory_check", t.memory_check);
  auto o = r.child("optim");
  t.optim = OptimConfig::from_config(o);
  auto s = r.child("schedule");
  t.schedule = ScheduleConfig::from_config(s, t.max_steps);
  const int64_t horizon = t.schedule.total_steps > 0 ? t.schedule.total_steps : t.max_steps;
  if (t.schedule.warmup_steps > horizon && horizon > 0)
    s.fail("warmup_steps", "warmup of " + std::to_string(t.schedule.warmup_steps) +
                               " steps exceeds the schedule horizon of " + std::to_string(horizon) +
                               " steps (trainer.max_steps or trainer.schedule.total_steps)");
  r.finish();
  return t;
}

DistillConfig DistillConfig::from_config(cfg::Reader& r) {
  DistillConfig d;
  d.teacher = r.str("teacher", "");
  d.kd_weight = r.f64("kd_weight", d.kd_weight, 0.0, 1e6);
  d.ce_weight = r.f64("ce_weight", d.ce_weight, 0.0, 1e6);
  d.temperature = r.f64("temperature", d.temperature, 1e-3, 1e3);
  if (d.enabled() && d.kd_weight == 0.0 && d.ce_weight == 0.0)
    r.fail("kd_weight", "and ce_weight are both 0: the loss would be 0; set kd_weight > 0 (distillation) or drop distill");
  if (d.enabled() && d.teacher != "init" && !std::filesystem::exists(d.teacher))
    r.fail("teacher", "'" + d.teacher + "' does not exist; expected `init` (the weights this run starts from) or a run "
                      "dir, checkpoint dir, Hugging Face dir or .gguf file");
  r.finish();
  return d;
}

}  // namespace qf::trainer
