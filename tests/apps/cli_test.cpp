// The qforge binary end to end: --help everywhere, exit codes (2 = config, 1 = input), clear
// messages naming the file/key, nothing written on a rejected config, train -> eval -> generate.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <vector>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "core/fs.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

namespace sfs = std::filesystem;

namespace {

struct Result {
  int rc;
  std::string out;
};

// A shell command line (in the source dir, progress bars off), stdout + stderr.
Result run_sh(const std::string& line) {
  std::string cmd = std::string("cd ") + QFORGE_SOURCE_DIR + " && export QFORGE_PROGRESS=0 && " + line + " 2>&1";
  Result r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

Result run(const std::string& args) { return run_sh(std::string(QFORGE_BINARY) + " " + args); }

struct TmpDir : qf::testing::TmpDir {
  TmpDir() : qf::testing::TmpDir("qf_cli") {}
};

class Cli : public ::testing::Test {
 public:  // also for the helpers shared by several tests
  void SetUp() override {
    std::ifstream in(std::string(QFORGE_SOURCE_DIR) + "/data/corpora/kjv.txt");
    std::ofstream o(tmp.path + "/corpus.txt");
    std::string line;
    for (int n = 0; n < 1200 && std::getline(in, line); ++n) o << line << "\n";
    cfg = tmp.path + "/run.yaml";
    std::ofstream(cfg) << "# Run: qforge train run.yaml\n"
                          "run: {name: cli, out_dir: "
                       << tmp.path << "/run, threads: 1}\n"
                       << "tokenizer: {path: " << tmp.path << "/tok.model, train: {enabled: true, sources: ["
                       << tmp.path << "/corpus.txt], vocab_size: 400}}\n"
                       << "model: {dim: 32, n_layers: 2, n_heads: 4, ffn_dim: 64, max_seq_len: 64}\n"
                       << "data: {sources: [{path: " << tmp.path << "/corpus.txt, split: line}], seq_len: 32, cache_dir: "
                       << tmp.path << "/cache}\n"
                       << "trainer: {max_steps: 6, batch_size: 4, eval_batches: 2, schedule: {warmup_steps: 1}}\n"
                       << "sample: {prompts: ['And God'], max_new_tokens: 8}\n";
  }
  TmpDir tmp;
  std::string cfg;
};

TEST_F(Cli, HelpOnEveryCommand) {
  for (std::string c : {"", "train ", "eval ", "generate ", "export ", "inspect ", "quantize ", "launch "}) {
    auto r = run(c + "--help");
    EXPECT_EQ(r.rc, 0) << c << r.out;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << c << r.out;
  }
  EXPECT_NE(run("").rc, 0);
}

TEST_F(Cli, TrainEvalGenerateEndToEnd) {
  auto t = run("train " + cfg);
  ASSERT_EQ(t.rc, 0) << t.out;
  EXPECT_NE(t.out.find("after training"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("--- sample"), std::string::npos) << t.out;
  EXPECT_TRUE(sfs::exists(tmp.path + "/run/config.yaml"));
  EXPECT_TRUE(sfs::exists(tmp.path + "/run/metrics.jsonl"));
  bool tb = false;
  for (auto& e : sfs::directory_iterator(tmp.path + "/run/tb")) tb |= e.path().filename().string().rfind("events.out.tfevents", 0) == 0;
  EXPECT_TRUE(tb);
  auto e = run("eval " + tmp.path + "/run");
  ASSERT_EQ(e.rc, 0) << e.out;
  EXPECT_NE(e.out.find("perplexity"), std::string::npos) << e.out;
  auto g = run("generate " + tmp.path + "/run --prompt 'And God said' -n 5 -t 0");
  ASSERT_EQ(g.rc, 0) << g.out;
  EXPECT_NE(g.out.find("And God said"), std::string::npos) << g.out;
  auto g2 = run("generate " + tmp.path + "/run --prompt 'And God said' -n 5 -t 0");
  EXPECT_EQ(g.out, g2.out);  // greedy is deterministic
  auto pc = run("train " + cfg + " --print-config trainer.max_steps=77");
  ASSERT_EQ(pc.rc, 0);
  EXPECT_NE(pc.out.find("max_steps: 77"), std::string::npos) << pc.out;
}

TEST_F(Cli, BadConfigExitsTwoAndWritesNothing) {
  auto r = run("train " + cfg + " trainer.max_stepz=1 model.dim=abc");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("trainer.max_stepz: unknown key"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model.dim: expected an integer"), std::string::npos) << r.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/run"));
  auto s = run("train " + cfg + " data.seq_len=500");
  EXPECT_EQ(s.rc, 2) << s.out;
  EXPECT_NE(s.out.find("data.seq_len: 500 exceeds model.max_seq_len 64"), std::string::npos) << s.out;
  auto t = run("train " + cfg + " tokenizer.train.enabled=false");
  EXPECT_EQ(t.rc, 2) << t.out;
  EXPECT_NE(t.out.find("tok.model"), std::string::npos) << t.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/run"));
}

TEST_F(Cli, MalformedYaml) {
  std::ofstream(tmp.path + "/bad.yaml") << "model: {dim: 64\n";
  auto r = run("train " + tmp.path + "/bad.yaml");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find(tmp.path + "/bad.yaml:"), std::string::npos) << r.out;
}

TEST_F(Cli, EmptyCorpusNamesThePath) {
  std::ofstream(tmp.path + "/empty.txt") << "";
  auto r = run("train " + cfg + " 'data.sources=[{path: " + tmp.path + "/empty.txt}]'");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find(tmp.path + "/empty.txt"), std::string::npos) << r.out;
  sfs::create_directories(tmp.path + "/emptydir");
  auto d = run("train " + cfg + " 'data.sources=[{path: " + tmp.path + "/emptydir}]'");
  EXPECT_EQ(d.rc, 1) << d.out;
  EXPECT_NE(d.out.find(tmp.path + "/emptydir"), std::string::npos) << d.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/run"));  // nothing half-written
}

TEST_F(Cli, UnwritableRunDirectory) {
  std::ofstream(tmp.path + "/afile") << "x";
  auto r = run("train " + cfg + " run.out_dir=" + tmp.path + "/afile/run");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find(tmp.path + "/afile/run"), std::string::npos) << r.out;
}

TEST_F(Cli, EvalOfSomethingThatIsNotARun) {
  auto r = run("eval " + tmp.path);
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("config.yaml"), std::string::npos) << r.out;
}

}  // namespace

// qforge quantize: RTN / GPTQ / AWQ of a float run into a converted run that eval and export take;
// requests that cannot work fail before any weight is read, naming the flag and what to do.
TEST_F(Cli, QuantizeMethodsEndToEnd) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run";
  for (std::string m : {"rtn", "gptq", "awq"}) {
    const auto out = tmp.path + "/q_" + m;
    auto r = run("quantize " + src + " --method " + m + " --quant q4_0 --samples 16 --out " + out);
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("held-out perplexity: float"), std::string::npos) << r.out;
    EXPECT_TRUE(sfs::exists(out + "/ptq_summary.json"));
    auto e = run("eval " + out);
    ASSERT_EQ(e.rc, 0) << e.out;
    EXPECT_NE(e.out.find("\"format\": \"converted\""), std::string::npos) << e.out;
    // The printed perplexity of the quantized model is what eval of the written run computes.
    const auto at = r.out.find("-> q4_0 ");
    ASSERT_NE(at, std::string::npos) << r.out;
    const double ppl = std::stod(r.out.substr(at + 8));
    const auto pe = e.out.find("\"ppl\": ");
    EXPECT_NEAR(std::stod(e.out.substr(pe + 7)), ppl, 1e-3 * ppl) << e.out;
    auto x = run("export " + out + " --format gguf --out " + out + ".gguf");
    ASSERT_EQ(x.rc, 0) << x.out;
    EXPECT_NE(x.out.find("packed blocks exact"), std::string::npos) << x.out;
  }
  // quant.init: the same PTQ as the start of a QAT recipe (no steps: GPTQ's packed codes are kept).
  auto t = run("train " + cfg + " run.out_dir=" + tmp.path + "/qat run.init_from=" + src +
               " trainer.max_steps=0 'sample.prompts=[]' quant.init=gptq quant.calib.samples=16 "
               "\"quant.rules=[{pattern: 'model.layers.*', weight: {preset: q4_0}}]\"");
  ASSERT_EQ(t.rc, 0) << t.out;
  EXPECT_NE(t.out.find("kept GPTQ's packed weights for 14 linears"), std::string::npos) << t.out;
  auto a = run("eval " + tmp.path + "/qat/converted");
  auto b = run("eval " + tmp.path + "/q_gptq");
  ASSERT_EQ(a.rc, 0);
  EXPECT_EQ(a.out.substr(a.out.find("{\"loss\"")), b.out.substr(b.out.find("{\"loss\""))) << "same GPTQ either way";
}

