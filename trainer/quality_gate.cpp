#include "trainer/quality_gate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "trainer/evaluate.h"

namespace qf::trainer {

GateConfig GateConfig::from_config(cfg::Reader& r) {
  GateConfig g;
  auto opt = [&r](const char* key, double lo, double hi) -> std::optional<double> {
    if (!r.has(key)) return std::nullopt;
    return r.f64(key, 0.0, lo, hi);
  };
  g.max_kld = opt("max_kld", 0.0, 1e9);
  g.max_kld_p99 = opt("max_kld_p99", 0.0, 1e9);
  g.min_same_top = opt("min_same_top", 0.0, 1.0);
  g.max_rms_dp = opt("max_rms_dp", 0.0, 1.0);
  g.max_ppl_ratio = opt("max_ppl_ratio", 0.0, 1e9);
  // Checked when used (a run's config.yaml is re-read by every command, also after REF has moved).
  g.against = r.str("against", "");
  if (!g.against.empty() && !g.any())
    r.fail("against", "names a reference model but no threshold is set (max_kld, max_kld_p99, min_same_top, "
                      "max_rms_dp, max_ppl_ratio)");
  r.finish();
  return g;
}

EvalConfig EvalConfig::from_config(cfg::Reader& r) {
  EvalConfig e;
  auto g = r.child("gate");
  e.gate = GateConfig::from_config(g);
  r.finish();
  return e;
}

void Scoreboard::add(const at::Tensor& ref_logits, const at::Tensor& model_logits, const at::Tensor& targets,
                     const at::Tensor& where) {
  QF_CHECK_INPUT(ref_logits.dim() == 2 && ref_logits.sizes() == model_logits.sizes(),
                 "quality gate: the reference's logits ", ref_logits.sizes(), " and the model's ", model_logits.sizes(),
                 " differ in shape (both models must share the vocabulary)");
  if (ref_logits.size(0) == 0) return;
  at::NoGradGuard ng;
  const auto lr = at::log_softmax(ref_logits.to(at::kDouble), -1);
  const auto lm = at::log_softmax(model_logits.to(at::kDouble), -1);
  // llama.cpp sums p_ref (ln p_ref - ln p_model) over the entries whose ln p_ref > -16.
  const auto kld = at::where(lr > -16.0, lr.exp() * (lr - lm), at::zeros({}, lr.options())).sum(-1).cpu();
  const auto t = targets.to(lr.device(), at::kLong).reshape({-1, 1});
  const auto nll = (-lm.gather(1, t)).reshape({-1}).cpu();
  const auto nll_base = (-lr.gather(1, t)).reshape({-1}).cpu();
  const auto same = (lm.argmax(-1) == lr.argmax(-1)).cpu();
  const int64_t n = kld.size(0);
  const double *k = kld.data_ptr<double>(), *a = nll.data_ptr<double>(), *b = nll_base.data_ptr<double>();
  const bool* s = same.data_ptr<bool>();
  at::Tensor wh;
  if (keep_tokens) {
    wh = where.defined() ? where.to(at::kCPU, at::kLong).contiguous() : at::zeros({n, 2}, at::kLong);
    QF_CHECK(wh.dim() == 2 && wh.size(0) == n && wh.size(1) == 2, "Scoreboard::add: `where` must be [N, 2]");
  }
  const auto tgt = targets.to(at::kCPU, at::kLong).reshape({-1}).contiguous();
  const int64_t* wp = keep_tokens ? wh.data_ptr<int64_t>() : nullptr;
  const int64_t* tp = tgt.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    sum_nll += a[i];
    sum_nll2 += a[i] * a[i];
    sum_nll_base += b[i];
    sum_nll_base2 += b[i] * b[i];
    sum_nll_nll_base += a[i] * b[i];
    sum_kld += k[i];
    sum_kld2 += k[i] * k[i];
    const double dp = std::exp(-a[i]) - std::exp(-b[i]);
    sum_p_diff += dp;
    sum_p_diff2 += dp * dp;
    sum_p_diff4 += dp * dp * dp * dp;
    max_p_diff = std::max(max_p_diff, std::fabs(dp));
    n_same_top += s[i] ? 1 : 0;
    ++count;
    kld_values.push_back(static_cast<float>(k[i]));
    p_diff_values.push_back(static_cast<float>(dp));
    if (keep_tokens)
      tokens.push_back({wp[2 * i], wp[2 * i + 1], tp[i], k[i], dp, a[i], b[i], s[i]});
  }
}

