// The deployed-quality gate from the command line: `qforge eval RUN --against REF` prints llama.cpp's
// KL-divergence scoreboard and exits 0, or 4 when a gate (--max-* or the run's eval.gate) is missed,
// naming each with measured vs allowed; another tokenizer is refused (exit 1); a QAT run whose recipe
// has eval.gate.against checks its converted model at the end of training (exit 4 when missed, the
// statistics in train_summary.json). (The statistics themselves: tests/trainer/quality_gate_test.cpp;
// against llama.cpp's own logits: tests/interop/test_kld_gate.py.)
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "tests/apps/qforge_cli.h"
#include "tests/test_util.h"

namespace {

qf::testing::CliOut qforge(const std::string& args) { return qf::testing::run_qforge(args, "OMP_NUM_THREADS=2"); }

// The last line that is a JSON object.
nlohmann::json last_json(const std::string& text) {
  std::istringstream in(text);
  nlohmann::json j;
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && line[0] == '{') j = nlohmann::json::parse(line);
  return j;
}

std::string recipe(const qf::testing::TmpDir& tmp, const std::string& name, int vocab, const std::string& extra = "") {
  const std::string path = tmp / (name + ".yaml");
  std::ostringstream y;
  y << "run: {name: " << name << ", out_dir: " << tmp / name << ", threads: 2}\n"
    << "tokenizer: {path: " << tmp / ("tok" + std::to_string(vocab) + ".model")
    << ", train: {enabled: true, sources: [" << tmp / "corpus.txt" << "], vocab_size: " << vocab << "}}\n"
    << "model: {dim: 32, n_layers: 2, n_heads: 4, ffn_dim: 64, max_seq_len: 64}\n"
    << "data: {sources: [{path: " << tmp / "corpus.txt" << ", split: line}], seq_len: 32, val_fraction: 0.05, cache_dir: "
    << tmp / "cache" << "}\n"
    << "trainer: {max_steps: 8, batch_size: 4, eval_every: 0, eval_batches: 2, schedule: {warmup_steps: 1}}\n"
    << extra;
  qf::testing::write_text(path, y.str());
  return path;
}