TEST_F(Cli, QuantizeRejectsImpossibleRequestsEarly) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run", out = tmp.path + "/q";
  auto r = run("quantize " + src + " --method gptq --quant q4_k --out " + out);
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("super-blocks"), std::string::npos) << r.out;
  r = run("quantize " + src + " --method gptq --quant int9-g7 --out " + out);
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("unknown quantization preset 'int9-g7'"), std::string::npos) << r.out;
  r = run("quantize " + src + " --method gptq --quant q4_0 --samples 100000 --out " + out);
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("quant.calib.samples: 100000 calibration sequences"), std::string::npos) << r.out;
  r = run("quantize " + src + " --method gptq --quant int4-g128 --out " + out);  // 128 does not divide 32 or 64
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("--fallback"), std::string::npos) << r.out;
  EXPECT_FALSE(sfs::exists(out)) << "nothing written on a rejected request";
  r = run("quantize " + src + " --method magic --out " + out);
  EXPECT_NE(r.rc, 0);
  ASSERT_EQ(run("quantize " + src + " --method rtn --quant q8_0 --samples 4 --out " + out).rc, 0);
  r = run("quantize " + out + " --method gptq --out " + tmp.path + "/q2");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("PTQ starts from float weights"), std::string::npos) << r.out;
  r = run("quantize " + src + " --method rtn --quant q8_0 --out " + out);
  EXPECT_NE(r.rc, 0) << "an existing non-empty output dir is refused";
}

// Data parallel over Gloo with real processes (torchrun's environment): 2 ranks x batch B/2 follow
// 1 rank x batch B step for step (plain, fake quant, LoRA); a rank killed mid-run makes the other
// exit non-zero within the timeout instead of hanging.
namespace {
std::vector<double> losses(const std::string& metrics) {
  std::vector<double> v;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    auto at = line.find("\"loss\":");
    if (at != std::string::npos) v.push_back(std::stod(line.substr(at + 7)));
  }
  return v;
}
int next_port() {
  static int p = 29600 + static_cast<int>(::getpid() % 300) * 5;
  return p++;
}
std::string two_ranks(const std::string& args) {
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(next_port()) + " WORLD_SIZE=2 ";
  return "(" + env + "RANK=1 " + QFORGE_BINARY + " " + args + " > /dev/null 2>&1 & " + env + "RANK=0 " + QFORGE_BINARY +
         " " + args + "; rc=$?; wait; exit $rc)";
}
}  // namespace

double json_number(const std::string& file, const std::string& key) {
  std::ifstream in(file);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string t = ss.str();
  const auto at = t.find("\"" + key + "\":");
  return at == std::string::npos ? -1 : std::stod(t.substr(at + key.size() + 3));
}

TEST_F(Cli, DataParallelTwoRanksFollowOneRank) {
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);  // tokenizer + token cache
  const std::string common = " trainer.max_steps=6 trainer.log_every=1 'sample.prompts=[]' trainer.eval_batches=1";
  const std::vector<std::pair<std::string, std::string>> variants{
      {"plain", ""},
      {"fake quant", " \"quant.rules=[{pattern: 'model.layers.*', weight: {preset: int4-g32}}]\""},
      {"lora", " peft.r=4"},
      {"qlora", " peft.r=4 peft.base=nf4"},
      // Static activation observers: each forward's min/max are combined across ranks, so the two
      // halves observe what one batch does.
      {"observed activations",
       " \"quant.rules=[{pattern: 'model.layers.*', weight: {preset: int8-per-channel}, activation: {bits: 8, "
       "granularity: per-tensor}}]\" quant.observer.type=minmax"},
      // ZeRO-1: sharded AdamW + all-gathered parameters; ZeRO-2 also reduces gradients to their
      // owners. With accumulation (no sync on the first micro-step), tiny buckets (many
      // collectives from the hooks) and clipping (the norm from sharded gradients).
      {"zero-1", " dist.zero=1"},
      {"zero-2 accum buckets clip", " dist.zero=2 trainer.grad_accum=2 dist.bucket_mb=0.01 dist.first_bucket_mb=0.001 trainer.grad_clip=0.05"},
      {"buckets after backward", " dist.overlap=false dist.bucket_mb=0.02 dist.first_bucket_mb=0.002 trainer.grad_accum=2"},
      {"bf16 autocast", " trainer.precision=bf16"},
      // Recomputed layers and chunked-loss chunks (the tied embedding is read by the lookup and by
      // every chunk) hand each parameter's gradient to the hooks once per backward.
      {"activation checkpointing + chunked loss",
       " trainer.activation_checkpointing=true trainer.loss_chunk_tokens=24 dist.bucket_mb=0.02"},
      {"qlora + activation checkpointing", " peft.r=4 peft.base=nf4 trainer.activation_checkpointing=true"}};
  int k = 0;
  double plain_bytes = 0;
  for (auto& [name, extra] : variants) {
    const auto one = tmp.path + "/one_" + std::to_string(k), two = tmp.path + "/two_" + std::to_string(k++);
    auto a = run("train " + cfg + " run.out_dir=" + one + common + extra);
    ASSERT_EQ(a.rc, 0) << name << a.out;
    const std::string args = "train " + cfg + " run.out_dir=" + two + " trainer.batch_size=2" + common + extra;
    // The plain case goes through `qforge launch` (torchrun's job), the others set the env by hand.
    auto b = name == "plain" ? run("launch --nproc-per-node 2 -- " + args) : run_sh(two_ranks(args));
    ASSERT_EQ(b.rc, 0) << name << b.out;
    EXPECT_NE(b.out.find("data parallel: 2 ranks"), std::string::npos) << b.out;
    auto la = losses(one + "/metrics.jsonl"), lb = losses(two + "/metrics.jsonl");
    ASSERT_EQ(la.size(), 6u) << name;
    ASSERT_EQ(lb.size(), 6u) << name << ": rank 0 alone writes metrics";
    // Gradients summed over two halves differ from one batch's in the last bits (summation order).
    // Under fake quant such a bit can move a weight across a rounding boundary, so that comparison
    // gets 1e-4 (measured: 2.7e-5 at step 6); plain and LoRA stay within 1e-5.
    const double tol = name == "fake quant" || name == "observed activations" ? 1e-4 : 1e-5;
    for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], tol * std::abs(la[i])) << name << " step " << i + 1;
    // Every bucket is launched from the hooks during backward (or, with overlap off, after it), once
    // per optimizer step: accumulation micro-steps do not communicate.
    const double buckets = json_number(two + "/train_summary.json", "buckets");
    const double in_bw = json_number(two + "/train_summary.json", "buckets_launched_in_backward_per_step");
    if (name != "zero-2 accum buckets clip") {
      EXPECT_EQ(json_number(two + "/train_summary.json", "collectives_per_step"), buckets) << name;
    }
    EXPECT_EQ(in_bw, name == "buckets after backward" ? 0 : buckets) << name;
    if (name == "buckets after backward") {
      EXPECT_GE(buckets, 4) << "0.02 MB buckets";
    }
    // LoRA/QLoRA: only the adapters' gradients travel.
    const double sent = json_number(two + "/train_summary.json", "gradient_bytes_per_step");
    if (name == "plain") plain_bytes = sent;
    if (name == "lora" || name == "qlora") {
      EXPECT_GT(sent, 0) << name;
      EXPECT_LT(sent, 0.5 * plain_bytes) << name << ": only adapter gradients should be reduced";
    }
    if (name != "observed activations") continue;
    // The observers themselves, after one step (later, rounding flips move activations by a code
    // step): rank 0's statistics are those of the whole global batch. Without the sync they are of
    // its half: measured up to 14% apart.
    const std::string s1 = " trainer.max_steps=1 trainer.log_every=1 'sample.prompts=[]' trainer.eval_batches=1";
    ASSERT_EQ(run("train " + cfg + " run.out_dir=" + one + "s1" + s1 + extra).rc, 0);
    ASSERT_EQ(run_sh(two_ranks("train " + cfg + " run.out_dir=" + two + "s1 trainer.batch_size=2" + s1 + extra)).rc, 0);
    auto fa = qf::st::load(one + "s1/checkpoints/step_00000001/model.safetensors");
    auto fb = qf::st::load(two + "s1/checkpoints/step_00000001/model.safetensors");
    int n_obs = 0;
    for (auto& [tn, t] : fa.tensors) {
      if (tn.find("obs_m") == std::string::npos || t.numel() != 1) continue;  // per-tensor: the activations'
      ++n_obs;
      const double va = t.item().toDouble(), vb = fb.get(tn).item().toDouble();
      EXPECT_NEAR(va, vb, 1e-5 * std::abs(va) + 1e-7) << tn;
    }
    EXPECT_GT(n_obs, 10);
  }
}

