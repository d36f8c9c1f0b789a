// Trainer invariants: resume == uninterrupted (identical losses, CPU fp32), gradient accumulation
// k x (B/k) == B, schedules, non-finite loss stops without saving, atomic checkpoints under SIGKILL.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "core/fs.h"
#include "trainer/checkpoint.h"
#include "peft/lora.h"
#include "trainer/trainer.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"
#include "trainer/quality_gate.h"

namespace sfs = std::filesystem;
using namespace qf;
using namespace qf::trainer;

namespace {

struct TmpDir : qf::testing::TmpDir {
  TmpDir() : qf::testing::TmpDir("qf_trainer") {}
};

// A small real corpus: the first lines of the KJV extracted by setup (or generated text as a fallback).
std::string corpus(const std::string& dir) {
  std::string out = dir + "/corpus.txt";
  std::ifstream in(std::string(QFORGE_SOURCE_DIR) + "/data/corpora/kjv.txt");
  std::ofstream o(out);
  std::string line;
  int n = 0;
  while (n < 1500 && std::getline(in, line)) o << line << "\n", ++n;
  for (; n < 1500; ++n) o << "line " << n << " of the fallback corpus with words " << (n * 7919) % 1000 << "\n";
  return out;
}

RunConfig make_cfg(const std::string& dir, const std::vector<std::string>& extra) {
  std::string yaml = R"(
run: {name: t, out_dir: OUT/run, seed: 7, threads: 1}
tokenizer: {path: OUT/tok.model, train: {enabled: true, sources: [CORPUS], vocab_size: 400}}
model: {dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 64}
data: {sources: [{path: CORPUS, split: line}], seq_len: 32, val_fraction: 0.05, cache_dir: OUT/cache}
trainer: {max_steps: 8, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 1,
          optim: {lr: 0.003}, schedule: {warmup_steps: 2}}
)";
  auto rep = [&](const std::string& k, const std::string& v) {
    for (size_t p; (p = yaml.find(k)) != std::string::npos;) yaml.replace(p, k.size(), v);
  };
  rep("OUT", dir);
  rep("CORPUS", dir + "/corpus.txt");
  YAML::Node root = YAML::Load(yaml);
  cfg::Problems p;
  for (auto& o : extra) cfg::apply_override(root, o, &p);
  p.throw_if_any();
  return parse_run_config(root, "<test>");
}

std::vector<double> run_losses(const RunConfig& c, TrainResult* out = nullptr) {
  Trainer t(c);
  t.setup();
  auto r = t.train();
  t.cleanup();
  if (out) *out = r;
  return r.losses;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override { corpus(tmp.path); }
  TmpDir tmp;
};

TEST_F(TrainerTest, LossDecreasesAndCheckpointIsWritten) {
  TrainResult r;
  auto l = run_losses(make_cfg(tmp.path, {"trainer.max_steps=12"}), &r);
  ASSERT_EQ(l.size(), 12u);
  EXPECT_LT(r.val_after, r.val_before);
  EXPECT_TRUE(sfs::exists(tmp.path + "/run/checkpoints/latest"));
  EXPECT_TRUE(sfs::exists(tmp.path + "/run/config.yaml"));
  EXPECT_TRUE(sfs::exists(tmp.path + "/run/metrics.jsonl"));
  EXPECT_FALSE(resolve_checkpoint(tmp.path + "/run").empty());
}

TEST_F(TrainerTest, ResumeContinuesTheIdenticalLossCurve) {
  // Uninterrupted: 2N steps.
  auto full = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a", "trainer.max_steps=8"}));
  // Interrupted: N steps (same schedule horizon), then a new process-equivalent Trainer resumes.
  auto first = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=4",
                                              "trainer.schedule.total_steps=8"}));
  auto second = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=8"}));
  ASSERT_EQ(full.size(), 8u);
  ASSERT_EQ(first.size(), 4u);
  ASSERT_EQ(second.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(first[i], full[i]) << "step " << i + 1;
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(second[i], full[4 + i]) << "step " << 5 + i;
  // metrics.jsonl holds each step exactly once after the resume.
  std::ifstream m(tmp.path + "/b/metrics.jsonl");
  std::string line;
  int train_lines = 0;
  while (std::getline(m, line)) train_lines += line.find("\"loss\"") != std::string::npos;
  EXPECT_EQ(train_lines, 8);
}

TEST_F(TrainerTest, ResumeAcrossAnEpochBoundaryMidEpoch) {
  // 1500 lines -> ~ a few dozen sequences; batch 8 -> few steps per epoch: crossing epochs on resume.
  auto full = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a", "trainer.max_steps=14"}));
  run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=5", "trainer.schedule.total_steps=14"}));
  auto second = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=14"}));
  ASSERT_EQ(second.size(), 9u);
  for (int i = 0; i < 9; ++i) EXPECT_DOUBLE_EQ(second[i], full[5 + i]) << "step " << 6 + i;
}

