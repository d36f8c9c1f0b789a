// The quality gate's statistics (trainer/quality_gate.h) on hand-made logits: identical models,
// a pair computed by hand, llama.cpp's ln p > -16 cut, and a second code path written as
// llama.cpp's perplexity.cpp loops (per token, float logits, double sums) on random logits; the
// eval.gate config's checks and the missed-gate lines.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "tests/test_util.h"
#include "trainer/quality_gate.h"

using namespace qf::trainer;

namespace {

at::Tensor rows(std::vector<std::vector<float>> v) {
  auto t = torch::empty({(int64_t)v.size(), (int64_t)v[0].size()});
  for (size_t i = 0; i < v.size(); ++i)
    for (size_t j = 0; j < v[i].size(); ++j) t[i][j] = v[i][j];
  return t;
}

}  // namespace

TEST(QualityGate, IdenticalModelsScoreZero) {
  torch::manual_seed(1);
  auto l = torch::randn({300, 37}) * 3;
  auto t = torch::randint(0, 37, {300});
  Scoreboard sb;
  sb.add(l, l, t);
  auto st = statistics(sb);
  EXPECT_EQ(st.tokens, 300);
  EXPECT_NEAR(st.kld.value, 0.0, 1e-15);
  EXPECT_NEAR(st.kld_max, 0.0, 1e-15);
  EXPECT_DOUBLE_EQ(st.same_top.value, 1.0);
  EXPECT_DOUBLE_EQ(st.same_top.unc, 0.0);
  EXPECT_DOUBLE_EQ(st.dp.value, 0.0);
  EXPECT_DOUBLE_EQ(st.rms_dp.value, 0.0);
  EXPECT_DOUBLE_EQ(st.ppl_ratio.value, 1.0);
  EXPECT_DOUBLE_EQ(st.ln_ppl_ratio.value, 0.0);
  EXPECT_DOUBLE_EQ(st.ppl_diff.value, 0.0);
  EXPECT_NEAR(st.ppl_correlation, 1.0, 1e-9);
  EXPECT_TRUE(missed_gates(GateConfig{0.0, 0.0, 1.0, 0.0, 1.0, ""}, st).empty());
}

TEST(QualityGate, HandComputedPair) {
  // Row 0: ref p = (1/2, 1/2), model p = (3/4, 1/4), true token 0.
  //   KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); Δp = 3/4 - 1/2; argmax 0 for both (first maximum).
  // Row 1: ref p = (1/5, 4/5), model p = (1/2, 1/2), true token 1.
  //   KL = 1/5 ln(2/5) + 4/5 ln(8/5); Δp = 1/2 - 4/5; argmax 1 vs 0 (the model's tie: the first).
  Scoreboard sb;
  sb.add(rows({{0.f, 0.f}, {0.f, std::log(4.f)}}), rows({{std::log(3.f), 0.f}, {1.f, 1.f}}), torch::tensor({0, 1}));
  ASSERT_EQ(sb.count, 2);
  EXPECT_TRUE(sb.tokens.empty());  // per-token records only when asked
  const double k0 = 0.5 * std::log(4.0 / 3), k1 = 0.2 * std::log(0.4) + 0.8 * std::log(1.6);
  EXPECT_NEAR(sb.kld_values[0], k0, 1e-7);
  EXPECT_NEAR(sb.kld_values[1], k1, 1e-7);
  auto st = statistics(sb);
  EXPECT_NEAR(st.kld.value, (k0 + k1) / 2, 1e-7);
  EXPECT_EQ(st.kld.unc, 0.0);  // llama.cpp: no uncertainty from 10 values or fewer
  EXPECT_NEAR(st.kld_median, (k0 + k1) / 2, 1e-7);
  EXPECT_NEAR(st.kld_max, std::max(k0, k1), 1e-7);
  EXPECT_NEAR(st.kld_p99, std::min(k0, k1) + 0.99 * std::fabs(k0 - k1), 1e-6);
  EXPECT_DOUBLE_EQ(st.same_top.value, 0.5);
  EXPECT_NEAR(st.same_top.unc, std::sqrt(0.25 / 1), 1e-12);
  EXPECT_NEAR(st.dp.value, (0.25 - 0.3) / 2, 1e-7);
  EXPECT_NEAR(st.rms_dp.value, std::sqrt((0.25 * 0.25 + 0.3 * 0.3) / 2), 1e-7);
  EXPECT_NEAR(st.dp_max, 0.25, 1e-7);
  EXPECT_NEAR(st.dp_min, -0.3, 1e-7);
  const double nll = (-std::log(0.75) - std::log(0.5)) / 2, nll_base = (std::log(2.0) - std::log(0.8)) / 2;
  EXPECT_NEAR(st.ppl.value, std::exp(nll), 1e-6);
  EXPECT_NEAR(st.ppl_base.value, std::exp(nll_base), 1e-6);
  EXPECT_NEAR(st.ln_ppl_ratio.value, nll - nll_base, 1e-7);
  EXPECT_NEAR(st.ppl_ratio.value, std::exp(nll - nll_base), 1e-7);
  EXPECT_NEAR(st.ppl_diff.value, std::exp(nll) - std::exp(nll_base), 1e-6);
}