TEST_F(Cli, ZeroCheckpointsReshardBetweenWorldSizes) {
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);
  const std::string common = " trainer.log_every=1 'sample.prompts=[]' trainer.eval_batches=1 trainer.schedule.total_steps=6";
  const auto ref = tmp.path + "/ref";
  ASSERT_EQ(run("train " + cfg + " run.out_dir=" + ref + " trainer.max_steps=6 trainer.save_every=3" + common).rc, 0);
  const auto want = losses(ref + "/metrics.jsonl");
  ASSERT_EQ(want.size(), 6u);
  struct Leg {
    int ranks;
    std::string extra;
  };
  // Saved by 2 ranks under ZeRO-1, resumed by 1; saved by 1, resumed by 2 under ZeRO-2.
  const std::vector<std::pair<Leg, Leg>> cases{{{2, " dist.zero=1"}, {1, ""}}, {{1, ""}, {2, " dist.zero=2"}}};
  int k = 0;
  for (auto& [first, second] : cases) {
    const auto dir = tmp.path + "/reshard" + std::to_string(k++);
    auto leg = [&](const Leg& l, int steps) {
      const std::string args = "train " + cfg + " run.out_dir=" + dir + " trainer.max_steps=" + std::to_string(steps) +
                               " trainer.batch_size=" + std::to_string(l.ranks == 2 ? 2 : 4) + common + l.extra;
      return l.ranks == 2 ? run_sh(two_ranks(args)) : run(args);
    };
    auto a = leg(first, 3);
    ASSERT_EQ(a.rc, 0) << a.out;
    // Rank 0 gathered the shards: the optimizer file is the one a single process writes.
    EXPECT_EQ(sfs::file_size(dir + "/checkpoints/step_00000003/optimizer.safetensors"),
              sfs::file_size(ref + "/checkpoints/step_00000003/optimizer.safetensors"));
    auto b = leg(second, 6);
    ASSERT_EQ(b.rc, 0) << b.out;
    EXPECT_NE(b.out.find("resumed from"), std::string::npos) << b.out;
    const auto got = losses(dir + "/metrics.jsonl");
    ASSERT_EQ(got.size(), 6u) << k;
    for (size_t i = 0; i < 6; ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << "case " << k << " step " << i + 1;
    if (second.ranks == 2) {  // ZeRO: rank 0 keeps about half of AdamW's state
      const double one = json_number(ref + "/train_summary.json", "optimizer_bytes");
      const double mine = json_number(dir + "/train_summary.json", "optimizer_bytes");
      EXPECT_GT(mine, 0.3 * one);
      EXPECT_LT(mine, 0.7 * one) << "ZeRO-2 with 2 ranks should hold ~1/2 of the optimizer state";
    }
  }
}

TEST_F(Cli, DataParallelDeadRankStopsTheOthers) {
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(next_port()) + " WORLD_SIZE=2 ";
  const std::string args = "train " + cfg + " run.out_dir=" + tmp.path + "/dead trainer.max_steps=100000 dist.timeout_s=20 'sample.prompts=[]'";
  const auto t0 = std::chrono::steady_clock::now();
  // Rank 1 is SIGKILLed after 6 s (mid-training); rank 0 must notice and exit non-zero.
  auto r = run_sh("(" + env + "RANK=1 timeout -s KILL 6 " + QFORGE_BINARY + " " + args + " > /dev/null 2>&1 & " + env +
               "RANK=0 timeout 120 " + QFORGE_BINARY + " " + args + "; rc=$?; wait; exit $rc)");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 124) << "rank 0 hung until the outer timeout: " << r.out;
  EXPECT_LT(s, 60.0) << r.out;
  EXPECT_NE(r.out.find("data parallel: rank 0 of 2"), std::string::npos) << r.out;
}

// A launched world of one runs the process group, the bucketed reducer and ZeRO like N ranks do,
// and must train exactly as the plain process.
void world_of_one_follows_one_process(Cli& t, const std::string& backend, const std::string& device) {
  ASSERT_EQ(run("train " + t.cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);
  const std::string common = " trainer.max_steps=4 trainer.log_every=1 'sample.prompts=[]' trainer.eval_batches=1 trainer.device=" + device;
  const auto one = t.tmp.path + "/w1_plain_" + backend, launched = t.tmp.path + "/w1_" + backend;
  ASSERT_EQ(run("train " + t.cfg + " run.out_dir=" + one + common).rc, 0);
  for (const std::string zero : {"0", "2"}) {
    auto r = run_sh("MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(next_port()) + " WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 " +
                    QFORGE_BINARY + " train " + t.cfg + " run.out_dir=" + launched + zero + " dist.backend=" + backend +
                    " dist.zero=" + zero + common);
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("data parallel: 1 ranks"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(", " + backend + ","), std::string::npos) << r.out;
    auto la = losses(one + "/metrics.jsonl"), lb = losses(launched + zero + "/metrics.jsonl");
    ASSERT_EQ(la.size(), 4u);
    ASSERT_EQ(lb.size(), 4u);
    for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], 1e-5 * std::abs(la[i])) << backend << " zero " << zero << " step " << i + 1;
  }
}

TEST_F(Cli, GlooWorldOfOneFollowsOneProcess) { world_of_one_follows_one_process(*this, "gloo", "cpu"); }

TEST_F(Cli, NcclWorldOfOneFollowsOneProcess) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: ProcessGroupNCCL is compiled (trainer/dist/nccl.cpp) but not run";
  world_of_one_follows_one_process(*this, "nccl", "cuda");
}