TEST_F(TrainerTest, GradientAccumulationEqualsTheFullBatch) {
  auto big = make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/a", "trainer.max_steps=4", "trainer.batch_size=8"});
  auto acc = make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=4", "trainer.batch_size=2",
                                 "trainer.grad_accum=4"});
  Trainer a(big), b(acc);
  a.setup();
  b.setup();
  auto la = a.train().losses, lb = b.train().losses;
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(la[i], lb[i], 1e-5 * std::abs(la[i])) << "step " << i + 1;
  auto pa = a.model().named_parameters(), pb = b.model().named_parameters();
  for (auto& p : pa) EXPECT_TRUE(at::allclose(p.value(), pb[p.key()], 1e-4, 1e-5)) << p.key();
}

TEST_F(TrainerTest, NonFiniteLossStopsWithoutSaving) {
  auto c = make_cfg(tmp.path, {"trainer.max_steps=6", "trainer.save_every=2"});
  {
    Trainer t(c);
    t.setup();
    t.train();
  }
  auto before = resolve_checkpoint(tmp.path + "/run");
  auto state_before = fs::read_file(before + "/trainer_state.json");
  c.trainer.max_steps = 10;
  Trainer t(c);
  t.setup();
  {
    at::NoGradGuard ng;
    t.model().named_parameters()["model.norm.weight"].fill_(std::numeric_limits<float>::quiet_NaN());
  }
  EXPECT_THROW(t.train(), DivergedError);
  EXPECT_EQ(resolve_checkpoint(tmp.path + "/run"), before);
  EXPECT_EQ(fs::read_file(before + "/trainer_state.json"), state_before);
}

TEST_F(TrainerTest, Bf16AutocastAndGpt2FamilyTrain) {
  TrainResult r;
  auto l = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/bf16", "trainer.precision=bf16",
                                          "trainer.max_steps=6"}),
                      &r);
  ASSERT_EQ(l.size(), 6u);
  for (double v : l) EXPECT_TRUE(std::isfinite(v));
  EXPECT_LT(r.val_after, r.val_before);
  auto g = run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/gpt2", "model.family=gpt2", "model.n_kv_heads=0",
                                          "trainer.max_steps=6"}),
                      &r);
  EXPECT_LT(r.val_after, r.val_before);
  EXPECT_TRUE(sfs::exists(tmp.path + "/gpt2/checkpoints/latest"));
}

TEST(Schedule, WarmupCosineLinearConstant) {
  ScheduleConfig s;
  s.warmup_steps = 10;
  s.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(s.factor(0, 110), 0.1);
  EXPECT_DOUBLE_EQ(s.factor(9, 110), 1.0);
  EXPECT_DOUBLE_EQ(s.factor(10, 110), 1.0);
  EXPECT_NEAR(s.factor(60, 110), 0.55, 1e-12);  // halfway through cosine: (1 + 0.1) / 2
  EXPECT_NEAR(s.factor(110, 110), 0.1, 1e-12);
  s.type = Schedule::Linear;
  EXPECT_NEAR(s.factor(60, 110), 0.55, 1e-12);
  EXPECT_NEAR(s.factor(35, 110), 0.775, 1e-12);
  s.type = Schedule::Constant;
  EXPECT_DOUBLE_EQ(s.factor(100, 110), 1.0);
  s.type = Schedule::Cosine;
  s.total_steps = 210;  // horizon decoupled from max_steps
  EXPECT_NEAR(s.factor(110, 110), 0.55, 1e-12);
}

// A checkpoint save killed at a random moment never damages the previous checkpoint.
TEST(Checkpoint, SigkillDuringSaveLeavesPreviousCheckpointLoadable) {
  TmpDir tmp;
  const std::string root = tmp.path + "/checkpoints";
  // Tensors are allocated before fork(); the child fills them with plain loops (no ATen thread pool).
  auto w = at::empty({512, 1024}), m = at::empty({512, 1024});
  auto data_for = [&](int64_t step) {
    std::fill(w.data_ptr<float>(), w.data_ptr<float>() + w.numel(), (float)step);
    std::fill(m.data_ptr<float>(), m.data_ptr<float>() + m.numel(), (float)-step);
    CheckpointData d;
    d.model.emplace_back("w", w);  // 2 MB per file
    d.optimizer.emplace_back("exp_avg/w", m);
    d.state = {{"step", step}};
    return d;
  };
  save_checkpoint(root, 1, data_for(1), 2);
  for (int trial = 0; trial < 6; ++trial) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (int64_t s = 2 + 1000 * trial;; ++s) save_checkpoint(root, s, data_for(s), 2);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5 + 23 * trial));
    kill(pid, SIGKILL);
    int st = 0;
    waitpid(pid, &st, 0);
    auto dir = resolve_checkpoint(tmp.path);
    ASSERT_FALSE(dir.empty());
    auto d = load_checkpoint(dir, true);
    int64_t step = d.state["step"].get<int64_t>();
    EXPECT_TRUE(at::equal(d.model[0].second, at::full({512, 1024}, (float)step))) << dir;
    EXPECT_TRUE(at::equal(d.optimizer[0].second, at::full({512, 1024}, (float)-step))) << dir;
  }
}

