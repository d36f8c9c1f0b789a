// The deployed-quality gate: a model compared token by token with a reference model (typically the
// float model it was quantized or converted from) on the same windows, with the statistics of
// llama.cpp's perplexity scoreboard (`llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp),
// and the `eval.gate` thresholds a recipe sets on them.
// Invariant: every statistic is llama.cpp's definition over the labelled tokens given (per token:
// KL(p_ref || p_model) summed over the entries with ln p_ref > -16, argmax equality with the first
// maximum winning, p_model(true) - p_ref(true); aggregates and uncertainties as its
// mean_and_uncertainty / covariance / percentile), computed in fp64 from fp32 logits, one chunk of
// rows at a time (never all logits of a window set at once).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::trainer {

// `eval.gate:` thresholds (unset = not checked) and the reference model they are measured against.
// Fractions, not percent: min_same_top 0.9 = 90%, max_rms_dp 0.05 = 5%.
struct GateConfig {
  std::optional<double> max_kld;        // mean KL divergence (nats/token)
  std::optional<double> max_kld_p99;    // 99th percentile of the per-token KL divergence
  std::optional<double> min_same_top;   // fraction of tokens whose argmax equals the reference's
  std::optional<double> max_rms_dp;     // RMS of p_model(true) - p_ref(true)
  std::optional<double> max_ppl_ratio;  // PPL(model) / PPL(ref)
  std::string against;                  // reference: run dir, checkpoint dir or Hugging Face dir ("" = none)
  bool any() const { return max_kld || max_kld_p99 || min_same_top || max_rms_dp || max_ppl_ratio; }
  static GateConfig from_config(cfg::Reader& r);
};

// `eval:` section of a recipe.
struct EvalConfig {
  GateConfig gate;
  static EvalConfig from_config(cfg::Reader& r);
};

// Running sums of llama.cpp's kl_divergence_result plus the per-token values its medians and
// percentiles need (two floats per token).
// One scored token (what `eval --against --samples-out` writes): window index in the evaluated set,
// position in it (the logits row), the true next token, and its per-token statistics.
struct TokenScore {
  int64_t window = 0, pos = 0, token = 0;
  double kld = 0, dp = 0, nll = 0, nll_ref = 0;
  bool same_top = false;
};

struct Scoreboard {
  double sum_nll = 0, sum_nll2 = 0, sum_nll_base = 0, sum_nll_base2 = 0, sum_nll_nll_base = 0;
  double sum_kld = 0, sum_kld2 = 0, sum_p_diff = 0, sum_p_diff2 = 0, sum_p_diff4 = 0;
  double max_p_diff = 0;
  int64_t n_same_top = 0, count = 0;
  std::vector<float> kld_values, p_diff_values;
  bool keep_tokens = false;        // also record every token's TokenScore (tokens)
  std::vector<TokenScore> tokens;
  // Adds rows: ref and model logits [N, V] (any float dtype; taken to fp64), targets [N] (the true
  // next tokens); `where` [N, 2] (window, position), recorded with keep_tokens.
  void add(const at::Tensor& ref_logits, const at::Tensor& model_logits, const at::Tensor& targets,
           const at::Tensor& where = {});
};

struct MeanUnc {
  double value = 0, unc = 0;
};

// The scoreboard's statistics, as llama.cpp prints them (fractions; the table shows percent).
struct ScoreboardStats {
  int64_t tokens = 0;
  MeanUnc ppl, ppl_base, ln_ppl_ratio, ppl_ratio, ppl_diff;
  double ppl_correlation = 0;  // Cor(ln PPL(Q), ln PPL(base))
  MeanUnc kld;
  double kld_max = 0, kld_p999 = 0, kld_p99 = 0, kld_p95 = 0, kld_p90 = 0, kld_median = 0, kld_p10 = 0, kld_p05 = 0,
         kld_p01 = 0, kld_p001 = 0, kld_min = 0;
  MeanUnc dp;  // mean Δp
  double dp_max = 0, dp_p999 = 0, dp_p99 = 0, dp_p95 = 0, dp_p90 = 0, dp_p75 = 0, dp_median = 0, dp_p25 = 0,
         dp_p10 = 0, dp_p05 = 0, dp_p01 = 0, dp_p001 = 0, dp_min = 0;
  MeanUnc rms_dp, same_top;
  nlohmann::json to_json() const;
};
ScoreboardStats statistics(const Scoreboard& s);  // InputError when no token was scored

// Both models over the packed set's labelled tokens (batches as evaluate_model takes them; forward
// under bf16 autocast when asked, logits compared in fp64), both on `dev`.
Scoreboard compare_models(models::CausalLM& ref, models::CausalLM& model, const data::PackedSet& set, int64_t batch_size,
                          int64_t max_batches, at::Device dev, bool bf16, bool keep_tokens = false);
// The TokenScores as JSONL, one object per token: window, pos, token, kld, dp, same_top, nll, nll_ref.
std::string tokens_jsonl(const Scoreboard& s);

// Refuses (InputError naming both) two tokenizers that do not share one vocabulary: the same size,
// BOS/EOS ids and the same entry for every id.
void check_same_vocabulary(const data::Tokenizer& model_tok, const data::Tokenizer& ref_tok, const std::string& model_name,
                           const std::string& ref_name);

// The thresholds `g` sets that `st` misses, one line each ("mean KLD 0.0812 > max_kld 0.05").
std::vector<std::string> missed_gates(const GateConfig& g, const ScoreboardStats& st);
// The readable table (perplexity, KL divergence, token probability sections), then, when gates are
// set, one line per gate (measured vs allowed, pass/MISSED).
std::string report(const ScoreboardStats& st, const GateConfig& g);

// Thrown (after everything else is written and printed) when a gate is missed; apps/ maps it to
// exit code 4.
struct QualityGateError : Error {
  explicit QualityGateError(std::vector<std::string> missed);
  std::vector<std::string> missed;
};
inline constexpr int kExitQualityGate = 4;

}  // namespace qf::trainer