TEST(QualityGate, PerTokenRecordsWhenAsked) {
  Scoreboard sb;
  sb.keep_tokens = true;
  sb.add(rows({{0.f, 0.f}, {0.f, std::log(4.f)}}), rows({{std::log(3.f), 0.f}, {1.f, 1.f}}), torch::tensor({0, 1}),
         torch::tensor({3, 7, 4, 0}).reshape({2, 2}));
  ASSERT_EQ(sb.tokens.size(), 2u);
  EXPECT_EQ(sb.tokens[0].window, 3);
  EXPECT_EQ(sb.tokens[0].pos, 7);
  EXPECT_EQ(sb.tokens[1].window, 4);
  EXPECT_EQ(sb.tokens[1].token, 1);
  EXPECT_NEAR(sb.tokens[0].kld, 0.5 * std::log(4.0 / 3), 1e-7);
  EXPECT_NEAR(sb.tokens[1].dp, 0.5 - 0.8, 1e-7);
  EXPECT_TRUE(sb.tokens[0].same_top);
  EXPECT_FALSE(sb.tokens[1].same_top);
  EXPECT_NEAR(sb.tokens[0].nll, -std::log(0.75), 1e-7);
  EXPECT_NEAR(sb.tokens[1].nll_ref, -std::log(0.8), 1e-7);
  const auto jl = tokens_jsonl(sb);
  EXPECT_EQ(std::count(jl.begin(), jl.end(), '\n'), 2);
  EXPECT_NE(jl.find("\"pos\":7"), std::string::npos) << jl;
}

TEST(QualityGate, ReferenceEntriesBelowMinus16AreLeftOut) {
  // ln p_ref of entry 1 is about -17 (< -16): llama.cpp leaves its term out of the sum.
  Scoreboard sb;
  sb.add(rows({{0.f, -17.f}}), rows({{0.f, 0.f}}), torch::tensor({0}));
  const double p0 = 1 / (1 + std::exp(-17.0));
  EXPECT_NEAR(sb.sum_kld, p0 * (std::log(p0) - std::log(0.5)), 1e-12);
  // ... which the full sum would not: its term is -6.7e-7.
  EXPECT_GT(std::fabs(sb.sum_kld - (p0 * std::log(p0 / 0.5) + (1 - p0) * std::log((1 - p0) / 0.5))), 5e-7);
}