// Re-saving an existing step (issue 16): a fault (a throw standing for a kill) at every rename/fsync
// point of the save leaves `latest` naming a complete checkpoint, holding the old or the new save, and
// the next save (a resume) succeeds and leaves no temp dirs behind. Before the fix a kill after the
// live step dir was moved aside left `latest` dangling.
TEST(Checkpoint, ResaveFaultAtEveryPointKeepsLatestLoadable) {
  struct Fault : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  auto data_for = [](float v) {
    CheckpointData d;
    d.model.emplace_back("w", at::full({4, 8}, v));
    d.optimizer.emplace_back("exp_avg/w", at::full({4, 8}, -v));
    d.state = {{"step", 4}, {"v", v}};
    return d;
  };
  const std::vector<std::string> points = {"written",   "next",   "latest_next",    "old_aside",
                                           "linked",    "final_in_place", "latest_final"};
  std::set<std::string> seen;
  for (const auto& point : points) {
    TmpDir tmp;
    const std::string root = tmp.path + "/checkpoints";
    save_checkpoint(root, 2, data_for(2), 3);
    save_checkpoint(root, 4, data_for(1), 3);
    set_checkpoint_fault_hook([&](const char* p) {
      seen.insert(p);
      if (point == p) throw Fault(p);
    });
    EXPECT_THROW(save_checkpoint(root, 4, data_for(7), 3), Fault) << point;
    set_checkpoint_fault_hook(nullptr);
    // What a reader (eval/export) or a resuming trainer sees right after the kill.
    auto dir = resolve_checkpoint(tmp.path);
    ASSERT_FALSE(dir.empty()) << point;
    auto d = load_checkpoint(dir, true);
    const float v = d.state["v"].get<float>();
    EXPECT_TRUE(v == 1.f || v == 7.f) << point << ": " << v;
    EXPECT_TRUE(at::equal(d.model[0].second, at::full({4, 8}, v))) << point;
    EXPECT_TRUE(at::equal(d.optimizer[0].second, at::full({4, 8}, -v))) << point;
    // The trainer's start-up recovery, then the resumed run's save of the same step.
    recover_checkpoints(root);
    dir = resolve_checkpoint(tmp.path);
    ASSERT_FALSE(dir.empty()) << point;
    EXPECT_EQ(load_checkpoint(dir, true).state["v"].get<float>(), v) << point;
    save_checkpoint(root, 4, data_for(9), 3);
    dir = resolve_checkpoint(tmp.path);
    EXPECT_EQ(std::filesystem::path(dir).filename(), "step_00000004") << point;
    EXPECT_EQ(load_checkpoint(dir, true).state["v"].get<float>(), 9.f) << point;
    EXPECT_EQ(load_checkpoint(root + "/step_00000002", true).state["v"].get<float>(), 2.f) << point;
    for (auto& e : std::filesystem::directory_iterator(root))
      EXPECT_NE(e.path().filename().string()[0], '.') << point << ": left behind " << e.path();
  }
  for (const auto& p : points) EXPECT_TRUE(seen.count(p)) << "fault point '" << p << "' never reached";
}

// A save that fails (a full disk) leaves no .step_N.tmp<PID> behind; one a killed process left is
// removed at the next start (dead PIDs only; a live process's temp dir is kept).
TEST(Checkpoint, DeadSaveTempDirsAreRemovedLiveOnesKept) {
  TmpDir tmp;
  const std::string root = tmp.path + "/checkpoints";
  CheckpointData d;
  d.model.emplace_back("w", at::ones({2, 2}));
  d.state = {{"step", 1}};
  save_checkpoint(root, 1, d, 2);
  pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);  // a PID that is surely dead now
  const std::string dead = root + "/.step_00000002.tmp" + std::to_string(child);
  const std::string live = root + "/.step_00000002.tmp" + std::to_string(::getppid());
  qf::testing::write_text(dead + "/model.safetensors", "partial");
  qf::testing::write_text(live + "/model.safetensors", "partial");
  recover_checkpoints(root);
  EXPECT_FALSE(std::filesystem::exists(dead));
  EXPECT_TRUE(std::filesystem::exists(live));
  EXPECT_EQ(std::filesystem::path(resolve_checkpoint(tmp.path)).filename(), "step_00000001");
}