namespace {

// llama.cpp's mean_and_uncertainty: the mean and its standard error (0 for 10 values or fewer).
MeanUnc mean_unc(double sum, double sum2, int64_t count) {
  if (count < 1) return {};
  const double f = sum / count;
  double df = sum2 / count - f * f;
  df = df > 0 && count > 10 ? std::sqrt(df / (count - 1)) : 0.0;
  return {f, df};
}

// llama.cpp's covariance of two means (0 below 10 values).
double covariance(double a, double b, double ab, int64_t count) {
  if (count < 10) return 0.0;
  return (ab / count - (a / count) * (b / count)) / (count - 1);
}

// llama.cpp's percentile of sorted values: linear interpolation at fraction * (n - 1), in float.
float percentile(const std::vector<float>& v, float fraction) {
  if (fraction <= 0) return v.front();
  if (fraction >= 1) return v.back();
  float p = fraction * (v.size() - 1);
  const size_t ip = static_cast<size_t>(p);
  p -= ip;
  return (1 - p) * v[ip] + p * v[std::min(ip + 1, v.size() - 1)];
}

float median(const std::vector<float>& v) {
  const size_t n = v.size();
  return n % 2 == 0 ? 0.5f * (v[n / 2] + v[n / 2 - 1]) : v[n / 2];
}

}  // namespace

ScoreboardStats statistics(const Scoreboard& s) {
  QF_CHECK_INPUT(s.count > 0, "quality gate: no token was scored (the evaluated windows hold no labelled token)");
  ScoreboardStats st;
  st.tokens = s.count;
  const auto log_ppl = mean_unc(s.sum_nll, s.sum_nll2, s.count);
  const auto log_ppl_base = mean_unc(s.sum_nll_base, s.sum_nll_base2, s.count);
  st.ppl = {std::exp(log_ppl.value), std::exp(log_ppl.value) * log_ppl.unc};
  st.ppl_base = {std::exp(log_ppl_base.value), std::exp(log_ppl_base.value) * log_ppl_base.unc};
  const double cov = covariance(s.sum_nll, s.sum_nll_base, s.sum_nll_nll_base, s.count);
  st.ppl_correlation = log_ppl.unc > 0 && log_ppl_base.unc > 0 ? cov / (log_ppl.unc * log_ppl_base.unc) : 0.0;
  const double ln_ratio = log_ppl.value - log_ppl_base.value;
  const double ln_ratio_unc =
      std::sqrt(std::max(0.0, log_ppl.unc * log_ppl.unc + log_ppl_base.unc * log_ppl_base.unc - 2.0 * cov));
  st.ln_ppl_ratio = {ln_ratio, ln_ratio_unc};
  st.ppl_ratio = {std::exp(ln_ratio), std::exp(ln_ratio) * ln_ratio_unc};
  const double ppl_cov = st.ppl.value * st.ppl_base.value * cov;
  st.ppl_diff = {st.ppl.value - st.ppl_base.value,
                 std::sqrt(std::max(0.0, st.ppl.unc * st.ppl.unc + st.ppl_base.unc * st.ppl_base.unc - 2.0 * ppl_cov))};

  auto k = s.kld_values, d = s.p_diff_values;
  std::sort(k.begin(), k.end());
  std::sort(d.begin(), d.end());
  st.kld = mean_unc(s.sum_kld, s.sum_kld2, s.count);
  st.kld_max = k.back();
  st.kld_p999 = percentile(k, 0.999f);
  st.kld_p99 = percentile(k, 0.990f);
  st.kld_p95 = percentile(k, 0.950f);
  st.kld_p90 = percentile(k, 0.900f);
  st.kld_median = median(k);
  st.kld_p10 = percentile(k, 0.100f);
  st.kld_p05 = percentile(k, 0.050f);
  st.kld_p01 = percentile(k, 0.010f);
  st.kld_p001 = percentile(k, 0.001f);
  st.kld_min = k.front();

  st.dp = mean_unc(s.sum_p_diff, s.sum_p_diff2, s.count);
  st.dp_max = d.back();
  st.dp_p999 = percentile(d, 0.999f);
  st.dp_p99 = percentile(d, 0.990f);
  st.dp_p95 = percentile(d, 0.950f);
  st.dp_p90 = percentile(d, 0.900f);
  st.dp_p75 = percentile(d, 0.750f);
  st.dp_median = median(d);
  st.dp_p25 = percentile(d, 0.250f);
  st.dp_p10 = percentile(d, 0.100f);
  st.dp_p05 = percentile(d, 0.050f);
  st.dp_p01 = percentile(d, 0.010f);
  st.dp_p001 = percentile(d, 0.001f);
  st.dp_min = d.front();
  const auto mse = mean_unc(s.sum_p_diff2, s.sum_p_diff4, s.count);
  const double rms = std::sqrt(mse.value);
  st.rms_dp = {rms, rms > 0 ? 0.5 / rms * mse.unc : 0.0};
  const double top = static_cast<double>(s.n_same_top) / s.count;
  st.same_top = {top, s.count > 1 ? std::sqrt(top * (1 - top) / (s.count - 1)) : 0.0};
  return st;
}