// llama.cpp's kl_divergence statistics written out as its loops (tools/perplexity/perplexity.cpp):
// a second code path for the same definitions.
TEST(QualityGate, MatchesLlamaCppLoopsOnRandomLogits) {
  torch::manual_seed(7);
  const int64_t N = 523, V = 61;
  auto ref = torch::randn({N, V}) * 2.5;
  auto model = ref + torch::randn({N, V}) * 0.4;
  auto tok = torch::randint(0, V, {N});
  Scoreboard sb;
  for (int64_t s = 0; s < N; s += 100)  // in chunks, as compare_models feeds it
    sb.add(ref.slice(0, s, std::min(N, s + 100)), model.slice(0, s, std::min(N, s + 100)),
           tok.slice(0, s, std::min(N, s + 100)));
  auto st = statistics(sb);

  double s_nll = 0, s_nll2 = 0, s_b = 0, s_b2 = 0, s_nb = 0, s_k = 0, s_k2 = 0, s_d = 0, s_d2 = 0, s_d4 = 0;
  int64_t same = 0;
  std::vector<double> kv, dv;
  auto r = ref.contiguous(), m = model.contiguous();
  for (int64_t i = 0; i < N; ++i) {
    const float* lr = r[i].data_ptr<float>();
    const float* lm = m[i].data_ptr<float>();
    const int64_t t = tok[i].item<int64_t>();
    auto lse = [V](const float* l, int64_t& imax) {
      double mx = l[0];
      imax = 0;
      for (int64_t j = 1; j < V; ++j)
        if (l[j] > mx) mx = l[j], imax = j;
      double se = 0;
      for (int64_t j = 0; j < V; ++j) se += std::exp(double(l[j]) - mx);
      return mx + std::log(se);
    };
    int64_t im = 0, ib = 0;
    const double zm = lse(lm, im), zb = lse(lr, ib);
    const double nll = zm - lm[t], nll_b = zb - lr[t];
    s_nll += nll, s_nll2 += nll * nll, s_b += nll_b, s_b2 += nll_b * nll_b, s_nb += nll * nll_b;
    double k = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double lpb = lr[j] - zb, lpm = lm[j] - zm;
      if (lpb > -16) k += std::exp(lpb) * (lpb - lpm);
    }
    s_k += k, s_k2 += k * k;
    same += im == ib;
    const double d = std::exp(-nll) - std::exp(-nll_b);
    s_d += d, s_d2 += d * d, s_d4 += d * d * d * d;
    kv.push_back(k), dv.push_back(d);
  }
  auto mu = [N](double s, double s2) {
    const double f = s / N, df = s2 / N - f * f;
    return std::pair{f, df > 0 ? std::sqrt(df / (N - 1)) : 0.0};
  };
  const auto lp = mu(s_nll, s_nll2), lb = mu(s_b, s_b2), k = mu(s_k, s_k2), d = mu(s_d, s_d2), mse = mu(s_d2, s_d4);
  const double cov = (s_nb / N - (s_nll / N) * (s_b / N)) / (N - 1);
  const double tol = 1e-9;
  EXPECT_NEAR(st.ppl.value, std::exp(lp.first), tol * st.ppl.value);
  EXPECT_NEAR(st.ppl.unc, std::exp(lp.first) * lp.second, tol * st.ppl.value);
  EXPECT_NEAR(st.ppl_base.value, std::exp(lb.first), tol * st.ppl_base.value);
  EXPECT_NEAR(st.ln_ppl_ratio.value, lp.first - lb.first, tol);
  EXPECT_NEAR(st.ln_ppl_ratio.unc, std::sqrt(lp.second * lp.second + lb.second * lb.second - 2 * cov), tol);
  EXPECT_NEAR(st.ppl_correlation, cov / (lp.second * lb.second), 1e-7);
  EXPECT_NEAR(st.kld.value, k.first, tol);
  EXPECT_NEAR(st.kld.unc, k.second, tol);
  EXPECT_NEAR(st.dp.value, d.first, tol);
  EXPECT_NEAR(st.dp.unc, d.second, tol);
  EXPECT_NEAR(st.rms_dp.value, std::sqrt(mse.first), tol);
  EXPECT_NEAR(st.rms_dp.unc, 0.5 / std::sqrt(mse.first) * mse.second, tol);
  const double top = double(same) / N;
  EXPECT_DOUBLE_EQ(st.same_top.value, top);
  EXPECT_NEAR(st.same_top.unc, std::sqrt(top * (1 - top) / (N - 1)), 1e-12);
  EXPECT_LT(top, 1.0);
  // Order statistics: N = 523 is odd, so the median is the middle value; percentile(0.99) interpolates
  // at 0.99 * 522 = 516.78.
  std::sort(kv.begin(), kv.end());
  std::sort(dv.begin(), dv.end());
  EXPECT_NEAR(st.kld_median, kv[N / 2], 1e-6);
  EXPECT_NEAR(st.kld_max, kv.back(), 1e-6);
  EXPECT_NEAR(st.kld_min, kv.front(), 1e-6);
  EXPECT_NEAR(st.kld_p99, 0.22 * kv[516] + 0.78 * kv[517], 1e-5);
  EXPECT_NEAR(st.dp_median, dv[N / 2], 1e-6);
  EXPECT_NEAR(st.dp_p99, 0.22 * dv[516] + 0.78 * dv[517], 1e-5);
  EXPECT_NEAR(st.dp_p01, 0.78 * dv[5] + 0.22 * dv[6], 1e-5);  // 0.01 * 522 = 5.22
}