// Issue 16: trainer_state.json is checked where it is read: a known key of the wrong JSON type or
// range is an InputError naming the file, the key, what was expected and what was found.
TEST(Checkpoint, MistypedTrainerStateNamesFileAndKey) {
  TmpDir tmp;
  const std::string root = tmp.path + "/checkpoints";
  CheckpointData d;
  d.model.emplace_back("w", at::zeros({2}));
  d.state = {{"step", 3}, {"sampler", {{"epoch", 0}, {"cursor", 1}}}, {"model_format", "fp"}, {"lora", false}};
  const std::string dir = save_checkpoint(root, 3, d, 1);
  const std::string path = dir + "/trainer_state.json";
  EXPECT_EQ(load_checkpoint(dir, false).state["step"].get<int64_t>(), 3);
  for (const auto& [state, want] : std::vector<std::pair<std::string, std::string>>{
           {R"({"step": "3"})", "'step': expected a non-negative integer, found \"3\""},
           {R"({"step": -1})", "'step': expected a non-negative integer, found -1"},
           {R"({"sampler": {"epoch": 0, "cursor": 1.5}})", "'sampler.cursor': expected a non-negative integer, found 1.5"},
           {R"({"sampler": [0, 1]})", "'sampler': expected an object, found [0,1]"},
           {R"({"lora": "false"})", "'lora': expected true or false, found \"false\""},
           {R"({"vocab_size": 0})", "'vocab_size': expected a positive integer, found 0"},
           {R"({"model_format": "int4"})", "'model_format': expected fp, fake_quant or converted, found \"int4\""},
           {R"([3])", "expected a JSON object (step, sampler, model_format, ...), found [3]"},
           {R"({"step": 3)", "not valid JSON (line 1, column "}}) {
    fs::write_atomic(path, state);
    try {
      load_checkpoint(dir, false);
      ADD_FAILURE() << "accepted " << state;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(path + ": " + want), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find("[json.exception"), std::string::npos) << e.what();
    }
  }
}

TEST(Checkpoint, ModelStateRoundTripAndShapeMismatchIsNamed) {
  models::ModelConfig c;
  c.vocab_size = 50;
  c.dim = 16;
  c.n_layers = 1;
  c.n_heads = 2;
  auto a = models::build_model(c);
  auto b = models::build_model(c);
  b->init_weights(99);
  load_model_state(*b, model_state(*a), "<mem>");
  for (auto& p : a->named_parameters()) EXPECT_TRUE(at::equal(p.value(), b->named_parameters()[p.key()]));
  c.dim = 32;
  auto wrong = models::build_model(c);
  try {
    load_model_state(*wrong, model_state(*a), "ckpt/model.safetensors");
    FAIL() << "expected an error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("ckpt/model.safetensors"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens.weight"), std::string::npos) << e.what();
  }
}

}  // namespace