nlohmann::json ScoreboardStats::to_json() const {
  nlohmann::json j;
  j["tokens"] = tokens;
  auto mu = [&j](const char* key, const MeanUnc& m) {
    j[key] = m.value;
    j[std::string(key) + "_unc"] = m.unc;
  };
  mu("ppl", ppl);
  mu("ppl_ref", ppl_base);
  j["ppl_cor"] = ppl_correlation;
  mu("ln_ppl_ratio", ln_ppl_ratio);
  mu("ppl_ratio", ppl_ratio);
  mu("ppl_diff", ppl_diff);
  mu("kld", kld);
  j.update({{"kld_max", kld_max}, {"kld_p999", kld_p999}, {"kld_p99", kld_p99}, {"kld_p95", kld_p95},
            {"kld_p90", kld_p90}, {"kld_median", kld_median}, {"kld_p10", kld_p10}, {"kld_p05", kld_p05},
            {"kld_p01", kld_p01}, {"kld_p001", kld_p001}, {"kld_min", kld_min}});
  mu("dp", dp);
  j.update({{"dp_max", dp_max}, {"dp_p999", dp_p999}, {"dp_p99", dp_p99}, {"dp_p95", dp_p95}, {"dp_p90", dp_p90},
            {"dp_p75", dp_p75}, {"dp_median", dp_median}, {"dp_p25", dp_p25}, {"dp_p10", dp_p10}, {"dp_p05", dp_p05},
            {"dp_p01", dp_p01}, {"dp_p001", dp_p001}, {"dp_min", dp_min}});
  mu("rms_dp", rms_dp);
  mu("same_top", same_top);
  return j;
}

Scoreboard compare_models(models::CausalLM& ref, models::CausalLM& model, const data::PackedSet& set, int64_t bs,
                          int64_t max_batches, at::Device dev, bool bf16, bool keep_tokens) {
  QF_CHECK_INPUT(ref.cfg.vocab_size == model.cfg.vocab_size, "quality gate: the reference has ", ref.cfg.vocab_size,
                 " output logits and the model ", model.cfg.vocab_size, "; both must share one vocabulary");
  Scoreboard sb;
  sb.keep_tokens = keep_tokens;
  at::NoGradGuard ng;
  const bool ref_was = ref.is_training(), was = model.is_training();
  ref.eval();
  model.eval();
  // Rows of logits per chunk: about 2^22 per model (32 MiB in fp64), at least 16.
  const int64_t chunk = std::max<int64_t>(16, (int64_t{1} << 22) / std::max<int64_t>(1, model.cfg.vocab_size));
  int64_t nb = (set.size() + bs - 1) / bs;
  if (max_batches > 0) nb = std::min(nb, max_batches);
  for (int64_t i = 0; i < nb; ++i) {
    std::vector<int64_t> idx;
    for (int64_t j = i * bs; j < std::min(set.size(), (i + 1) * bs); ++j) idx.push_back(j);
    auto b = data::make_batch(set, idx);
    auto labels = b.labels.reshape({-1});
    auto rows = (labels != -100).nonzero().reshape({-1});
    if (rows.numel() == 0) continue;
    auto targets = labels.index_select(0, rows);
    const int64_t T = b.labels.size(1);
    const auto where = at::stack({rows.div(T, "floor") + i * bs, rows.remainder(T)}, 1);
    auto hr = eval_hidden(ref, b.input_ids, dev, bf16);
    hr = hr.reshape({-1, hr.size(-1)}).index_select(0, rows.to(hr.device()));
    auto hm = eval_hidden(model, b.input_ids, dev, bf16);
    hm = hm.reshape({-1, hm.size(-1)}).index_select(0, rows.to(hm.device()));
    for (int64_t s = 0; s < rows.numel(); s += chunk) {
      const int64_t e = std::min(rows.numel(), s + chunk);
      sb.add(eval_logits(ref, hr.slice(0, s, e), dev, bf16), eval_logits(model, hm.slice(0, s, e), dev, bf16),
             targets.slice(0, s, e), where.slice(0, s, e));
    }
  }
  if (ref_was) ref.train();
  if (was) model.train();
  return sb;
}