TEST(QualityGateCli, EvalAgainstReportsAndGatesExitFour) {
  qf::testing::TmpDir tmp("qf_gate_cli");
  {
    std::ifstream in(std::string(QFORGE_SOURCE_DIR) + "/data/corpora/kjv.txt");
    std::ofstream o(tmp / "corpus.txt");
    std::string line;
    for (int n = 0; n < 1200 && std::getline(in, line); ++n) o << line << "\n";
  }
  auto t = qforge("-q train " + recipe(tmp, "fp", 400));
  ASSERT_EQ(t.rc, 0) << t.text;
  auto q = qforge("-q quantize " + tmp / "fp" + " --method rtn --quant q4_0 --no-eval --out " + tmp / "q4");
  ASSERT_EQ(q.rc, 0) << q.text;

  // No gate: the scoreboard, exit 0.
  auto e = qforge("-q eval " + tmp / "q4" + " --against " + tmp / "fp" + " --max-batches 2 --samples-out " +
                  tmp / "tokens.jsonl");
  ASSERT_EQ(e.rc, 0) << e.text;
  for (const char* s : {"Mean PPL(Q)/PPL(base)", "Mean    KLD:", "99.0%   KLD:", "RMS Δp    :", "Same top p:"})
    EXPECT_NE(e.text.find(s), std::string::npos) << s << "\n" << e.text;
  auto j = last_json(e.text);
  ASSERT_TRUE(j.contains("kld")) << e.text;
  EXPECT_EQ(j["tokens"].get<int64_t>(), 2 * 4 * 32);  // 2 batches of 4 windows, 32 labelled tokens each
  EXPECT_GT(j["kld"].get<double>(), 0.0);
  EXPECT_GT(j["same_top"].get<double>(), 0.5);
  EXPECT_TRUE(j["gate_missed"].empty());
  {
    std::ifstream in(tmp / "tokens.jsonl");
    int64_t n = 0;
    double kld = 0;
    for (std::string line; std::getline(in, line); ++n) {
      auto t = nlohmann::json::parse(line);
      kld += t["kld"].get<double>();
      if (n == 0) EXPECT_EQ(t["window"].get<int64_t>() * 100 + t["pos"].get<int64_t>(), 0) << line;
    }
    EXPECT_EQ(n, 2 * 4 * 32);
    EXPECT_NEAR(kld / n, j["kld"].get<double>(), 1e-12);
  }

  // The float model against itself: nothing lost.
  auto self = qforge("-q eval " + tmp / "fp" + " --against " + tmp / "fp" + " --max-batches 2 --max-kld 0 --min-same-top 1");
  ASSERT_EQ(self.rc, 0) << self.text;
  EXPECT_EQ(last_json(self.text)["kld"].get<double>(), 0.0);

  // Gates from the flags, and from the run's eval.gate (a key=value override of its config).
  auto g = qforge("-q eval " + tmp / "q4" + " --against " + tmp / "fp" + " --max-batches 2 --max-kld 1e-9 --max-ppl-ratio 100");
  EXPECT_EQ(g.rc, 4) << g.text;
  EXPECT_NE(g.text.find("qforge: 1 quality gate missed:\n  mean KLD "), std::string::npos) << g.text;
  EXPECT_NE(g.text.find("> eval.gate.max_kld 1e-09"), std::string::npos) << g.text;
  auto g2 = qforge("-q eval " + tmp / "q4" + " eval.gate.min_same_top=1 eval.gate.max_rms_dp=0 --against " + tmp / "fp" +
                   " --max-batches 2");
  EXPECT_EQ(g2.rc, 4) << g2.text;
  EXPECT_NE(g2.text.find("2 quality gates missed"), std::string::npos) << g2.text;
  EXPECT_NE(g2.text.find("< eval.gate.min_same_top 1 (100.000%)"), std::string::npos) << g2.text;
  EXPECT_NE(g2.text.find("RMS Δp"), std::string::npos) << g2.text;
  auto bad = qforge("-q eval " + tmp / "q4" + " eval.gate.min_same_top=2 --against " + tmp / "fp");
  EXPECT_EQ(bad.rc, 2) << bad.text;
  EXPECT_NE(bad.text.find("eval.gate.min_same_top: value 2 is out of range"), std::string::npos) << bad.text;

  // Another tokenizer: refused, naming both.
  auto t2 = qforge("-q train " + recipe(tmp, "other", 420));
  ASSERT_EQ(t2.rc, 0) << t2.text;
  auto v = qforge("-q eval " + tmp / "q4" + " --against " + tmp / "other");
  EXPECT_EQ(v.rc, 1) << v.text;
  EXPECT_NE(v.text.find("tokenizer has 400 entries and the reference " + tmp / "other" + "'s has 420"), std::string::npos)
      << v.text;

  // At the end of a converting QAT run: the converted model against eval.gate.against.
  const std::string qat = "quant: {rules: [{pattern: 'model.layers.*', weight: {preset: q4_0}}]}\n"
                          "eval: {gate: {against: " + tmp / "fp" + ", max_kld: 1e-9}}\n";
  auto r = qforge("-q train " + recipe(tmp, "qat", 400, qat) + " run.init_from=" + tmp / "fp" + " trainer.max_steps=2");
  EXPECT_EQ(r.rc, 4) << r.text;
  EXPECT_NE(r.text.find("== quality gate: converted model vs " + tmp / "fp"), std::string::npos) << r.text;
  EXPECT_NE(r.text.find("quality gate missed:\n  mean KLD "), std::string::npos) << r.text;
  std::ifstream sf(tmp / "qat/train_summary.json");
  ASSERT_TRUE(sf.good());
  auto summary = nlohmann::json::parse(sf);
  ASSERT_TRUE(summary.contains("quality_gate")) << summary.dump();
  EXPECT_EQ(summary["quality_gate"]["gate_missed"].size(), 1u);
  EXPECT_GT(summary["quality_gate"]["kld"].get<double>(), 0.0);
  // A run that does not convert has nothing to gate at its end: refused with the way out.
  auto nc = qforge("-q train " + recipe(tmp, "noconv", 400, "eval: {gate: {against: " + tmp / "fp" + ", max_kld: 1}}\n"));
  EXPECT_EQ(nc.rc, 2) << nc.text;
  EXPECT_NE(nc.text.find("eval.gate.against: compares the converted model with the reference at the end of training, "
                         "but this run does not convert"), std::string::npos) << nc.text;
  auto ok = qforge("-q train " + recipe(tmp, "qat2", 400, qat) + " run.init_from=" + tmp / "fp" +
                   " trainer.max_steps=2 eval.gate.max_kld=10");
  EXPECT_EQ(ok.rc, 0) << ok.text;
}

}  // namespace