TEST_F(Cli, LaunchTwoNodesOnLoopbackFollowOneProcess) {
  // Multi-node through the launcher: two `qforge launch --nnodes 2` (node ranks 0 and 1, one
  // process each) meet at node 0's address and train as one process with the global batch.
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);
  const std::string common = " trainer.max_steps=4 trainer.log_every=1 'sample.prompts=[]' trainer.eval_batches=1";
  ASSERT_EQ(run("train " + cfg + " run.out_dir=" + tmp.path + "/nodes1" + common).rc, 0);
  const std::string node = std::string(QFORGE_BINARY) + " launch --nnodes 2 --nproc-per-node 1 --master-addr 127.0.0.1 --master-port " +
                           std::to_string(next_port()) + " --node-rank ";
  const std::string args = " -- train " + cfg + " run.out_dir=" + tmp.path + "/nodes2 trainer.batch_size=2" + common;
  auto r = run_sh("(" + node + "1" + args + " > /dev/null 2>&1 & " + node + "0" + args + "; rc=$?; wait $! || rc=9; exit $rc)");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("node 0 of 2 (world size 2)"), std::string::npos) << r.out;
  auto la = losses(tmp.path + "/nodes1/metrics.jsonl"), lb = losses(tmp.path + "/nodes2/metrics.jsonl");
  ASSERT_EQ(la.size(), 4u);
  ASSERT_EQ(lb.size(), 4u);
  for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], 1e-5 * std::abs(la[i])) << "step " << i + 1;
  // A multi-node launch needs an explicit port (every node must name the same one).
  auto bad = run("launch --nnodes 2 -- train " + cfg);
  EXPECT_EQ(bad.rc, 2) << bad.out;
  EXPECT_NE(bad.out.find("--master-port: give one port for every node"), std::string::npos) << bad.out;
}

TEST_F(Cli, LaunchStopsEveryRankWhenOneDies) {
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);
  // SIGKILL one of the launcher's ranks mid-training: the launcher stops the other and returns 137.
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run_sh(std::string("(") + QFORGE_BINARY + " launch --nproc-per-node 2 --grace 5 -- train " + cfg + " run.out_dir=" +
                  tmp.path + "/launched trainer.max_steps=100000 dist.timeout_s=30 'sample.prompts=[]' & L=$!; sleep 6; "
                  "kill -9 $(pgrep -P $L | tail -1); wait $L; exit $?)");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.rc, 137) << r.out;
  EXPECT_LT(s, 40.0) << r.out;
  EXPECT_NE(r.out.find("exited with code 137; stopping the other ranks"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("qforge launch: failed: rank"), std::string::npos) << r.out;
  EXPECT_EQ(run_sh("pgrep -f " + tmp.path + "/launche[d]").out, "") << "no rank left behind";
  // Impossible layouts: exit 2 naming the option.
  auto bad = run("launch --nproc-per-node 0 --node-rank 3 -- train " + cfg);
  EXPECT_EQ(bad.rc, 2) << bad.out;
  EXPECT_NE(bad.out.find("--nproc-per-node 0: expected at least 1"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("--node-rank 3"), std::string::npos) << bad.out;
  auto none = run("launch --nproc-per-node 2");
  EXPECT_EQ(none.rc, 2) << none.out;
  EXPECT_NE(none.out.find("no command"), std::string::npos) << none.out;
}

TEST_F(Cli, DataParallelBadLaunchesAreClearErrors) {
  // NCCL without a GPU: refused before any rendezvous, naming the rank.
  auto n = run_sh("MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(next_port()) + " WORLD_SIZE=2 RANK=0 " +
                  QFORGE_BINARY + " train " + cfg + " dist.backend=nccl 'sample.prompts=[]'");
  EXPECT_EQ(n.rc, 1) << n.out;
  EXPECT_NE(n.out.find("nccl needs a CUDA device"), std::string::npos) << n.out;
  // A rank outside the world, a non-numeric port: exit 2 naming the variables.
  auto r = run_sh("WORLD_SIZE=2 RANK=2 MASTER_PORT=http " + std::string(QFORGE_BINARY) + " train " + cfg);
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("RANK=2 is outside [0, WORLD_SIZE=2)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("MASTER_PORT='http': expected an integer"), std::string::npos) << r.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/run")) << "nothing written";
  // Ranks launched with different WORLD_SIZEs: both stop at the rendezvous, naming the values.
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(next_port());
  const auto t0 = std::chrono::steady_clock::now();
  auto w = run_sh("(" + env + " WORLD_SIZE=3 RANK=1 " + QFORGE_BINARY + " train " + cfg + " dist.timeout_s=60 > " + tmp.path +
                  "/r1.log 2>&1 & " + env + " WORLD_SIZE=2 RANK=0 " + QFORGE_BINARY + " train " + cfg +
                  " dist.timeout_s=60; rc=$?; wait $!; echo rank1 $?; cat " + tmp.path + "/r1.log; exit $rc)");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30.0) << "well within the timeout";
  EXPECT_EQ(w.rc, 2) << w.out;
  EXPECT_NE(w.out.find("rank 1 has WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("rank1 2"), std::string::npos) << w.out;
}

// Issue 15: Hugging Face dirs wherever a model is taken, generation edges, short runs, export
// fallbacks for widths a group does not divide.
namespace {
std::string json_after(const std::string& out, const std::string& key) {
  const auto at = out.find("\"" + key + "\": ");
  return at == std::string::npos ? "" : out.substr(at + key.size() + 4, out.find_first_of(",}", at + key.size() + 4) - at - key.size() - 4);
}
std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

TEST_F(Cli, EvalAndGenerateTakeAHuggingFaceDir) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run", hf = tmp.path + "/hf";
  auto x = run("export " + src + " --format hf --dtype fp32 --out " + hf);
  ASSERT_EQ(x.rc, 0) << x.out;
  // No data named: a clear error, not "is not a run directory".
  auto e0 = run("eval " + hf);
  EXPECT_EQ(e0.rc, 1) << e0.out;
  EXPECT_NE(e0.out.find("--text FILE|DIR"), std::string::npos) << e0.out;
  EXPECT_NE(e0.out.find("--data-from RECIPE.yaml"), std::string::npos) << e0.out;
  EXPECT_EQ(e0.out.find("is not a run directory"), std::string::npos) << e0.out;
  // The same weights and tokenizer (BOS added as tokenizer_config.json says): the same numbers. An
  // HF dir has no data.seq_len of its own: windows of its context (64 positions here).
  auto a = run("eval " + src + " --text " + tmp.path + "/corpus.txt data.seq_len=64");
  auto b = run("eval " + hf + " --text " + tmp.path + "/corpus.txt");
  ASSERT_EQ(a.rc, 0) << a.out;
  ASSERT_EQ(b.rc, 0) << b.out;
  EXPECT_EQ(json_after(a.out, "tokens"), json_after(b.out, "tokens")) << a.out << b.out;
  EXPECT_NEAR(std::stod(json_after(a.out, "loss")), std::stod(json_after(b.out, "loss")), 1e-5) << a.out << b.out;
  auto c = run("eval " + hf + " --data-from " + cfg);
  auto d = run("eval " + src + " --data-from " + cfg);
  ASSERT_EQ(c.rc, 0) << c.out;
  ASSERT_EQ(d.rc, 0) << d.out;
  EXPECT_EQ(json_after(c.out, "tokens"), json_after(d.out, "tokens")) << c.out << d.out;
  EXPECT_NEAR(std::stod(json_after(c.out, "loss")), std::stod(json_after(d.out, "loss")), 1e-5) << c.out << d.out;
  auto g1 = run("-q generate " + src + " --prompt 'And God said' -n 6 -t 0");
  auto g2 = run("-q generate " + hf + " --prompt 'And God said' -n 6 -t 0");
  ASSERT_EQ(g2.rc, 0) << g2.out;
  EXPECT_EQ(g1.out, g2.out);
  EXPECT_NE(run("eval " + hf + " --text " + tmp.path + "/corpus.txt trainer.batch_size=2").rc, 0)
      << "overrides are for runs";
}

TEST_F(Cli, GenerateSaysWhenTheContextEndsIt) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  // --ignore-eos: the trained model ends its lines with EOS, which would stop it first.
  auto g = run("generate " + tmp.path + "/run --prompt 'And God said' -n 400 -t 0 --ignore-eos");
  ASSERT_EQ(g.rc, 0) << g.out;
  EXPECT_NE(g.out.find("stopped after 59 of the 400 tokens asked for"), std::string::npos) << g.out;
  EXPECT_NE(g.out.find("context of 64 positions (model.max_seq_len)"), std::string::npos) << g.out;
  auto ok = run("generate " + tmp.path + "/run --prompt 'And God said' -n 5 -t 0 --ignore-eos");
  ASSERT_EQ(ok.rc, 0);
  EXPECT_EQ(ok.out.find("stopped after"), std::string::npos) << "no warning within the context: " << ok.out;
}

