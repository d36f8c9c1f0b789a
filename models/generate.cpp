#include "models/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "core/error.h"

namespace qf::models {

SamplingConfig SamplingConfig::from_config(cfg::Reader& r) {
  SamplingConfig s;
  s.max_new_tokens = r.i64("max_new_tokens", s.max_new_tokens, 1, 1 << 20);
  s.temperature = r.f64("temperature", s.temperature, 0.0, 100.0);
  s.top_k = r.i64("top_k", s.top_k, 0, 1 << 24);
  s.top_p = r.f64("top_p", s.top_p, 1e-6, 1.0);
  s.seed = r.i64("seed", s.seed, 0, INT64_MAX);
  s.stop_at_eos = r.boolean("stop_at_eos", s.stop_at_eos);
  r.finish();
  return s;
}

at::Tensor filter_logits(at::Tensor logits, int64_t top_k, double top_p) {
  const double ninf = -std::numeric_limits<double>::infinity();
  if (top_k > 0 && top_k < logits.size(-1)) {
    auto kth = std::get<0>(at::topk(logits, top_k)).select(-1, top_k - 1);
    logits = logits.masked_fill(logits < kth, ninf);
  }
  if (top_p < 1.0) {
    auto [sorted, idx] = at::sort(logits, -1, /*descending=*/true);
    auto probs = at::softmax(sorted, -1);
    auto cum = probs.cumsum(-1);
    // Remove tokens whose preceding cumulative mass already reaches top_p (the top-1 always stays).
    auto remove = (cum - probs) >= top_p;
    auto mask = at::zeros_like(remove).scatter(-1, idx, remove);
    logits = logits.masked_fill(mask, ninf);
  }
  return logits;
}

Generation generate_ids(CausalLM& model, const std::vector<int64_t>& prompt, const SamplingConfig& s, int64_t eos_id,
                        const std::function<void(int64_t)>& on_token) {
  QF_CHECK(!prompt.empty(), "generate: empty prompt");
  at::NoGradGuard ng;
  bool was_training = model.is_training();
  model.eval();
  auto dev = model.parameters().front().device();
  const int64_t room = model.cfg.max_seq_len - (int64_t)prompt.size();
  QF_CHECK_INPUT(room > 0, "generate: the prompt of ", prompt.size(), " tokens fills the model's context of ",
                 model.cfg.max_seq_len, " positions (model.max_seq_len / max_position_embeddings); shorten it");
  const int64_t budget = std::min<int64_t>(s.max_new_tokens, room);
  auto cache = model.make_cache(1, (int64_t)prompt.size() + budget);
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(s.seed));
  auto ids = at::tensor(prompt, at::kLong).unsqueeze(0).to(dev);
  Generation g;
  g.stop = budget < s.max_new_tokens ? StopReason::Context : StopReason::MaxNewTokens;
  for (int64_t step = 0; step < budget; ++step) {
    auto logits = model.forward(ids, &cache).select(1, -1).squeeze(0).to(at::kFloat).cpu();
    int64_t next;
    if (s.temperature <= 0.0) {
      next = logits.argmax().item<int64_t>();
    } else {
      auto l = filter_logits(logits / s.temperature, s.top_k, s.top_p);
      next = at::multinomial(at::softmax(l, -1), 1, false, gen).item<int64_t>();
    }
    if (s.stop_at_eos && eos_id >= 0 && next == eos_id) {
      g.stop = StopReason::Eos;
      break;
    }
    g.ids.push_back(next);
    if (on_token) on_token(next);
    ids = at::full({1, 1}, next, at::TensorOptions().dtype(at::kLong).device(dev));
  }
  if (was_training) model.train();
  return g;
}

std::vector<int64_t> generate(CausalLM& model, const std::vector<int64_t>& prompt, const SamplingConfig& s,
                              int64_t eos_id) {
  return generate_ids(model, prompt, s, eos_id).ids;
}

}  // namespace qf::models