TEST(QualityGate, MissedGatesNameMeasuredAndAllowed) {
  ScoreboardStats st;
  st.kld.value = 0.08;
  st.kld_p99 = 0.5;
  st.same_top.value = 0.85;
  st.rms_dp.value = 0.02;
  st.ppl_ratio.value = 1.07;
  GateConfig g;
  g.max_kld = 0.05;
  g.max_kld_p99 = 1.0;
  g.min_same_top = 0.9;
  g.max_rms_dp = 0.05;
  g.max_ppl_ratio = 1.05;
  auto m = missed_gates(g, st);
  ASSERT_EQ(m.size(), 3u);
  EXPECT_EQ(m[0], "mean KLD 0.080000 > eval.gate.max_kld 0.05");
  EXPECT_EQ(m[1], "same top 85.000% < eval.gate.min_same_top 0.9 (90.000%)");
  EXPECT_EQ(m[2], "PPL(model)/PPL(ref) 1.070000 > eval.gate.max_ppl_ratio 1.05");
  auto rep = report(st, g);
  EXPECT_NE(rep.find("MISSED"), std::string::npos);
  EXPECT_TRUE(missed_gates(GateConfig{}, st).empty());
  QualityGateError e(m);
  EXPECT_NE(std::string(e.what()).find("3 quality gates missed:\n  mean KLD"), std::string::npos) << e.what();
}

TEST(QualityGate, ConfigIsTypedAndChecked) {
  using qf::testing::config_error_of;
  using qf::testing::parse_section;
  auto e = parse_section<EvalConfig>("eval: {gate: {max_kld: 0.05, min_same_top: 0.9, against: /some/run}}", "eval");
  ASSERT_TRUE(e.gate.max_kld && e.gate.min_same_top);
  EXPECT_DOUBLE_EQ(*e.gate.max_kld, 0.05);
  EXPECT_FALSE(e.gate.max_rms_dp);
  EXPECT_EQ(e.gate.against, "/some/run");
  EXPECT_FALSE(parse_section<EvalConfig>("{}", "eval").gate.any());
  auto msg = config_error_of([] { parse_section<EvalConfig>("eval: {gate: {min_same_top: 90, max_kl: 1}}", "eval"); });
  EXPECT_NE(msg.find("eval.gate.min_same_top: value 90 is out of range"), std::string::npos) << msg;
  EXPECT_NE(msg.find("eval.gate.max_kl: unknown key"), std::string::npos) << msg;
  msg = config_error_of([] { parse_section<EvalConfig>("eval: {gate: {against: /x}}", "eval"); });
  EXPECT_NE(msg.find("eval.gate.against: names a reference model but no threshold is set"), std::string::npos) << msg;
  msg = config_error_of([] { parse_section<EvalConfig>("eval: {gate: {max_rms_dp: abc}}", "eval"); });
  EXPECT_NE(msg.find("eval.gate.max_rms_dp"), std::string::npos) << msg;
}