TEST_F(Cli, DefaultWarmupFitsAnyRunLength) {
  std::string text = read_text(cfg);
  const std::string explicit_warmup = ", schedule: {warmup_steps: 1}";
  ASSERT_NE(text.find(explicit_warmup), std::string::npos);
  text.erase(text.find(explicit_warmup), explicit_warmup.size());
  const auto cfg2 = tmp.path + "/default_warmup.yaml";
  std::ofstream(cfg2) << text;
  auto t = run("train " + cfg2 + " trainer.max_steps=2 'sample.prompts=[]'");
  ASSERT_EQ(t.rc, 0) << t.out;
  EXPECT_NE(run("train " + cfg2 + " --print-config trainer.max_steps=2").out.find("warmup_steps: 0"), std::string::npos);
  EXPECT_NE(run("train " + cfg2 + " --print-config trainer.max_steps=300").out.find("warmup_steps: 30"), std::string::npos);
  EXPECT_NE(run("train " + cfg2 + " --print-config trainer.max_steps=5000").out.find("warmup_steps: 100"), std::string::npos);
  auto bad = run("train " + cfg2 + " trainer.max_steps=2 trainer.schedule.warmup_steps=5");
  EXPECT_EQ(bad.rc, 2) << "an explicit warmup longer than the run is still an error";
}

TEST_F(Cli, ExportFallbackForWidthsTheGroupDoesNotDivide) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run";
  // dim 32, ffn 64: int4-g64 divides down_proj's 64 inputs but not the 32 of the others.
  auto r = run("export " + src + " --format gptq --quant int4-g64 --out " + tmp.path + "/g");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("model.layers.0.self_attn.q_proj (32 inputs: int4-g32, int4-g16, int4-g8 fit)"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("--fallback FORMAT"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("mlp.down_proj (64"), std::string::npos) << "down_proj fits: " << r.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/g"));
  // gptq: float fallback (left out of modules_in_block_to_quantize).
  auto g = run("export " + src + " --format gptq --quant int4-g64 --fallback f16 --out " + tmp.path + "/g");
  ASSERT_EQ(g.rc, 0) << g.out;
  EXPECT_NE(g.out.find("12 linears in --fallback f16"), std::string::npos) << g.out;
  const auto gc = read_text(tmp.path + "/g/config.json");
  EXPECT_NE(gc.find("\"modules_in_block_to_quantize\""), std::string::npos) << gc;
  EXPECT_NE(gc.find("\"mlp.down_proj\""), std::string::npos) << gc;
  EXPECT_NE(run("export " + src + " --format gptq --quant int4-g64 --fallback int4-g32 --out " + tmp.path + "/g2").rc, 0);
  // compressed-tensors: a second config group.
  auto c = run("export " + src + " --format compressed-tensors --quant int4-g64 --fallback int4-g32 --out " + tmp.path + "/c");
  ASSERT_EQ(c.rc, 0) << c.out;
  const auto cc = read_text(tmp.path + "/c/config.json");
  EXPECT_NE(cc.find("\"group_1\""), std::string::npos) << cc;
  EXPECT_NE(cc.find("\"model.layers.1.mlp.up_proj\""), std::string::npos) << cc;
  auto c2 = run("export " + src + " --format compressed-tensors --quant int4-g128 --fallback int4-g64 --out " + tmp.path + "/c2");
  EXPECT_EQ(c2.rc, 2) << c2.out;
  EXPECT_NE(c2.out.find("--fallback int4-g64: its block of 64 does not divide the 32 inputs of model.layers.0.self_attn.q_proj"),
            std::string::npos) << c2.out;
  // gguf: llama-quantize falls back by itself (q4_k -> q5_0); --fallback picks the type instead.
  auto q = run("export " + src + " --format gguf --quant q4_k --out " + tmp.path + "/a.gguf");
  ASSERT_EQ(q.rc, 0) << q.out;
  EXPECT_NE(q.out.find("falling back to q5_0"), std::string::npos) << q.out;
  auto q2 = run("export " + src + " --format gguf --quant q4_k --fallback q8_0 --out " + tmp.path + "/b.gguf");
  ASSERT_EQ(q2.rc, 0) << q2.out;
  EXPECT_NE(q2.out.find("falling back to q8_0 (--fallback)"), std::string::npos) << q2.out;
  EXPECT_EQ(q2.out.find("falling back to q5_0"), std::string::npos) << q2.out;
  auto q3 = run("export " + src + " --format gguf --quant q4_k --fallback q6_k --out " + tmp.path + "/c.gguf");
  EXPECT_EQ(q3.rc, 1) << q3.out;
  EXPECT_NE(q3.out.find("export: token_embd.weight: --fallback q6_k: its block of 256 does not divide the 32 columns"),
            std::string::npos) << "names the tensor: " << q3.out;
  EXPECT_NE(run("export " + src + " --format hf --fallback f16 --out " + tmp.path + "/h").rc, 0);
}

TEST_F(Cli, PeftAdapterNamesItsBaseAndKeepsExtrasApart) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run";
  ASSERT_EQ(run("train " + cfg + " run.out_dir=" + tmp.path + "/lora run.init_from=" + src +
                " peft.r=4 trainer.max_steps=2 'sample.prompts=[]'").rc, 0);
  const auto ac = read_text(tmp.path + "/lora/adapter/adapter_config.json");
  EXPECT_EQ(ac.find("\"qforge\""), std::string::npos) << ac;
  EXPECT_NE(ac.find("\"base_model_name_or_path\": \"" + src + "\""), std::string::npos) << ac;
  EXPECT_NE(read_text(tmp.path + "/lora/adapter/qforge_adapter.json").find("\"base\""), std::string::npos);
  auto x = run("export " + tmp.path + "/lora --format peft --out " + tmp.path + "/ad");
  ASSERT_EQ(x.rc, 0) << x.out;
  EXPECT_NE(read_text(tmp.path + "/ad/adapter_config.json").find("\"base_model_name_or_path\": \"" + src + "\""),
            std::string::npos) << "export keeps the run's base, not qforge:<name>";
}

// Issue 16: one writer per run, a launcher that takes its ranks with it, the rank that hung named,
// repeated YAML keys refused.
TEST_F(Cli, OneTrainerPerRunDirectory) {
  const std::string long_run = std::string(QFORGE_BINARY) + " -q train " + cfg +
                               " trainer.max_steps=100000 trainer.eval_every=0 trainer.save_every=0 'sample.prompts=[]'";
  auto r = run_sh("(" + long_run + " > " + tmp.path + "/first.log 2>&1 & P=$!; "
                  "for i in $(seq 100); do [ -f " + tmp.path + "/run/config.yaml ] && break; sleep 0.2; done; sleep 1; " +
                  QFORGE_BINARY + " train " + cfg + " 'sample.prompts=[]'; rc=$?; kill -9 $P; wait $P; exit $rc)");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("is in use by process"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("trainer.max_steps=100000"), std::string::npos) << "names the holder's command line: " << r.out;
  // The lock died with its SIGKILLed holder: the run resumes at once.
  auto again = run("-q train " + cfg + " 'sample.prompts=[]'");
  EXPECT_EQ(again.rc, 0) << again.out;
}