void check_same_vocabulary(const data::Tokenizer& a, const data::Tokenizer& b, const std::string& an,
                           const std::string& bn) {
  const std::string both = "; the quality gate compares next-token distributions, so the model and the reference "
                           "must share one tokenizer";
  QF_CHECK_INPUT(a.vocab_size() == b.vocab_size(), "quality gate: ", an, "'s tokenizer has ", a.vocab_size(),
                 " entries and the reference ", bn, "'s has ", b.vocab_size(), both);
  QF_CHECK_INPUT(a.bos_id() == b.bos_id() && a.eos_id() == b.eos_id(), "quality gate: ", an, "'s tokenizer has BOS/EOS ids ",
                 a.bos_id(), "/", a.eos_id(), " and the reference ", bn, "'s ", b.bos_id(), "/", b.eos_id(), both);
  for (int64_t i = 0; i < a.vocab_size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    QF_CHECK_INPUT(a.token(id) == b.token(id), "quality gate: token ", i, " is '", a.token(id), "' in ", an,
                   "'s tokenizer and '", b.token(id), "' in the reference ", bn, "'s", both);
  }
}

std::string tokens_jsonl(const Scoreboard& s) {
  std::string out;
  for (const auto& t : s.tokens) {
    nlohmann::json j = {{"window", t.window}, {"pos", t.pos}, {"token", t.token}, {"kld", t.kld},
                        {"dp", t.dp}, {"same_top", t.same_top}, {"nll", t.nll}, {"nll_ref", t.nll_ref}};
    out += j.dump() + "\n";
  }
  return out;
}

std::vector<std::string> missed_gates(const GateConfig& g, const ScoreboardStats& st) {
  std::vector<std::string> out;
  char buf[256];
  if (g.max_kld && !(st.kld.value <= *g.max_kld)) {
    std::snprintf(buf, sizeof buf, "mean KLD %.6f > eval.gate.max_kld %.6g", st.kld.value, *g.max_kld);
    out.push_back(buf);
  }
  if (g.max_kld_p99 && !(st.kld_p99 <= *g.max_kld_p99)) {
    std::snprintf(buf, sizeof buf, "99%% KLD %.6f > eval.gate.max_kld_p99 %.6g", st.kld_p99, *g.max_kld_p99);
    out.push_back(buf);
  }
  if (g.min_same_top && !(st.same_top.value >= *g.min_same_top)) {
    std::snprintf(buf, sizeof buf, "same top %.3f%% < eval.gate.min_same_top %.6g (%.3f%%)", 100 * st.same_top.value,
                  *g.min_same_top, 100 * *g.min_same_top);
    out.push_back(buf);
  }
  if (g.max_rms_dp && !(st.rms_dp.value <= *g.max_rms_dp)) {
    std::snprintf(buf, sizeof buf, "RMS Δp %.3f%% > eval.gate.max_rms_dp %.6g (%.3f%%)", 100 * st.rms_dp.value,
                  *g.max_rms_dp, 100 * *g.max_rms_dp);
    out.push_back(buf);
  }
  if (g.max_ppl_ratio && !(st.ppl_ratio.value <= *g.max_ppl_ratio)) {
    std::snprintf(buf, sizeof buf, "PPL(model)/PPL(ref) %.6f > eval.gate.max_ppl_ratio %.6g", st.ppl_ratio.value,
                  *g.max_ppl_ratio);
    out.push_back(buf);
  }
  return out;
}

