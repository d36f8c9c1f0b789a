#include "quant/qat.h"

#include <ATen/ATen.h>
#include <fnmatch.h>

#include <cstdio>

#include "core/error.h"
#include "models/transformer.h"
#include "quant/ggml_blocks.h"

namespace qf::quant {

bool glob_match(const std::string& pattern, const std::string& name) {
  return ::fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
}

const QuantRule* rule_for(const QatConfig& q, const std::string& name) {
  for (auto& e : q.exclude)
    if (glob_match(e, name)) return nullptr;
  for (auto& r : q.rules)
    if (glob_match(r.pattern, name)) return &r;
  return nullptr;
}

QatConfig QatConfig::from_config(cfg::Reader& r) {
  QatConfig c;
  c.enabled = r.boolean("enabled", r.has("rules"));
  int i = 0;
  for (auto& rr : r.list("rules")) {
    QuantRule rule;
    rule.pattern = rr.str("pattern", "*");
    auto w = rr.child("weight");
    rule.weight = QuantSpec::from_config(w, false);
    if (rr.has("activation")) {
      auto a = rr.child("activation");
      rule.activation = QuantSpec::from_config(a, true);
      if (rule.activation->is_ggml()) a.fail("preset", "llama.cpp block formats are weight formats");
    }
    rr.finish();
    c.rules.push_back(rule);
    ++i;
  }
  if (r.has("embedding")) {
    auto e = r.child("embedding");
    c.embedding = QuantSpec::from_config(e, false);
  }
  c.exclude = r.strings("exclude", c.exclude);
  c.fake_quant_after_steps = r.i64("fake_quant_after_steps", 0, 0, 1LL << 40);
  auto o = r.child("observer");
  c.observer = ObserverConfig::from_config(o);
  c.convert_at_end = r.boolean("convert_at_end", c.convert_at_end);
  c.init.method = r.choice<PtqMethod>("init", PtqMethod::None, method_names());
  auto cr = r.child("calib");
  c.init.calib = CalibConfig::from_config(cr);
  auto gr = r.child("gptq");
  c.init.gptq = GptqConfig::from_config(gr);
  auto ar = r.child("awq");
  c.init.awq = AwqConfig::from_config(ar);
  c.init.imatrix = r.path("imatrix", "", true);
  if (!c.init.imatrix.empty()) {
    if (c.init.method != PtqMethod::Rtn)
      r.fail("imatrix", "importance-weighted rounding is llama-quantize's RTN; use it with init: rtn");
    for (const auto& rule : c.rules)
      if (!rule.weight.is_ggml())
        r.fail("imatrix", str("rule '", rule.pattern, "' quantizes to ", rule.weight.describe(),
                              "; an importance matrix weights llama.cpp block types only"));
  }
  if (c.init.method != PtqMethod::None && c.rules.empty()) r.fail("init", "PTQ initialisation needs quant.rules");
  if (c.enabled && c.rules.empty() && !c.embedding) r.fail("rules", "quantization is enabled but no rules select modules");
  r.finish();
  return c;
}

YAML::Node QatConfig::to_yaml() const {
  YAML::Node n;
  n["enabled"] = enabled;
  n["rules"] = YAML::Node(YAML::NodeType::Sequence);
  for (const auto& rule : rules) {
    YAML::Node r;
    r["pattern"] = rule.pattern;
    r["weight"] = rule.weight.to_yaml();
    if (rule.activation) r["activation"] = rule.activation->to_yaml();
    n["rules"].push_back(r);
  }
  if (embedding) n["embedding"] = embedding->to_yaml();
  n["exclude"] = YAML::Node(YAML::NodeType::Sequence);
  for (const auto& e : exclude) n["exclude"].push_back(e);
  n["fake_quant_after_steps"] = fake_quant_after_steps;
  n["observer"] = observer.to_yaml();
  n["convert_at_end"] = convert_at_end;
  n["init"] = method_name(init.method);
  n["calib"] = init.calib.to_yaml();
  n["gptq"] = init.gptq.to_yaml();
  n["awq"] = init.awq.to_yaml();
  if (!init.imatrix.empty()) n["imatrix"] = init.imatrix;
  return n;
}

// ---------------- FakeQuantLinear ----------------
FakeQuantLinear::FakeQuantLinear(const models::LinearBase& dense, const QuantRule& rule, const ObserverConfig& obs)
    : LinearBase(dense.in_features, dense.out_features) {
  auto& d = const_cast<models::LinearBase&>(dense);
  weight = register_parameter("weight", d.effective_weight());
  auto b = d.bias_or_undefined();
  if (b.defined()) bias = register_parameter("bias", b);
  weight_fq = register_module("weight_fake_quant", std::make_shared<FakeQuantizer>(rule.weight, obs, false));
  if (rule.activation)
    act_fq = register_module("activation_fake_quant", std::make_shared<FakeQuantizer>(*rule.activation, obs, true));
  weight_fq->initialize(weight);
}

at::Tensor FakeQuantLinear::forward_with_weight(const at::Tensor& x, const at::Tensor& w) {
  auto xin = act_fq ? act_fq->forward(x) : x;
  return at::linear(xin, weight_fq->forward(w), bias);
}

at::Tensor FakeQuantLinear::effective_weight() {
  at::NoGradGuard ng;
  return weight_fq->forward(weight);
}

void FakeQuantLinear::pretty_print(std::ostream& s) const {
  s << "FakeQuantLinear(in=" << in_features << ", out=" << out_features << ", weight=" << weight_fq->spec().describe();
  if (act_fq) s << ", activation=" << act_fq->spec().describe();
  s << ")";
}

// ---------------- QuantizedLinear ----------------
at::ScalarType scale_type(const QuantSpec& s) {
  return s.scale_dtype == ScaleDType::F16 ? at::kHalf : s.scale_dtype == ScaleDType::BF16 ? at::kBFloat16 : at::kFloat;
}

at::Tensor pack_codes(const at::Tensor& q, const QuantSpec& s) {
  auto u = (q - s.qmin()).to(at::kByte);
  if (s.bits > 4) return u;
  auto flat = u.reshape({u.size(0), -1, 2});
  return (flat.select(-1, 0) | flat.select(-1, 1).__lshift__(4)).contiguous();
}
namespace {
at::Tensor unpack_codes(const at::Tensor& p, const QuantSpec& s, int64_t cols) {
  at::Tensor u = p;
  if (s.bits <= 4) u = at::stack({p.bitwise_and(0x0F), p.__rshift__(4)}, -1).reshape({p.size(0), cols});
  return u.to(at::kInt) + s.qmin();
}
int64_t packed_cols(int64_t in, const QuantSpec& s) {
  if (s.is_ggml()) return in / ggml::block_size(s.rule) * ggml::type_size(s.rule);
  if (s.kind != Kind::Int || s.bits > 4) return in;
  return (in + 1) / 2;
}
int64_t n_blocks(int64_t in, const QuantSpec& s) { return in / s.block(in); }
}  // namespace

// ---- packed storage shared by QuantizedLinear and QuantizedEmbedding ----
PackedStorage register_packed(torch::nn::Module& m, int64_t rows, int64_t cols, const QuantSpec& spec) {
  QF_CHECK(spec.kind != Kind::Nf4, "convert: NF4 weights are converted by peft/ (QLoRA), not quant::convert");
  QF_CHECK(spec.granularity != Granularity::PerTensor || spec.is_ggml(),
           "convert: per-tensor weight quantization cannot be packed yet; use per-channel or per-group");
  QF_CHECK(cols % 2 == 0 || spec.bits > 4 || spec.kind != Kind::Int, "convert: int4 packing needs an even width, got ", cols);
  PackedStorage p;
  p.qweight = m.register_buffer("qweight", at::zeros({rows, packed_cols(cols, spec)}, at::kByte));
  if (!spec.is_ggml()) {
    p.scales = m.register_buffer("scales", at::zeros({rows, n_blocks(cols, spec)}, scale_type(spec)));
    p.zeros = m.register_buffer("zeros", at::zeros({rows, n_blocks(cols, spec)}, at::kFloat));
  }
  return p;
}

void pack_weight(PackedStorage& p, const at::Tensor& weight, FakeQuantizer& fq) {
  const auto& spec = fq.spec();
  at::NoGradGuard ng;
  auto w = weight.detach().to(at::kFloat);
  const int64_t rows = w.size(0), cols = w.size(1);
  if (spec.is_ggml()) {
    p.qweight.copy_(ggml::quantize(w, spec.rule));
  } else if (spec.kind != Kind::Int) {
    // FP8: the same ops as fake_quant_fp8 (torchao's float8 fake quantizer), codes kept as fp8 bytes.
    auto [codes, scale] = quantize_fp8(w, spec);
    p.qweight.copy_(codes.view(at::kByte).reshape({rows, cols}));
    p.scales.copy_(scale.reshape({rows, -1}).to(scale_type(spec)));
  } else {
    auto qp = fq.qparams_for(w);
    at::Tensor codes;
    if (fq.scale.defined()) {
      // Learned (LSQ/LSQ+): the same arithmetic as lsq_fake_quant, offsets stored as floats.
      auto s = qp.scale.unsqueeze(-1);
      auto b = fq.beta.defined() ? fq.beta.detach().unsqueeze(-1) : at::zeros_like(s);
      auto v = (w.reshape({qp.scale.size(0), qp.scale.size(1), -1}) - b) / s;
      codes = at::clamp(at::round(v), (double)spec.qmin(), (double)spec.qmax()).to(at::kInt).reshape(w.sizes());
      p.zeros.copy_(b.squeeze(-1));
    } else {
      codes = quantize_affine(w, qp, spec);
      p.zeros.copy_(qp.zero_point);
    }
    p.qweight.copy_(pack_codes(codes, spec));
    p.scales.copy_(qp.scale.to(scale_type(spec)));
  }
}

at::Tensor unpack_weight(const PackedStorage& p, const QuantSpec& spec, int64_t rows, int64_t cols) {
  if (spec.kind == Kind::Fp8E4M3 || spec.kind == Kind::Fp8E5M2) {
    auto f8 = spec.kind == Kind::Fp8E4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
    auto s = p.scales.to(at::kFloat);
    auto t = p.qweight.view(f8).to(at::kFloat).reshape({s.size(0), s.size(1), -1});
    return (t * s.unsqueeze(-1)).reshape({rows, cols});
  }
  if (spec.is_ggml()) {
    return ggml::dequantize(p.qweight, spec.rule, cols);  // on qweight's device (CUDA kernel or fallback)
  }
  auto codes = unpack_codes(p.qweight, spec, cols);
  auto s = p.scales.to(at::kFloat);
  if (p.g_idx.defined()) {
    // Column c uses group g_idx[c]: the same formulas, one element per (scale, zero point).
    QF_CHECK(spec.learn == Learn::None, "g_idx: learned scales are stored in contiguous groups");
    auto g = p.g_idx.to(at::kLong);
    auto one = spec;
    one.granularity = Granularity::PerChannel;
    one.group_size = 0;
    QParams qp{s.index_select(1, g).reshape({-1, 1}), p.zeros.index_select(1, g).reshape({-1, 1})};
    return dequantize_affine(codes.reshape({-1, 1}), qp, one, at::kFloat).reshape({rows, cols});
  }
  if (spec.learn != Learn::None) {
    auto v = codes.to(at::kFloat).reshape({s.size(0), s.size(1), -1});
    return (v * s.unsqueeze(-1) + p.zeros.unsqueeze(-1)).reshape({rows, cols});
  }
  QParams qp{s, p.zeros};
  return dequantize_affine(codes, qp, spec, at::kFloat);
}

int64_t packed_storage_bytes(const PackedStorage& p, const QuantSpec& spec) {
  int64_t b = p.qweight.numel();
  if (p.scales.defined()) b += p.scales.numel() * p.scales.element_size();
  // Asymmetric weights keep a float zero point (torchao's FLOAT domain) or a float LSQ+ offset,
  // stored at the scale's precision; an integer zero point (Rule::IntZeroPoint) costs `bits` bits,
  // as AutoAWQ's / GPTQ's packed qzeros hold it.
  if (p.zeros.defined() && spec.int_zero_point())
    b += (p.zeros.numel() * spec.bits + 7) / 8;
  else if (p.zeros.defined() && (!spec.symmetric || spec.learn == Learn::LsqPlus))
    b += p.zeros.numel() * p.scales.element_size();
  return b;
}

// ---------------- QuantizedLinear ----------------
QuantizedLinear::QuantizedLinear(int64_t in, int64_t out, bool has_bias, QuantSpec wspec, std::optional<QuantSpec> aspec)
    : LinearBase(in, out), wspec_(std::move(wspec)), aspec_(std::move(aspec)) {
  auto p = register_packed(*this, out, in, wspec_);
  qweight = p.qweight, scales = p.scales, zeros = p.zeros;
  if (has_bias) bias = register_buffer("bias", at::zeros({out}));
}

at::Tensor QuantizedLinear::int_codes() const {
  QF_CHECK(wspec_.kind == Kind::Int && !wspec_.is_ggml(), "int_codes: ", wspec_.describe(), " has no affine integer codes");
  return unpack_codes(qweight.cpu(), wspec_, in_features);
}

std::shared_ptr<QuantizedLinear> QuantizedLinear::from_fake_quant(FakeQuantLinear& f, const at::Tensor& weight) {
  std::optional<QuantSpec> aspec;
  if (f.act_fq) aspec = f.act_fq->spec();
  auto q = std::make_shared<QuantizedLinear>(f.in_features, f.out_features, f.bias.defined(), f.weight_fq->spec(), aspec);
  PackedStorage p{q->qweight, q->scales, q->zeros};
  pack_weight(p, weight.defined() ? weight : f.weight, *f.weight_fq);
  at::NoGradGuard ng;
  if (f.bias.defined()) q->bias.copy_(f.bias.detach());
  if (f.act_fq) q->act_fq_ = q->register_module("activation_fake_quant", f.act_fq);
  return q;
}

at::Tensor QuantizedLinear::effective_weight() {
  return unpack_weight(PackedStorage{qweight, scales, zeros, g_idx}, wspec_, out_features, in_features);
}

void QuantizedLinear::set_g_idx(const at::Tensor& g) {
  QF_CHECK(!wspec_.is_ggml() && wspec_.kind == Kind::Int && wspec_.granularity == Granularity::PerGroup,
           "g_idx: only affine per-group weights have column groups, not ", wspec_.describe());
  QF_CHECK(g.dim() == 1 && g.size(0) == in_features, "g_idx: expected [", in_features, "], got ", g.sizes());
  if (!g_idx.defined()) g_idx = register_buffer("g_idx", at::zeros({in_features}, at::kInt));
  g_idx.copy_(g.to(at::kInt));
}

at::Tensor QuantizedLinear::forward(const at::Tensor& x) {
  at::Tensor xin = x;
  if (act_fq_) xin = act_fq_->forward(x);
  return at::linear(xin, effective_weight().to(xin.scalar_type()), bias.defined() ? bias.to(xin.scalar_type()) : bias);
}

int64_t QuantizedLinear::packed_bytes() const {
  return packed_storage_bytes(PackedStorage{qweight, scales, zeros}, wspec_) + (bias.defined() ? bias.numel() * 4 : 0) +
         (g_idx.defined() ? g_idx.numel() * 4 : 0);
}

// ---------------- embeddings ----------------
FakeQuantEmbedding::FakeQuantEmbedding(models::EmbeddingBase& dense, const QuantSpec& spec, const ObserverConfig& obs)
    : EmbeddingBase(dense.num_embeddings, dense.embedding_dim) {
  weight = register_parameter("weight", dense.table());
  weight_fq = register_module("weight_fake_quant", std::make_shared<FakeQuantizer>(spec, obs, false));
  weight_fq->initialize(weight);
}

at::Tensor FakeQuantEmbedding::table() { return weight_fq->forward(weight); }

QuantizedEmbedding::QuantizedEmbedding(int64_t num, int64_t dim, QuantSpec spec)
    : EmbeddingBase(num, dim), spec_(std::move(spec)) {
  auto p = register_packed(*this, num, dim, spec_);
  qweight = p.qweight, scales = p.scales, zeros = p.zeros;
}

std::shared_ptr<QuantizedEmbedding> QuantizedEmbedding::from_fake_quant(FakeQuantEmbedding& f) {
  auto q = std::make_shared<QuantizedEmbedding>(f.num_embeddings, f.embedding_dim, f.weight_fq->spec());
  PackedStorage p{q->qweight, q->scales, q->zeros};
  pack_weight(p, f.weight, *f.weight_fq);
  return q;
}

at::Tensor QuantizedEmbedding::table() { return unpack_weight(PackedStorage{qweight, scales, zeros}, spec_, num_embeddings, embedding_dim); }

int64_t QuantizedEmbedding::packed_bytes() const { return packed_storage_bytes(PackedStorage{qweight, scales, zeros}, spec_); }

void QuantizedLinear::pretty_print(std::ostream& s) const {
  s << "QuantizedLinear(in=" << in_features << ", out=" << out_features << ", " << wspec_.describe() << ", "
    << packed_bytes() << " bytes)";
}

// ---------------- prepare / convert ----------------
PrepareReport prepare(torch::nn::Module& model, const QatConfig& cfg) {
  PrepareReport rep;
  auto slots = models::linear_slots(model);
  std::vector<std::string> problems;
  std::vector<int> hits(cfg.rules.size(), 0);
  char line[256];
  std::snprintf(line, sizeof line, "%-36s %-12s %-38s %s", "module", "shape", "weight", "activation");
  rep.rows.push_back(line);
  for (auto& ns : slots) {
    const QuantRule* rp = rule_for(cfg, ns.name);
    if (!rp) continue;
    const auto& rule = *rp;
    const size_t i = static_cast<size_t>(rp - cfg.rules.data());
    ++hits[i];
    auto cur = ns.slot->get();
    const int64_t in = cur->in_features;
    const int64_t blk = rule.weight.block(in);  // ggml presets are per-group with their block size
    if (blk > 0 && in % blk != 0) {
      problems.push_back(str("quant.rules[", i, "]: ", rule.weight.granularity == Granularity::PerGroup && !rule.weight.is_ggml()
                                                         ? "group size "
                                                         : "block size ",
                             blk, " (", rule.weight.describe(), ") does not divide the input width ", in, " of ", ns.name));
      continue;
    }
    if (!problems.empty()) continue;  // every problem is reported; nothing more is swapped
    auto fq = std::make_shared<FakeQuantLinear>(*cur, rule, cfg.observer);
    ns.slot->replace(fq);
    ++rep.n_swapped;
    std::snprintf(line, sizeof line, "%-36s %-12s %-38s %s", ns.name.c_str(),
                  (std::to_string(cur->out_features) + "x" + std::to_string(in)).c_str(), rule.weight.describe().c_str(),
                  rule.activation ? rule.activation->describe().c_str() : "-");
    rep.rows.push_back(line);
  }
  if (cfg.embedding) {
    auto* lm = dynamic_cast<models::CausalLM*>(&model);
    QF_CHECK(lm, "quant.embedding: the model has no token embedding");
    auto& slot = lm->token_embedding();
    const auto& spec = *cfg.embedding;
    const int64_t dim = slot.get()->embedding_dim;
    const int64_t blk = spec.block(dim);
    if (blk > 0 && dim % blk != 0) {
      problems.push_back(str("quant.embedding: block size ", blk, " (", spec.describe(), ") does not divide the embedding width ",
                             dim, " of ", lm->token_embedding_name()));
    } else {
      slot.replace(std::make_shared<FakeQuantEmbedding>(*slot.get(), spec, cfg.observer));
      ++rep.n_swapped;
      std::snprintf(line, sizeof line, "%-36s %-12s %-38s %s", lm->token_embedding_name().c_str(),
                    (std::to_string(slot.get()->num_embeddings) + "x" + std::to_string(dim)).c_str(), spec.describe().c_str(),
                    lm->cfg.tie_embeddings ? "(also the tied lm_head)" : "-");
      rep.rows.push_back(line);
    }
  }
  for (size_t i = 0; i < cfg.rules.size(); ++i) {
    if (hits[i] == 0) {
      std::string some;
      for (size_t k = 0; k < slots.size() && k < 4; ++k) some += (k ? ", " : "") + slots[k].name;
      problems.push_back(str("quant.rules[", i, "].pattern: '", cfg.rules[i].pattern,
                             "' matches no linear module (after excludes); modules look like ", some, ", ..."));
    }
  }
  if (!problems.empty()) throw ConfigError(problems);
  return rep;
}

int64_t convert(torch::nn::Module& model) {
  int64_t n = 0;
  if (auto* lm = dynamic_cast<models::CausalLM*>(&model)) {
    auto& slot = lm->token_embedding();
    if (auto f = std::dynamic_pointer_cast<FakeQuantEmbedding>(slot.get())) {
      slot.replace(QuantizedEmbedding::from_fake_quant(*f));
      ++n;
    }
  }
  for (auto& ns : models::linear_slots(model)) {
    if (auto f = std::dynamic_pointer_cast<FakeQuantLinear>(ns.slot->get())) {
      ns.slot->replace(QuantizedLinear::from_fake_quant(*f));
      ++n;
    }
  }
  return n;
}

void set_qat_step(torch::nn::Module& model, int64_t step, int64_t enable_after) {
  for (auto& m : model.modules())
    if (auto* fq = dynamic_cast<FakeQuantizer*>(m.get())) fq->set_step(step, enable_after);
}

int64_t model_bytes(torch::nn::Module& model) {
  int64_t total = 0;
  std::set<const void*> counted;
  for (auto& m : model.modules(/*include_self=*/true)) {
    if (auto* q = dynamic_cast<QuantizedLinear*>(m.get())) {
      total += q->packed_bytes();
      for (auto& b : q->buffers()) counted.insert(b.unsafeGetTensorImpl());
    }
    if (auto* e = dynamic_cast<QuantizedEmbedding*>(m.get())) {
      total += e->packed_bytes();
      for (auto& b : e->buffers()) counted.insert(b.unsafeGetTensorImpl());
    }
  }
  for (auto& p : model.parameters()) {
    if (counted.insert(p.unsafeGetTensorImpl()).second) total += p.numel() * p.element_size();
  }
  for (auto& b : model.buffers()) {
    if (counted.insert(b.unsafeGetTensorImpl()).second) total += b.numel() * b.element_size();
  }
  return total;
}

}  // namespace qf::quant