TEST_F(Cli, LaunchKilledTakesItsRanksAndAStoppedRankIsNamed) {
  ASSERT_EQ(run("train " + cfg + " trainer.max_steps=0 'sample.prompts=[]'").rc, 0);  // tokenizer + caches
  const std::string launch = std::string(QFORGE_BINARY) + " launch --nproc-per-node 2 --grace 3 -- train " + cfg +
                             " trainer.max_steps=100000 trainer.eval_every=0 trainer.save_every=0 'sample.prompts=[]' "
                             "dist.timeout_s=6 run.out_dir=";
  // kill -9 of the launcher: the kernel stops its ranks (parent-death signal).
  auto k = run_sh("(" + launch + tmp.path + "/orphans > /dev/null 2>&1 & L=$!; sleep 6; kill -9 $L; sleep 3; "
                  "pgrep -f '^" + QFORGE_BINARY + " .*" + tmp.path + "/orphan[s]' | wc -l)");  // qforge processes, not this shell
  EXPECT_EQ(k.out.substr(0, k.out.find_first_not_of("0123456789")), "0") << "ranks outlived their launcher: " << k.out;
  // A SIGSTOPped rank: the launcher names it, not the rank whose collective timed out.
  const auto t0 = std::chrono::steady_clock::now();
  auto s = run_sh("(" + launch + tmp.path + "/hung & L=$!; sleep 6; kill -STOP $(pgrep -P $L | tail -1); wait $L; exit $?)");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 40.0) << s.out;
  EXPECT_EQ(s.rc, 1) << s.out;
  EXPECT_NE(s.out.find("rank 1 was stopped (SIGSTOP or a debugger), so rank 0 timed out"), std::string::npos) << s.out;
  EXPECT_EQ(run_sh("pgrep -f " + tmp.path + "/hun[g] | wc -l").out.substr(0, 1), "0") << "no rank left behind";
}

TEST_F(Cli, RepeatedOrComplexYamlKeysAreConfigErrors) {
  std::ofstream(tmp.path + "/dup.yaml") << "base: " << cfg << "\ntrainer:\n  max_steps: 5\n  max_steps: 7\n? [a, b]\n: 1\n";
  auto r = run("train " + tmp.path + "/dup.yaml");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("dup.yaml:4: key 'trainer.max_steps' appears twice in one mapping (first at line 3)"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dup.yaml:5: a mapping key under '<top level>' is not a plain name"), std::string::npos) << r.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/run")) << "nothing written";
}

namespace {
std::string slurp(const std::string& path) { return qf::fs::read_file(path); }
// A PID that is surely not a live process (a child that has exited and been reaped).
std::string dead_pid() {
  pid_t c = fork();
  if (c == 0) _exit(0);
  waitpid(c, nullptr, 0);
  return std::to_string(c);
}
}  // namespace

// Issue 16, reproducer 1: no export may overwrite a checkpoint or the source's files (not even with
// --force); an existing output is refused unless --force; killed exports' temp siblings are removed.
TEST_F(Cli, ExportNeverOverwritesCheckpointsAndRefusesExistingOutputs) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run", ck = src + "/checkpoints/step_00000006/model.safetensors";
  const std::string ck_bytes = slurp(ck), latest = slurp(src + "/checkpoints/latest"), conf = slurp(src + "/config.yaml");
  for (std::string force : {"", " --force"}) {
    for (std::string out : {ck, src + "/checkpoints/latest", src + "/checkpoints/x.gguf"}) {
      auto r = run("export " + src + " --format gguf --out " + out + force);
      EXPECT_EQ(r.rc, 1) << out << force << r.out;
      EXPECT_NE(r.out.find("checkpoint directory"), std::string::npos) << r.out;
    }
    auto q = run("quantize " + src + " --method rtn --quant q4_0 --no-eval --out " + src + "/checkpoints/q" + force);
    EXPECT_EQ(q.rc, 1) << q.out;
    for (std::string fmt : {"hf", "gptq"}) {
      auto r = run("export " + src + " --format " + fmt + " --out " + src + force);
      EXPECT_EQ(r.rc, 1) << fmt << force << r.out;
      EXPECT_NE(r.out.find("is or contains the source"), std::string::npos) << r.out;
    }
    auto c = run("export " + src + " --format gguf --out " + src + "/config.yaml" + force);
    EXPECT_EQ(c.rc, 1) << c.out;
    EXPECT_NE(c.out.find("source's own files"), std::string::npos) << c.out;
  }
  EXPECT_EQ(slurp(ck), ck_bytes);
  EXPECT_EQ(slurp(src + "/checkpoints/latest"), latest);
  EXPECT_EQ(slurp(src + "/config.yaml"), conf);
  EXPECT_EQ(run("eval " + src).rc, 0);

  // An existing output: refused (naming it) unless --force; stale temps of killed exports removed.
  const std::string gguf = tmp.path + "/m.gguf", dead = dead_pid();
  qf::testing::write_text(gguf + ".tmp." + dead, "half a file");
  ASSERT_EQ(run("export " + src + " --format gguf --out " + gguf).rc, 0);
  EXPECT_FALSE(sfs::exists(gguf + ".tmp." + dead));
  auto again = run("export " + src + " --format gguf --out " + gguf);
  EXPECT_EQ(again.rc, 1) << again.out;
  EXPECT_NE(again.out.find("'" + gguf + "' already exists"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("--force"), std::string::npos) << again.out;
  EXPECT_EQ(run("export " + src + " --format gguf --quant q8_0 --out " + gguf + " --force").rc, 0);
  const std::string hf = tmp.path + "/hf";
  qf::testing::write_text(hf + ".tmp" + dead + "/config.json", "{");
  ASSERT_EQ(run("export " + src + " --format hf --out " + hf).rc, 0);
  EXPECT_FALSE(sfs::exists(hf + ".tmp" + dead));
  for (std::string fmt : {"hf", "gptq", "compressed-tensors", "awq"})
    EXPECT_EQ(run("export " + src + " --format " + fmt + " --out " + hf).rc, 1) << fmt;
  EXPECT_EQ(run("export " + src + " --format gptq --quant int4-g32 --out " + hf + " --force").rc, 0);
  EXPECT_TRUE(sfs::exists(hf + "/quantize_config.json"));
  for (auto& e : sfs::directory_iterator(tmp.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

// Issue 16, reproducer 2: a train into an existing run with another model shape fails before it
// writes anything there; a failed run removes a run dir it created only if nothing else is in it.
TEST_F(Cli, TrainWithAnotherShapeLeavesTheRunIntact) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run";
  const std::string conf = slurp(src + "/config.yaml"), metrics = slurp(src + "/metrics.jsonl");
  auto r = run("train " + cfg + " 'sample.prompts=[]' model.dim=64 trainer.max_steps=8");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("has shape"), std::string::npos) << r.out;
  EXPECT_EQ(slurp(src + "/config.yaml"), conf);
  EXPECT_EQ(slurp(src + "/metrics.jsonl"), metrics);
  auto e = run("eval " + src);
  EXPECT_EQ(e.rc, 0) << e.out;
  // A run that fails after creating its dir (no checkpoint under run.init_from) leaves no empty dir;
  // an existing (empty) dir it was pointed at stays.
  sfs::create_directories(tmp.path + "/nothing");
  auto f = run("train " + cfg + " run.out_dir=" + tmp.path + "/fresh run.init_from=" + tmp.path + "/nothing");
  EXPECT_EQ(f.rc, 1) << f.out;
  EXPECT_FALSE(sfs::exists(tmp.path + "/fresh")) << f.out;
  sfs::create_directories(tmp.path + "/mine");
  EXPECT_EQ(run("train " + cfg + " run.out_dir=" + tmp.path + "/mine run.init_from=" + tmp.path + "/nothing").rc, 1);
  EXPECT_TRUE(sfs::exists(tmp.path + "/mine"));
}

// Issue 16: a checkpoint whose optimizer.safetensors came from another run (another width here) is a
// clear error on resume (exit 1, the file, the parameter and the shapes), not a silent AdamW reset;
// deleting the file, as the message advises, resumes with a fresh AdamW.
TEST_F(Cli, ForeignOptimizerStateIsAClearErrorAndDeletingItRestartsAdamW) {
  const std::string a = tmp.path + "/a", b = tmp.path + "/b";
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]' trainer.max_steps=3 run.out_dir=" + a).rc, 0);
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]' trainer.max_steps=3 model.dim=48 run.out_dir=" + b).rc, 0);
  const std::string opt = a + "/checkpoints/step_00000003/optimizer.safetensors";
  sfs::remove(opt);
  sfs::copy_file(b + "/checkpoints/step_00000003/optimizer.safetensors", opt);
  const std::string resume = "train " + cfg + " 'sample.prompts=[]' trainer.max_steps=4 run.out_dir=" + a;
  auto r = run(resume);
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find(opt + ": optimizer state '"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("has shape [400, 48] but parameter"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("delete " + opt + " to restart the optimizer"), std::string::npos) << r.out;
  sfs::remove(opt);
  auto ok = run(resume);
  EXPECT_EQ(ok.rc, 0) << ok.out;
  EXPECT_NE(ok.out.find("has no optimizer.safetensors: AdamW restarts from zero moments"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("resumed from"), std::string::npos) << ok.out;
}

// Issue 16: the Hugging Face file under a LoRA run's frozen base (memory-mapped, zero-copy) truncated by
// another process mid-run: exit 1 with a message naming the file, not a bare SIGBUS.
TEST_F(Cli, HfBaseTruncatedMidLoraRunIsAClearExitOne) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string hf = tmp.path + "/hf", log = tmp.path + "/lora.log";
  ASSERT_EQ(run("export " + tmp.path + "/run --format hf --dtype fp32 --out " + hf).rc, 0);
  // Many steps (a timeout bounds it if the signal never came); the file goes once training has begun.
  auto r = run_sh("(timeout 120 " + std::string(QFORGE_BINARY) + " train " + cfg + " 'sample.prompts=[]' run.out_dir=" +
                  tmp.path + "/lora model.from=" + hf + " peft.r=4 trainer.max_steps=1000000 > " + log +
                  " 2>&1; echo rc=$? >> " + log + ") & for i in $(seq 600); do grep -q 'step 0:' " + log +
                  " 2>/dev/null && break; sleep 0.1; done; sleep 0.3; truncate -s 0 " + hf + "/model.safetensors; wait; cat " +
                  log);
  EXPECT_NE(r.out.find("qforge: error: " + hf + "/model.safetensors changed or was truncated while mapped (SIGBUS"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Restore the file and rerun"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rc=1"), std::string::npos) << r.out;
}