std::string report(const ScoreboardStats& st, const GateConfig& g) {
  std::string o;
  char buf[256];
  auto line = [&](const char* fmt, auto... v) {
    std::snprintf(buf, sizeof buf, fmt, v...);
    o += buf;
  };
  line("====== Perplexity statistics (%lld tokens; model = Q, reference = base) ======\n", (long long)st.tokens);
  line("Mean PPL(Q)                   : %10.6f ± %10.6f\n", st.ppl.value, st.ppl.unc);
  line("Mean PPL(base)                : %10.6f ± %10.6f\n", st.ppl_base.value, st.ppl_base.unc);
  line("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%\n", 100 * st.ppl_correlation);
  line("Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f\n", st.ln_ppl_ratio.value, st.ln_ppl_ratio.unc);
  line("Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f\n", st.ppl_ratio.value, st.ppl_ratio.unc);
  line("Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f\n", st.ppl_diff.value, st.ppl_diff.unc);
  line("\n====== KL divergence statistics ======\n");
  line("Mean    KLD: %10.6f ± %10.6f\n", st.kld.value, st.kld.unc);
  line("Maximum KLD: %10.6f\n", st.kld_max);
  line("99.9%%   KLD: %10.6f\n", st.kld_p999);
  line("99.0%%   KLD: %10.6f\n", st.kld_p99);
  line("95.0%%   KLD: %10.6f\n", st.kld_p95);
  line("90.0%%   KLD: %10.6f\n", st.kld_p90);
  line("Median  KLD: %10.6f\n", st.kld_median);
  line("10.0%%   KLD: %10.6f\n", st.kld_p10);
  line(" 5.0%%   KLD: %10.6f\n", st.kld_p05);
  line(" 1.0%%   KLD: %10.6f\n", st.kld_p01);
  line(" 0.1%%   KLD: %10.6f\n", st.kld_p001);
  line("Minimum KLD: %10.6f\n", st.kld_min);
  line("\n====== Token probability statistics ======\n");
  line("Mean    Δp: %6.3f ± %5.3f %%\n", 100 * st.dp.value, 100 * st.dp.unc);
  line("Maximum Δp: %6.3f%%\n", 100 * st.dp_max);
  line("99.9%%   Δp: %6.3f%%\n", 100 * st.dp_p999);
  line("99.0%%   Δp: %6.3f%%\n", 100 * st.dp_p99);
  line("95.0%%   Δp: %6.3f%%\n", 100 * st.dp_p95);
  line("90.0%%   Δp: %6.3f%%\n", 100 * st.dp_p90);
  line("75.0%%   Δp: %6.3f%%\n", 100 * st.dp_p75);
  line("Median  Δp: %6.3f%%\n", 100 * st.dp_median);
  line("25.0%%   Δp: %6.3f%%\n", 100 * st.dp_p25);
  line("10.0%%   Δp: %6.3f%%\n", 100 * st.dp_p10);
  line(" 5.0%%   Δp: %6.3f%%\n", 100 * st.dp_p05);
  line(" 1.0%%   Δp: %6.3f%%\n", 100 * st.dp_p01);
  line(" 0.1%%   Δp: %6.3f%%\n", 100 * st.dp_p001);
  line("Minimum Δp: %6.3f%%\n", 100 * st.dp_min);
  line("RMS Δp    : %6.3f ± %5.3f %%\n", 100 * st.rms_dp.value, 100 * st.rms_dp.unc);
  line("Same top p: %6.3f ± %5.3f %%\n", 100 * st.same_top.value, 100 * st.same_top.unc);
  if (g.any()) {
    line("\n====== Quality gate ======\n");
    auto row = [&](const char* name, double measured, double allowed, bool ok, const char* op) {
      line("%-22s %12.6f %s %-12.6g %s\n", name, measured, op, allowed, ok ? "pass" : "MISSED");
    };
    if (g.max_kld) row("max_kld (mean KLD)", st.kld.value, *g.max_kld, st.kld.value <= *g.max_kld, "<=");
    if (g.max_kld_p99) row("max_kld_p99", st.kld_p99, *g.max_kld_p99, st.kld_p99 <= *g.max_kld_p99, "<=");
    if (g.min_same_top)
      row("min_same_top", st.same_top.value, *g.min_same_top, st.same_top.value >= *g.min_same_top, ">=");
    if (g.max_rms_dp) row("max_rms_dp", st.rms_dp.value, *g.max_rms_dp, st.rms_dp.value <= *g.max_rms_dp, "<=");
    if (g.max_ppl_ratio)
      row("max_ppl_ratio", st.ppl_ratio.value, *g.max_ppl_ratio, st.ppl_ratio.value <= *g.max_ppl_ratio, "<=");
  }
  return o;
}

namespace {
std::string gate_message(const std::vector<std::string>& missed) {
  std::string m = std::to_string(missed.size()) + " quality gate" + (missed.size() == 1 ? "" : "s") + " missed:";
  for (auto& s : missed) m += "\n  " + s;
  return m;
}
}  // namespace

QualityGateError::QualityGateError(std::vector<std::string> m) : Error(gate_message(m)), missed(std::move(m)) {}

}  // namespace qf::trainer