// optimizer.safetensors from another model or run is an error naming the file, the parameter and the
// shapes (or counts), not a silent AdamW restart; legitimate subsets (a ZeRO rank's share, parameters
// that never stepped) still load.
TEST(Checkpoint, ForeignOptimizerStateIsAnErrorNamingFileParameterAndShapes) {
  models::ModelConfig c;
  c.vocab_size = 50;
  c.dim = 16;
  c.n_layers = 1;
  c.n_heads = 2;
  auto stepped = [](torch::nn::Module& m) {
    auto opt = std::make_unique<torch::optim::AdamW>(m.parameters(), torch::optim::AdamWOptions(1e-3));
    for (auto& p : m.parameters()) p.mutable_grad() = at::ones_like(p);
    opt->step();
    return opt;
  };
  auto a = models::build_model(c);
  auto opt_a = stepped(*a);
  const auto state = optimizer_state(*a, *opt_a);
  auto error = [&](torch::nn::Module& m, const NamedTensors& s) {
    torch::optim::AdamW opt(m.parameters(), torch::optim::AdamWOptions(1e-3));
    try {
      load_optimizer_state(m, opt, s, "ck/optimizer.safetensors");
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // Same model: loads; a rank holding only some parameters (ZeRO) takes its share.
  auto b = models::build_model(c);
  EXPECT_EQ(error(*b, state), "");
  std::vector<at::Tensor> share{b->parameters()[0]};
  torch::optim::AdamW zero(share, torch::optim::AdamWOptions(1e-3));
  load_optimizer_state(*b, zero, state, "ck/optimizer.safetensors");
  EXPECT_EQ(zero.state().size(), 1u);
  // Only some parameters stepped: fine.
  EXPECT_EQ(error(*b, NamedTensors(state.begin(), state.begin() + 3)), "");
  // Another width: the shapes are named.
  c.dim = 32;
  auto wider = models::build_model(c);
  auto e = error(*wider, state);
  EXPECT_NE(e.find("ck/optimizer.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("has shape [50, 16] but parameter 'lm_head.weight' has shape [50, 32]"), std::string::npos) << e;
  EXPECT_NE(e.find("delete ck/optimizer.safetensors to restart the optimizer"), std::string::npos) << e;
  // Another depth: state for a parameter the model does not have, and the counts.
  c.dim = 16;
  c.n_layers = 2;
  auto deeper = models::build_model(c);
  auto opt_d = stepped(*deeper);
  auto foreign = optimizer_state(*deeper, *opt_d);
  e = error(*a, foreign);
  EXPECT_NE(e.find("holds optimizer state for 'model.layers.1."), std::string::npos) << e;
  EXPECT_NE(e.find("which is not a trainable parameter of this model"), std::string::npos) << e;
  EXPECT_NE(e.find("the file holds AdamW state for " + std::to_string(deeper->parameters().size()) +
                   " parameters, the model trains " + std::to_string(a->parameters().size())),
            std::string::npos)
      << e;
  // Frozen in this model (a LoRA base): its state is foreign too.
  for (auto& p : b->parameters()) p.set_requires_grad(false);
  e = error(*b, state);
  EXPECT_NE(e.find("the model trains 0"), std::string::npos) << e;
  // Incomplete state.
  e = error(*a, NamedTensors(state.begin(), state.begin() + 2));
  EXPECT_NE(e.find("incomplete optimizer state for"), std::string::npos) << e;
}


// ---------------- LoRA / QLoRA runs ----------------
TEST_F(TrainerTest, QloraTrainsOnlyAdaptersResumesIdenticallyAndWritesAPeftAdapter) {
  const std::vector<std::string> q{"peft.r=4", "peft.alpha=8", "peft.base=nf4", "trainer.optim.lr=0.01",
                                   "trainer.save_every=4"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), q.begin(), q.end());
    return make_cfg(tmp.path, extra);
  };
  TrainResult r;
  auto full = run_losses(with({"run.out_dir=" + tmp.path + "/a", "trainer.max_steps=8"}), &r);
  EXPECT_LT(r.val_after, r.val_before);
  EXPECT_TRUE(sfs::exists(tmp.path + "/a/adapter/adapter_model.safetensors"));
  EXPECT_TRUE(sfs::exists(tmp.path + "/a/adapter/adapter_config.json"));
  // The NF4 base is frozen: identical bytes at step 4 and step 8; the adapters moved.
  auto s4 = load_checkpoint(tmp.path + "/a/checkpoints/step_00000004", false).model;
  auto s8 = load_checkpoint(tmp.path + "/a/checkpoints/step_00000008", false).model;
  auto get = [](const NamedTensors& s, const std::string& n) {
    for (auto& [k, v] : s)
      if (k == n) return v;
    ADD_FAILURE() << "no tensor " << n;
    return at::Tensor();
  };
  const std::string l = "model.layers.1.mlp.down_proj.";
  EXPECT_EQ(get(s8, l + "base_layer.weight").scalar_type(), at::kByte);
  EXPECT_TRUE(at::equal(get(s4, l + "base_layer.weight"), get(s8, l + "base_layer.weight")));
  EXPECT_TRUE(at::equal(get(s4, "model.embed_tokens.weight"), get(s8, "model.embed_tokens.weight")));
  EXPECT_FALSE(at::equal(get(s4, l + "lora_B.weight"), get(s8, l + "lora_B.weight")));
  // Resume mid-run continues the identical loss curve.
  run_losses(with({"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=4", "trainer.schedule.total_steps=8"}));
  auto second = run_losses(with({"run.out_dir=" + tmp.path + "/b", "trainer.max_steps=8"}));
  ASSERT_EQ(second.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(second[i], full[4 + i]) << "step " << 5 + i;
  // The run loads back (eval path) as an NF4 + LoRA model with the same validation loss.
  auto lr = load_run(tmp.path + "/a", {});
  EXPECT_EQ(lr.format, "fp+lora");
  EXPECT_EQ(peft::lora_layers(*lr.model).size(), 14u);
}

TEST_F(TrainerTest, QatLoraExactMergeConvertsToTheTrainedModel) {
  TrainResult r;
  run_losses(make_cfg(tmp.path, {"trainer.max_steps=6", "peft.r=4", "peft.exact_merge=true",
                                 "quant.rules=[{pattern: 'model.layers.*', weight: {preset: q4_0}}]"}),
             &r);
  ASSERT_FALSE(r.converted.empty());
  ASSERT_GT(r.val_after, 0);
  // Validation loss of the trained fake-quant+LoRA model == that of merged-then-converted weights.
  EXPECT_NEAR(r.val_converted, r.val_after, 1e-5 * r.val_after);
}

// Activation checkpointing and the chunked loss change memory, not the run: the loss curve of
// every training mode equals the plain run's. LoRA dropout checks that the recompute draws the same
// mask (RNG), the moving-average observer that the recompute does not observe twice, the learned
// scales (LSQ) and accumulation that parameter gradients arrive once per backward.
TEST_F(TrainerTest, ActivationCheckpointingAndChunkedLossKeepTheLossCurve) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> modes{
      {"full", {}},
      {"lora+dropout", {"peft.r=4", "peft.dropout=0.2", "trainer.optim.lr=0.01"}},
      {"qlora", {"peft.r=4", "peft.base=nf4", "trainer.optim.lr=0.01", "trainer.grad_accum=2", "trainer.batch_size=4"}},
      {"qat lsq + observed activations",
       {"quant.rules=[{pattern: 'model.layers.*', weight: {bits: 4, granularity: per-group, group_size: 16, learn: lsq}, "
        "activation: {bits: 8, granularity: per-tensor}}]",
        "quant.observer.type=moving-average", "quant.convert_at_end=false"}},
      {"qat+lora", {"peft.r=4", "quant.rules=[{pattern: 'model.layers.*', weight: {preset: int4-g32}}]",
                    "quant.convert_at_end=false"}},
      {"gpt2 bf16", {"model.family=gpt2", "model.n_kv_heads=0", "trainer.precision=bf16"}},
  };
  int n = 0;
  for (auto& [name, extra] : modes) {
    auto run = [&, &extra = extra](std::vector<std::string> more) {
      more.insert(more.end(), extra.begin(), extra.end());
      more.push_back("run.out_dir=" + tmp.path + "/r" + std::to_string(n++));
      more.push_back("trainer.max_steps=4");
      return run_losses(make_cfg(tmp.path, more));
    };
    auto plain = run({"trainer.loss_chunk_tokens=0"});
    auto ckpt = run({"trainer.activation_checkpointing=true", "trainer.loss_chunk_tokens=48"});
    auto every2 = run({"trainer.activation_checkpointing=true", "trainer.activation_checkpointing_every=2"});
    ASSERT_EQ(plain.size(), 4u) << name;
    ASSERT_EQ(ckpt.size(), 4u) << name;
    ASSERT_EQ(every2.size(), 4u) << name;
    const double tol = name.find("bf16") != std::string::npos ? 1e-4 : 2e-6;
    for (size_t i = 0; i < plain.size(); ++i) {
      EXPECT_NEAR(ckpt[i], plain[i], tol * plain[i]) << name << ", step " << i + 1 << " (every layer, chunked loss)";
      EXPECT_NEAR(every2[i], plain[i], tol * plain[i]) << name << ", step " << i + 1 << " (every 2nd layer)";
    }
  }
}

// distill: the loss is ce_weight * CE + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) over the
// labelled rows, written here with ATen's kl_div; chunked equals unchunked (value and gradients);
// a teacher identical to the student gives 0 and no gradient.
TEST(DistillLoss, EqualsKlDivFormulaChunkedOrNotAndSkipsUnlabelledRows) {
  auto mc = qf::testing::tiny_llama(/*vocab=*/64, /*max_seq_len=*/32, /*init_std=*/0.3);
  auto student = models::build_model(mc), teacher = models::build_model(mc);
  student->init_weights(1);
  teacher->init_weights(2);
  for (auto& p : teacher->parameters()) p.set_requires_grad(false);
  at::manual_seed(3);
  data::Batch b;
  b.input_ids = at::randint(0, 64, {2, 16}, at::kLong);
  b.labels = at::randint(0, 64, {2, 16}, at::kLong);
  b.labels.index_put_({0, at::indexing::Slice(0, 5)}, -100);
  b.labels.index_put_({1, 9}, -100);
  const at::Device cpu(at::kCPU);
  DistillTarget kd;
  kd.teacher = teacher.get();
  kd.kd_weight = 0.7;
  kd.ce_weight = 0.3;
  kd.temperature = 2.0;
  {
    at::NoGradGuard ng;
    kd.hidden = eval_hidden(*teacher, b.input_ids, cpu, false);
  }
  auto loss_and_grads = [&](int64_t chunk) {
    student->zero_grad();
    auto l = hidden_loss_sum(*student, eval_hidden(*student, b.input_ids, cpu, false), b.labels, cpu, false, chunk, &kd);
    l.backward();
    std::vector<at::Tensor> g;
    for (auto& p : student->parameters()) g.push_back(p.grad().clone());
    return std::make_pair(l.item<double>(), g);
  };
  auto [whole, gw] = loss_and_grads(0);
  auto [chunked, gc] = loss_and_grads(5);  // 32 rows in chunks of 5, one chunk wholly unlabelled
  // The formula, from the full logits.
  double ref;
  {
    at::NoGradGuard ng;
    auto s = student->logits(student->hidden(b.input_ids)).reshape({-1, 64});
    auto t = teacher->logits(teacher->hidden(b.input_ids)).reshape({-1, 64});
    auto lab = b.labels.reshape({-1});
    auto kl = at::kl_div(at::log_softmax(s / 2.0, -1), at::log_softmax(t / 2.0, -1), at::Reduction::None, /*log_target=*/true)
                  .sum(-1);
    auto mask = (lab != -100).to(at::kFloat);
    ref = 0.7 * 4.0 * (kl * mask).sum().item<double>() +
          0.3 * at::cross_entropy_loss(s, lab, {}, at::Reduction::Sum, -100).item<double>();
  }
  EXPECT_GT(ref, 0.1);
  EXPECT_NEAR(whole, ref, 1e-5 * ref);
  EXPECT_NEAR(chunked, ref, 1e-5 * ref);
  for (size_t i = 0; i < gw.size(); ++i)
    EXPECT_LE((gw[i] - gc[i]).abs().max().item<double>(), 1e-5 * gw[i].abs().max().item<double>() + 1e-8)
        << "parameter " << i << " (fp32 summation order only)";
  // The student as its own teacher: KL 0, gradient 0.
  kd.teacher = student.get();
  kd.ce_weight = 0;
  {
    at::NoGradGuard ng;
    kd.hidden = eval_hidden(*student, b.input_ids, cpu, false);
  }
  auto [self, gs] = loss_and_grads(5);
  EXPECT_NEAR(self, 0.0, 1e-6);
  for (auto& g : gs) EXPECT_LT(g.abs().max().item<double>(), 1e-6);
}

// distill.teacher: init from a float run: a QAT run's first loss is the fake-quant model's KL from the
// float one (no QAT: exactly 0), it resumes on the identical loss curve, and it ends closer to the
// teacher (mean KLD on the validation split) than the same QAT steps on the labels.
TEST_F(TrainerTest, DistillFromInitTrainsQatTowardTheTeacherAndResumesIdentically) {
  run_losses(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/fp", "trainer.max_steps=40", "trainer.optim.lr=0.01"}));
  const std::string q4 = "quant.rules=[{pattern: 'model.layers.*', weight: {bits: 3, granularity: per-channel}}]";
  auto cfg = [&](const std::string& out, std::vector<std::string> more) {
    more.insert(more.end(), {"run.out_dir=" + tmp.path + "/" + out, "run.init_from=" + tmp.path + "/fp",
                             "trainer.optim.lr=0.0003", "trainer.optim.weight_decay=0"});
    return make_cfg(tmp.path, more);
  };
  auto same = run_losses(cfg("same", {"distill.teacher=init", "trainer.max_steps=1", "trainer.schedule.warmup_steps=0"}));
  ASSERT_EQ(same.size(), 1u);
  EXPECT_NEAR(same[0], 0.0, 1e-7);
  auto full = run_losses(cfg("kd", {q4, "distill.teacher=init", "trainer.max_steps=8"}));
  auto first = run_losses(cfg("kd_b", {q4, "distill.teacher=init", "trainer.max_steps=4", "trainer.schedule.total_steps=8"}));
  auto second = run_losses(cfg("kd_b", {q4, "distill.teacher=init", "trainer.max_steps=8"}));
  ASSERT_EQ(full.size(), 8u);
  ASSERT_EQ(second.size(), 4u);
  EXPECT_GT(full[0], 1e-4);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(first[i], full[i]) << "step " << i + 1;
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(second[i], full[4 + i]) << "step " << 5 + i;
  EXPECT_LT(full.back(), full[0]);

  auto ce = run_losses(cfg("ce", {q4, "trainer.max_steps=8"}));
  // Both converted models against the float one on the validation split.
  auto ref = load_model(tmp.path + "/fp", {});
  auto kld = [&](const std::string& run) {
    auto m = load_model(tmp.path + "/" + run, {});
    Trainer t(make_cfg(tmp.path, {"run.out_dir=" + tmp.path + "/probe"}));  // the same data split
    auto data = data::build_dataset(t.config().data, *m.tok);
    return statistics(compare_models(*ref.model, *m.model, data.val, 8, 0, at::Device(at::kCPU), false)).kld.value;
  };
  const double k_kd = kld("kd"), k_ce = kld("ce");
  EXPECT_LT(k_kd, k_ce) << "distilled QAT KLD " << k_kd << " vs label-trained QAT KLD " << k_ce;
}

// The ConfigError message of a minimal recipe plus `extra` YAML ("" when it parses).
static std::string parse(const std::string& extra) {
  return qf::testing::config_error_of(
      [&] { parse_run_config(YAML::Load("model: {dim: 32, n_heads: 4}\n" + extra), "<test>"); });
}

TEST_F(TrainerTest, DistillSettingsErrorsNameTheKey) {
  EXPECT_NE(parse("distill: {teacher: /nonexistent/teacher}").find("distill.teacher: '/nonexistent/teacher' does not exist"),
            std::string::npos);
  EXPECT_NE(parse("distill: {teacher: init, kd_weight: 0}").find("distill.kd_weight"), std::string::npos);
  EXPECT_NE(parse("distill: {teacher: init, temperature: 0}").find("distill.temperature"), std::string::npos);
  EXPECT_NE(parse("distill: {teacher: init, kd_wieght: 1}").find("distill.kd_wieght"), std::string::npos);
  // init without starting weights: named when the run sets up.
  Trainer t(make_cfg(tmp.path, {"distill.teacher=init"}));
  try {
    t.setup();
    ADD_FAILURE() << "setup accepted distill.teacher: init on a randomly initialised model";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("distill.teacher: init"), std::string::npos) << e.what();
  }
}

TEST(RunConfigPeft, InconsistentPeftSettingsAreConfigErrors) {
  EXPECT_NE(parse("peft: {r: 4, exact_merge: true}").find("peft.exact_merge: needs fake-quant layers"),
            std::string::npos);
  EXPECT_NE(parse("peft: {r: 4, base: nf4}\nquant: {rules: [{pattern: '*', weight: {preset: q4_0}}]}")
                .find("peft.base: nf4 storage cannot be combined with quant rules"),
            std::string::npos);
  EXPECT_NE(parse("peft: {r: 4, base: nf3}").find("peft.base"), std::string::npos);
  EXPECT_NE(parse("peft: {r: 4, nf4: {blocksize: 48}}").find("peft.nf4.blocksize"), std::string::npos);
  EXPECT_NE(parse("peft: {r: 4, exact_merge: true, dropout: 0.1}\nquant: {rules: [{weight: {preset: q4_0}}]}")
                .find("needs dropout 0"),
            std::string::npos);
}

// The metrics component (trainer/metrics.h): resuming keeps the lines up to the checkpoint's step
// byte for byte, drops an unfinished last line (a kill mid-write) and refuses a corrupt middle
// line naming file and line; a write that cannot land is an error, not a lost line.
TEST(MetricsLog, ResumeTruncationAndWriteFailuresAreReported) {
  TmpDir tmp;
  const std::string p = tmp.path + "/metrics.jsonl";
  std::ofstream(p) << "{\"step\":1,\"loss\":3.5}\n{\"step\":2,\"loss\":3.25}\n{\"step\":3,\"loss\":3}\n{\"step\":4,\"lo";
  MetricsLog::keep_until(p, 2);
  EXPECT_EQ(qf::fs::read_file(p), "{\"step\":1,\"loss\":3.5}\n{\"step\":2,\"loss\":3.25}\n");
  std::ofstream(p) << "{\"step\":1}\nnot json\n{\"step\":3}\n";
  try {
    MetricsLog::keep_until(p, 2);
    ADD_FAILURE() << "a corrupt line was accepted";
  } catch (const qf::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(p + ":2: not a metrics line"), std::string::npos) << e.what();
  }
  EXPECT_EQ(qf::fs::read_file(p), "{\"step\":1}\nnot json\n{\"step\":3}\n") << "nothing is rewritten on error";

  const std::string run = tmp.path + "/run";
  std::filesystem::create_directories(run);
  MetricsLog m;
  m.open(run, -1);
  m.write({{"step", 1}, {"loss", 2.0}});
  EXPECT_EQ(qf::fs::read_file(run + "/metrics.jsonl"), "{\"loss\":2.0,\"step\":1}\n");
  qf::fs::remove_tree(run + "/metrics.jsonl");
  std::filesystem::create_directories(run + "/metrics.jsonl");  // a directory where the file should be
  EXPECT_THROW(m.write({{"step", 2}, {"loss", 1.0}}), qf::InputError);
  m.close();
}