// Issue 16, reproducer 4: quantize writes its run dir through a temp dir: a kill mid-write leaves no
// half run at --out, and the rerun succeeds (removing the dead temp dir); --force replaces.
TEST_F(Cli, QuantizeKilledMidWriteLeavesNothingAndReruns) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run", q = tmp.path + "/q";
  const std::string cmd = "quantize " + src + " --method rtn --quant q4_0 --no-eval --out " + q;
  auto k = run_sh("QFORGE_FAULT=written " + std::string(QFORGE_BINARY) + " " + cmd);
  EXPECT_NE(k.rc, 0) << k.out;
  EXPECT_FALSE(sfs::exists(q)) << k.out;
  auto r = run(cmd);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(run("eval " + q).rc, 0);
  for (auto& e : sfs::directory_iterator(tmp.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  auto again = run(cmd);
  EXPECT_EQ(again.rc, 1) << again.out;
  EXPECT_NE(again.out.find("already exists"), std::string::npos) << again.out;
  ASSERT_EQ(run(cmd + " --force").rc, 0);
  EXPECT_EQ(run("eval " + q).rc, 0);
}

// Issue 16: a kill at every rename/fsync point of each exporter (QFORGE_FAULT, core/fault.h) leaves --out
// absent or exactly as it was (with --force the old output survives until the new one is complete, and
// one set aside when the kill came is put back), never partial; the rerun succeeds and no temp sibling
// is left.
TEST_F(Cli, ExportKilledAtEveryPointLeavesTheOldOutputOrNothing) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]' trainer.max_steps=4 trainer.save_every=2").rc, 0);
  const std::string src = tmp.path + "/run", outs = tmp.path + "/outs";
  sfs::create_directories(outs);
  // Every file under `p` (or `p` itself) with its bytes: what "as it was" means.
  auto snapshot = [](const std::string& p) {
    std::map<std::string, std::string> m;
    if (sfs::is_regular_file(p)) {
      m[""] = qf::fs::read_file(p);
    } else if (sfs::is_directory(p)) {
      for (auto& e : sfs::recursive_directory_iterator(p))
        if (e.is_regular_file()) m[sfs::relative(e.path(), p).string()] = qf::fs::read_file(e.path().string());
    }
    return m;
  };
  struct Case {
    std::string format, extra, out;
    std::vector<std::string> points;
  };
  const std::vector<Case> cases = {
      {"gguf", "--quant q8_0", outs + "/m.gguf", {"file_synced:m.gguf", "file_renamed:m.gguf"}},
      {"hf", "--dtype fp32", outs + "/hf",
       {"file_synced:config.json", "export_staged", "export_old_aside", "export_committed"}},
      {"gptq", "--quant int4-g32", outs + "/gq", {"file_synced:config.json", "export_staged", "export_old_aside"}},
      {"compressed-tensors", "--quant int4-g32", outs + "/ct", {"export_staged", "export_old_aside", "export_committed"}},
      {"awq", "--quant int4-g32", outs + "/aw", {"file_synced:quant_config.json", "export_staged", "export_old_aside",
                                                  "export_committed"}},
  };
  for (const auto& c : cases) {
    const std::string cmd = "export " + src + " --format " + c.format + " " + c.extra + " --out " + c.out;
    for (const auto& point : c.points) {
      for (bool force : {false, true}) {
        if (!force && point == "export_old_aside") continue;  // only a replacement sets the old output aside
        const std::string what = c.format + " at " + point + (force ? " with --force" : "");
        qf::fs::remove_tree(c.out);
        if (force) {
          // The output to be replaced: written from a 2-step checkpoint so that it differs from the new one.
          ASSERT_EQ(run("export " + src + "/checkpoints/step_00000002 --format " + c.format + " " + c.extra +
                        " --out " + c.out).rc, 0) << what;
        }
        const auto before = snapshot(c.out);
        auto k = run_sh("QFORGE_FAULT=" + point + " " + std::string(QFORGE_BINARY) + " " + cmd + (force ? " --force" : ""));
        EXPECT_TRUE(k.rc == 137 || k.rc == -1) << what << ": rc " << k.rc << "\n" << k.out;
        const bool committed = point == "export_committed" || point == "file_renamed:m.gguf";
        if (committed) {
          EXPECT_TRUE(sfs::exists(c.out)) << what;
          if (force) {
            EXPECT_NE(snapshot(c.out), before) << what << ": the new output is in place";
          }
        } else if (point == "export_old_aside") {
          // The old output was set aside as <out>.old<PID>: the next command puts it back first.
          EXPECT_FALSE(sfs::exists(c.out)) << what;
          auto again = run(cmd);
          EXPECT_EQ(again.rc, 1) << what << "\n" << again.out;
          EXPECT_NE(again.out.find("already exists"), std::string::npos) << what << "\n" << again.out;
          EXPECT_EQ(snapshot(c.out), before) << what << ": the old output is restored byte for byte";
        } else {
          EXPECT_EQ(snapshot(c.out), before) << what << ": --out is untouched (absent, or the old output)";
        }
        auto r = run(cmd + " --force");
        ASSERT_EQ(r.rc, 0) << what << "\n" << r.out;
        for (auto& e : sfs::directory_iterator(outs)) {
          const auto n = e.path().filename().string();
          EXPECT_TRUE(n.find(".tmp") == std::string::npos && n.find(".old") == std::string::npos)
              << what << ": left behind " << e.path();
        }
      }
    }
  }
}

// Issue 16: text that is not UTF-8 through a tokenizer.json (PCRE2) tokenizer crashed generate, train
// and eval with SIGSEGV; now each is a clear error (exit 1) naming --prompt or the file and the byte.
TEST_F(Cli, InvalidUtf8WithATokenizerJsonIsAClearError) {
  // GPT-2's byte-level alphabet as the whole vocabulary (id = byte), ByteLevel pre-tokenizer/decoder.
  std::string vocab;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = direct ? b : 256 + n++;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s\"\\u%04x\": %d", b ? ", " : "", cp, b);
    vocab += buf;
  }
  std::ofstream(tmp.path + "/tokenizer.json")
      << "{\"model\": {\"type\": \"BPE\", \"vocab\": {" << vocab << "}, \"merges\": []},"
      << " \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true},"
      << " \"decoder\": {\"type\": \"ByteLevel\"}}\n";
  std::ofstream(cfg, std::ios::app) << "tokenizer: {type: huggingface, path: " << tmp.path << "/tokenizer.json}\n";
  std::string yaml = qf::fs::read_file(cfg);
  yaml.erase(yaml.find("tokenizer: {path:"), yaml.find("\nmodel:") - yaml.find("tokenizer: {path:") + 1);
  std::ofstream(cfg) << yaml;
  auto t = run("train " + cfg + " trainer.max_steps=2 'sample.prompts=[]'");
  ASSERT_EQ(t.rc, 0) << t.out;
  auto g = run("generate " + tmp.path + "/run --prompt 'abc \xff def' -n 2 -t 0");
  EXPECT_EQ(g.rc, 1) << g.out;
  EXPECT_NE(g.out.find("--prompt: not valid UTF-8 at byte offset 4 (line 1, byte 0xFF)"), std::string::npos) << g.out;
  auto ok = run("generate " + tmp.path + "/run --prompt 'abc def' -n 2 -t 0");
  EXPECT_EQ(ok.rc, 0) << ok.out;
  std::ofstream(tmp.path + "/bad.txt") << "And God said\nabc \xff def\n";
  auto e = run("eval " + tmp.path + "/run --text " + tmp.path + "/bad.txt");
  EXPECT_EQ(e.rc, 1) << e.out;
  EXPECT_NE(e.out.find(tmp.path + "/bad.txt: not valid UTF-8 at byte offset 17 (line 2, byte 0xFF)"), std::string::npos)
      << e.out;
  auto tr = run("train " + cfg + " trainer.max_steps=1 'sample.prompts=[]' run.out_dir=" + tmp.path +
                 "/run2 'data.sources=[{path: " + tmp.path + "/bad.txt}]'");
  EXPECT_EQ(tr.rc, 1) << tr.out;
  EXPECT_NE(tr.out.find("bad.txt: not valid UTF-8 at byte offset 17"), std::string::npos) << tr.out;
}

// Issue 16: a JSON file the user supplies with a value of the wrong type is exit 1 with a message
// naming the file, the key, what was expected and what was found, never nlohmann's raw
// "[json.exception.type_error.302] type must be string, but is number".
TEST_F(Cli, MistypedJsonInputsAreExitOneNamingFileAndKey) {
  ASSERT_EQ(run("train " + cfg + " 'sample.prompts=[]'").rc, 0);
  const std::string src = tmp.path + "/run";
  auto expect_error = [&](const std::string& args, const std::string& want) {
    auto r = run(args);
    EXPECT_EQ(r.rc, 1) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(want), std::string::npos) << args << "\n" << r.out;
    EXPECT_EQ(r.out.find("[json.exception"), std::string::npos) << args << "\n" << r.out;
  };
  // A JSONL record whose text field is a number.
  std::ofstream(tmp.path + "/d.jsonl") << "{\"text\": \"ok\"}\n{\"text\": 5}\n";
  expect_error("eval " + src + " --text " + tmp.path + "/d.jsonl",
               tmp.path + "/d.jsonl:2: field 'text' must be a string, got a JSON number");
  // trainer_state.json with a field of the wrong type (eval, inspect and quantize read it alike).
  const std::string state = src + "/checkpoints/step_00000006/trainer_state.json";
  const std::string good = read_text(state);
  std::string bad = good;
  ASSERT_NE(bad.find("\"step\": 6"), std::string::npos) << bad;
  bad.replace(bad.find("\"step\": 6"), 9, "\"step\": \"6\"");
  std::ofstream(state) << bad;
  expect_error("eval " + src, state + ": 'step': expected a non-negative integer, found \"6\"");
  expect_error("inspect " + src, state + ": 'step': expected a non-negative integer, found \"6\"");
  std::ofstream(state) << good;
  // adapter_config.json with peft_type a number.
  qf::fs::ensure_dir(tmp.path + "/ad");
  std::ofstream(tmp.path + "/ad/adapter_config.json") << R"({"peft_type": 1, "r": 4, "lora_alpha": 8})";
  expect_error("train " + cfg + " run.out_dir=" + tmp.path + "/lora run.init_from=" + src + " peft.r=4 peft.init_adapter=" +
                   tmp.path + "/ad trainer.max_steps=1 'sample.prompts=[]'",
               tmp.path + "/ad/adapter_config.json: 'peft_type': expected a string, found a number");
  // A Hugging Face dir: tokenizer_config.json's add_bos_token, config.json's hidden_act.
  const std::string hf = tmp.path + "/hf";
  ASSERT_EQ(run("export " + src + " --format hf --dtype fp32 --out " + hf).rc, 0);
  std::ofstream(hf + "/tokenizer_config.json") << R"({"add_bos_token": "yes", "bos_token": "<s>"})";
  expect_error("eval " + hf + " --text " + tmp.path + "/corpus.txt",
               hf + "/tokenizer_config.json: 'add_bos_token': expected true or false, found \"yes\"");
  std::string c = read_text(hf + "/config.json");
  ASSERT_NE(c.find("\"hidden_act\": \"silu\""), std::string::npos) << c;
  c.replace(c.find("\"hidden_act\": \"silu\""), 20, "\"hidden_act\": 3");
  std::ofstream(hf + "/config.json") << c;
  expect_error("inspect " + hf, hf + "/config.json: 'hidden_act': expected a string, found a number");
}

// A batch that cannot fit is refused before the first step with the estimate and what to change;
// the run dir is left as it was (nothing but a failed setup happened). QFORGE_HOST_MEMORY_BYTES
// stands in for a smaller machine.
TEST_F(Cli, TrainingThatCannotFitIsRefusedWithTheEstimateAndTheSettingToChange) {
  const std::string big = " model.dim=256 model.n_layers=16 model.n_heads=4 model.ffn_dim=1024 model.max_seq_len=512 data.seq_len=512"
                          " trainer.batch_size=8 trainer.loss_chunk_tokens=0";
  auto r = run_sh("QFORGE_HOST_MEMORY_BYTES=1500000000 " + std::string(QFORGE_BINARY) + " train " + cfg + big);
  EXPECT_EQ(r.rc, 2) << r.out;
  for (const char* s : {"training needs an estimated", "1.40 GiB available", "batch 8 x seq 512",
                        "set trainer.activation_checkpointing: true (estimate then", "trainer.loss_chunk_tokens: -1",
                        "data.seq_len (512)", "trainer.batch_size (8)", "trainer.memory_check: false"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  EXPECT_FALSE(std::filesystem::exists(tmp.path + "/run/checkpoints")) << r.out;
  // What the error suggests makes it fit; memory_check: false lets the original run start.
  auto ok = run_sh("QFORGE_HOST_MEMORY_BYTES=1500000000 " + std::string(QFORGE_BINARY) + " train " + cfg + big +
                   " trainer.activation_checkpointing=true trainer.loss_chunk_tokens=-1 trainer.max_steps=1"
                   " trainer.eval_batches=1 'sample.prompts=[]'");
  EXPECT_EQ(ok.rc, 0) << ok.out;
  EXPECT_NE(ok.out.find("memory estimate for training"), std::string::npos) << ok.out;
}
