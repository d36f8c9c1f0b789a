#include "peft/lora.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>
#include <cstring>
#include <map>
#include <ostream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/strings.h"
#include "models/packed_linear.h"
#include "models/transformer.h"
#include "quant/block_linear.h"
#include "quant/ggml_more.h"
#include "quant/ggml_types.h"
#include "quant/int8_lt.h"
#include "quant/nf4.h"
#include "quant/qat.h"

namespace qf::peft {

const char* base_format_name(BaseFormat f) {
  switch (f) {
    case BaseFormat::Fp32: return "fp32";
    case BaseFormat::Bf16: return "bf16";
    case BaseFormat::Nf4: return "nf4";
    case BaseFormat::Int8: return "int8";
    case BaseFormat::Blocks: return "llama.cpp blocks";
    case BaseFormat::Packed: return "packed";
  }
  return "?";
}

std::string base_name(const LoraConfig& cfg) {
  if (cfg.base != BaseFormat::Blocks) return base_format_name(cfg.base);
  if (cfg.block_mix == kGgufTypes) return kGgufTypes;
  return cfg.block_mix.empty() ? std::string(quant::ggml::traits(cfg.block_rule).name) : "mix " + cfg.block_mix;
}

double LoraConfig::scaling() const { return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }

LoraConfig LoraConfig::from_config(cfg::Reader& rd) {
  LoraConfig c;
  c.enabled = rd.boolean("enabled", rd.has("r") || rd.has("target_modules"));
  const std::string method = rd.str("method", "lora");
  if (method != "lora") rd.fail("method", "'" + method + "' is not supported; expected lora");
  c.r = rd.i64("r", c.r, 1, 1 << 16);
  c.alpha = rd.f64("alpha", c.alpha, 1e-6, 1e9);
  c.dropout = rd.f64("dropout", c.dropout, 0.0, 0.999);
  c.rslora = rd.boolean("rslora", c.rslora);
  c.target_modules = rd.strings("target_modules", c.target_modules);
  if (c.target_modules.empty()) rd.fail("target_modules", "must name at least one module (or all-linear)");
  c.modules_to_save = rd.strings("modules_to_save", {});
  {
    std::vector<std::pair<std::string, BaseFormat>> bases{
        {"fp32", BaseFormat::Fp32}, {"bf16", BaseFormat::Bf16}, {"nf4", BaseFormat::Nf4}, {"int8", BaseFormat::Int8}, {"packed", BaseFormat::Packed}};
    for (const auto& t : quant::ggml::type_table())  // every llama.cpp block type: the served base's blocks
      if (t.block > 1) bases.emplace_back(t.name, BaseFormat::Blocks);
    // mix: each linear the type llama-quantize's mixture peft.mixture gives it (a key of its own: q2_k,
    // q4_0, iq4_xs ... name both a block type and a mixture, as `export --quant` spells them, that bumps
    // some tensors to other types); gguf: each linear the type model.from's GGUF file stores it in.
    bases.emplace_back("mix", BaseFormat::Blocks);
    bases.emplace_back(kGgufTypes, BaseFormat::Blocks);
    c.base = rd.choice<BaseFormat>("base", c.base, bases);
    const std::string v = c.base == BaseFormat::Blocks ? rd.resolved()["base"].Scalar() : "";
    const std::string mixture = rd.str("mixture", "");
    if (v == "mix") {
      if (mixture.empty()) rd.fail("mixture", "peft.base: mix needs a llama-quantize mixture name here (q4_k_m, ...)");
      else if (!quant::is_mix(mixture)) {
        std::string all;
        for (const auto& n : quant::mix_names()) all += (all.empty() ? "" : ", ") + n;
        rd.fail("mixture", "'" + mixture + "' is not a llama-quantize mixture; expected one of " + all);
      }
      c.block_mix = mixture;
    } else {
      if (!mixture.empty()) rd.fail("mixture", "is read only with peft.base: mix (got peft.base " + (v.empty() ? base_format_name(c.base) : v) + ")");
      if (v == kGgufTypes) c.block_mix = v;
      else if (!v.empty()) c.block_rule = quant::ggml::traits_by_name(v)->rule;
    }
  }
  {
    auto n = rd.child("nf4");
    c.nf4_blocksize = n.i64("blocksize", c.nf4_blocksize, 1, 1 << 20);
    try {
      quant::check_nf4_blocksize(c.nf4_blocksize, n.key_path("blocksize"));
    } catch (const ConfigError&) {
      n.fail("blocksize", std::to_string(c.nf4_blocksize) + " is not a power of two in [32, 4096]");
    }
    c.nf4_double_quant = n.boolean("double_quant", c.nf4_double_quant);
    n.finish();
  }
  c.int8_threshold = rd.f64("int8_threshold", c.int8_threshold, 0.0, 65504.0);
  c.exact_merge = rd.boolean("exact_merge", c.exact_merge);
  if (c.exact_merge && c.dropout > 0)
    rd.fail("exact_merge", "needs dropout 0 (the fake quantizer sees W + s*BA; dropout on the LoRA input cannot be "
                           "expressed in one merged weight)");
  c.init_adapter = rd.path("init_adapter", "", true);
  c.save_adapter = rd.boolean("save_adapter", c.save_adapter);
  c.merge_at_end = rd.boolean("merge_at_end", c.merge_at_end);
  rd.finish();
  return c;
}

// ---------------- LoraLinear ----------------
LoraFactor::LoraFactor(int64_t out, int64_t in) { weight = register_parameter("weight", at::zeros({out, in})); }

LoraLinear::LoraLinear(std::shared_ptr<models::LinearBase> b, int64_t rank, double s, double p, bool ex)
    : LinearBase(b->in_features, b->out_features), r(rank), scaling(s), dropout(p), exact(ex) {
  QF_CHECK(!exact || std::dynamic_pointer_cast<quant::FakeQuantLinear>(b) || std::dynamic_pointer_cast<quant::BlockLinear>(b),
           "LoRA exact merge needs a fake-quant or llama.cpp-blocks base");
  base = register_module("base_layer", std::move(b));
  lora_A = register_module("lora_A", std::make_shared<LoraFactor>(r, in_features));
  lora_B = register_module("lora_B", std::make_shared<LoraFactor>(out_features, r));
  reset_parameters();
}

void LoraLinear::reset_parameters() {
  at::NoGradGuard ng;
  torch::nn::init::kaiming_uniform_(lora_A->weight, std::sqrt(5.0));
  lora_B->weight.zero_();
}

at::Tensor LoraLinear::delta() const { return at::matmul(lora_B->weight, lora_A->weight) * scaling; }

at::Tensor LoraLinear::forward(const at::Tensor& x) {
  if (exact) {
    if (auto* blk = dynamic_cast<quant::BlockLinear*>(base.get())) return blk->forward_merged(x, delta());
    auto* fq = static_cast<quant::FakeQuantLinear*>(base.get());
    return fq->forward_with_weight(x, fq->weight + delta());
  }
  auto h = dropout > 0 && is_training() ? at::dropout(x, dropout, true) : x;
  auto a = lora_A->weight.to(x.scalar_type());
  // s folded into B ([out, r], tiny) rather than applied to the [tokens, out] activation, and the
  // low-rank product added into the base output in place: two fewer passes over the activations.
  auto b = (lora_B->weight * scaling).to(x.scalar_type());
  auto y = base->forward(x);
  return y.add_(at::linear(at::linear(h, a), b));
}

at::Tensor LoraLinear::effective_weight() {
  at::NoGradGuard ng;
  if (exact) {
    if (auto* blk = dynamic_cast<quant::BlockLinear*>(base.get())) return blk->merged_fake_quant(delta());
    auto* fq = static_cast<quant::FakeQuantLinear*>(base.get());
    return fq->weight_fq->forward(fq->weight + delta());
  }
  return base->effective_weight().to(at::kFloat) + delta();
}

at::Tensor LoraLinear::merged_weight() {
  at::NoGradGuard ng;
  if (auto* fq = dynamic_cast<quant::FakeQuantLinear*>(base.get())) return (fq->weight + delta()).to(fq->weight.scalar_type());
  return base->effective_weight().to(at::kFloat) + delta();
}

std::shared_ptr<models::LinearBase> LoraLinear::merged() {
  at::NoGradGuard ng;
  if (auto fq = std::dynamic_pointer_cast<quant::FakeQuantLinear>(base)) {
    // The quantizer (and its observer / learned state) is kept: convert() then packs exactly what
    // the exact-merge forward fake-quantized.
    fq->weight.copy_(merged_weight());
    return fq;
  }
  auto d = std::make_shared<models::DenseLinear>(in_features, out_features, base->bias_or_undefined().defined());
  // Exact merge on llama.cpp blocks: the trained layer's weight, fq(W + s*BA) (re-quantizing the merge
  // into the base's type gives those values: export/layer_view writes the blocks).
  d->weight.copy_(exact ? effective_weight() : merged_weight());
  if (d->bias.defined()) d->bias.copy_(base->bias_or_undefined());
  return d;
}

void LoraLinear::pretty_print(std::ostream& s) const {
  s << "LoraLinear(r=" << r << ", scaling=" << scaling << (exact ? ", exact_merge" : "")
    << (dropout > 0 ? ", dropout=" + std::to_string(dropout) : std::string()) << ")";
}

// ---------------- apply / merge ----------------
bool target_matches(const std::string& target, const std::string& name, const std::string& output_layer) {
  if (target == "all-linear") return name != output_layer;
  if (target.find_first_of("*?[") != std::string::npos) return quant::glob_match(target, name);
  if (name == target) return true;
  return ends_with(name, "." + target);  // whole trailing components only
}

std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> lora_layers(torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> out;
  for (auto& ns : models::linear_slots(model))
    if (auto l = std::dynamic_pointer_cast<LoraLinear>(ns.slot->get())) out.emplace_back(ns.name, l);
  return out;
}

void count_parameters(torch::nn::Module& model, ApplyReport& rep) {
  rep.trainable = rep.total = rep.trainable_bytes = 0;
  std::set<const void*> seen;
  for (auto& p : model.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    rep.total += p.numel();
    if (p.requires_grad()) {
      rep.trainable += p.numel();
      rep.trainable_bytes += p.numel() * p.element_size();
    }
  }
  // Compactly stored frozen weights count as parameters too (PEFT counts a 4-bit weight's elements).
  for (auto& m : model.modules(true))
    if (auto* f = dynamic_cast<models::FrozenLinear*>(m.get())) rep.total += f->in_features * f->out_features;
  rep.weight_bytes = quant::model_bytes(model);
}

std::string ApplyReport::summary() const {
  std::ostringstream s;
  s.precision(4);
  s << "trainable params: " << trainable << " || all params: " << total
    << " || trainable%: " << (total ? 100.0 * trainable / total : 0.0) << " || trainable bytes: " << trainable_bytes
    << " || weight bytes as stored: " << weight_bytes;
  if (base_weights > 0)  // the frozen base's cost per weight, against bf16 (16 bits) and NF4 with double quant (~4.13)
    s << " || frozen base: " << base_bytes << " bytes for " << base_weights << " weights ("
      << 8.0 * base_bytes / base_weights << " bits/weight incl. scales and bias; bf16 16, nf4 4.13)";
  return s.str();
}

namespace {

bool restores_base(const LoraConfig& cfg, const std::string& name, const std::string& output_layer);

// Every check apply_lora makes, on the model as it is (nothing changes); throws ConfigError with all
// problems. Returns, per linear slot, whether it gets an adapter.
std::vector<bool> validate(const std::vector<models::NamedSlot>& slots, torch::nn::Module& model, const LoraConfig& cfg,
                           const std::string& output_layer) {
  std::vector<std::string> problems;
  std::map<std::string, int> hits;
  std::vector<bool> wrap(slots.size(), false);
  for (size_t i = 0; i < slots.size(); ++i) {
    for (auto& t : cfg.target_modules)
      if (target_matches(t, slots[i].name, output_layer)) {
        wrap[i] = true;
        ++hits[t];
      }
    if (!wrap[i]) continue;
    auto& base = *slots[i].slot->get();
    const int64_t width = std::min(base.in_features, base.out_features);
    if (cfg.r > width)
      problems.push_back(str("peft.r: ", cfg.r, " is larger than layer ", slots[i].name, "'s width (in ",
                             base.in_features, ", out ", base.out_features, "); use r <= ", width));
    const bool fq = dynamic_cast<quant::FakeQuantLinear*>(&base) != nullptr;
    if (fq && cfg.base != BaseFormat::Fp32)
      problems.push_back(str("peft.base: ", base_format_name(cfg.base), " cannot store layer ", slots[i].name,
                             ", which fake-quantizes (quant rules); use peft.base: fp32 for QAT + LoRA"));
  }
  if (cfg.base == BaseFormat::Blocks && cfg.block_mix.empty()) {  // llama.cpp blocks hold whole rows of blocks
    const auto& t = quant::ggml::traits(cfg.block_rule);
    for (auto& ns : slots) {
      const int64_t in = ns.slot->get()->in_features;
      if (restores_base(cfg, ns.name, output_layer) && in % t.block != 0)
        problems.push_back(str("peft.base: ", t.name, " stores rows in ", t.block, "-value blocks, but layer ", ns.name,
                               " has ", in, " inputs; pick a type whose block divides every width (q8_0, q4_0, ... "
                               "use 32) or narrow the layers"));
    }
  }
  if (cfg.base == BaseFormat::Blocks && !cfg.block_mix.empty() && cfg.block_mix != kGgufTypes)
    mixture_types(model, cfg, output_layer, &problems);
  for (auto& t : cfg.target_modules) {
    if (hits[t] > 0) continue;
    std::string names;
    for (size_t i = 0; i < slots.size() && i < 12; ++i) names += (i ? ", " : "") + slots[i].name;
    problems.push_back(str("peft.target_modules: '", t, "' matches no linear layer; layers are named like ", names,
                           slots.size() > 12 ? ", ..." : ""));
  }
  std::set<std::string> found_save;
  for (auto& p : model.named_parameters())
    for (auto& m : cfg.modules_to_save)
      if (p.key().rfind(m + ".", 0) == 0) found_save.insert(m);
  for (auto& m : cfg.modules_to_save)
    if (!found_save.count(m))
      problems.push_back(str("peft.modules_to_save: '", m, "' names no module with parameters"));
  if (!problems.empty()) throw ConfigError(problems);
  return wrap;
}

// Whether the linear `name` gets its frozen base re-stored in cfg.base (not the output layer, not a
// module trained fully; fake-quant layers are refused by validate()).
bool restores_base(const LoraConfig& cfg, const std::string& name, const std::string& output_layer) {
  if (cfg.base == BaseFormat::Fp32 || name == output_layer) return false;
  for (auto& m : cfg.modules_to_save)
    if (m == name) return false;
  return true;
}

// The float dtype a mixture's F16 / F32 choice holds a linear in.
at::ScalarType float_dtype(const quant::MixChoice& c) { return c.f16 ? at::kHalf : at::kFloat; }

// `base` already holds its weight in cfg.base's format (built while streaming the checkpoint in);
// `mix`: the layer's mixture choice (peft.base mix).
bool stored_as(const models::LinearBase& base, const LoraConfig& cfg, const quant::MixChoice* mix = nullptr) {
  if (cfg.base == BaseFormat::Nf4) {
    auto* n = dynamic_cast<const quant::Nf4Linear*>(&base);
    return n && n->blocksize == cfg.nf4_blocksize && n->double_quant == cfg.nf4_double_quant;
  }
  if (cfg.base == BaseFormat::Int8) {
    auto* q = dynamic_cast<const quant::Int8LtLinear*>(&base);
    return q && q->threshold == cfg.int8_threshold;
  }
  if (cfg.base == BaseFormat::Bf16) {
    auto* h = dynamic_cast<const models::HalfLinear*>(&base);
    return h && h->weight.scalar_type() == at::kBFloat16;
  }
  if (cfg.base == BaseFormat::Blocks) {
    auto* b = dynamic_cast<const quant::BlockLinear*>(&base);
    auto* h = dynamic_cast<const models::HalfLinear*>(&base);
    if (cfg.block_mix == kGgufTypes) return b || h;  // whatever type the file held it in
    if (!cfg.block_mix.empty()) {
      TORCH_INTERNAL_ASSERT(mix, "stored_as: a mixture base needs the layer's choice");
      return mix->rule != quant::Rule::Affine ? b && b->rule == mix->rule
                                              : h && h->weight.scalar_type() == float_dtype(*mix);
    }
    return b && b->rule == cfg.block_rule;
  }
  if (cfg.base == BaseFormat::Packed) return dynamic_cast<const models::PackedIntLinear*>(&base) != nullptr;
  return false;
}

}  // namespace

void check_lora(torch::nn::Module& model, const LoraConfig& cfg, const std::string& output_layer) {
  validate(models::linear_slots(model), model, cfg, output_layer);
}

namespace {

// A linear's llama.cpp tensor category and layer index from its family spec; a linear the spec does
// not list as a layer linear is "other" (AttnQ: no mixture rule names it, so the base type) in layer 0.
std::pair<quant::TensorRole, int64_t> role_of(const models::ArchSpec& arch, const std::string& name) {
  const models::ArchLinear* l = arch.layer_linear_of(name + ".weight");
  if (!l) return {quant::TensorRole::AttnQ, 0};
  const size_t at = arch.layers.size() + 1;
  return {l->role, std::stoll(name.substr(at, name.find('.', at) - at))};
}

// "blk.3.ffn_down.weight" for "model.layers.3.mlp.down_proj" (the name itself when the spec has none).
std::string gguf_name_of(const models::ArchSpec& arch, const std::string& name) {
  const models::ArchLinear* l = arch.layer_linear_of(name + ".weight");
  if (!l || l->gguf.empty()) return name;
  return str("blk.", role_of(arch, name).second, ".", l->gguf, ".weight");
}

const models::ModelConfig& lm_config(torch::nn::Module& model, const LoraConfig& cfg) {
  auto* lm = dynamic_cast<models::CausalLM*>(&model);
  QF_CHECK(lm, "peft.base ", base_name(cfg), ": the model is not a causal LM (its family spec gives each linear's role)");
  return lm->cfg;
}

}  // namespace

std::map<std::string, quant::MixChoice> mixture_types(torch::nn::Module& model, const LoraConfig& cfg,
                                                      const std::string& output_layer, std::vector<std::string>* problems) {
  std::map<std::string, quant::MixChoice> out;
  if (cfg.base != BaseFormat::Blocks || cfg.block_mix.empty() || cfg.block_mix == kGgufTypes) return out;
  const models::ModelConfig& c = lm_config(model, cfg);
  const models::ArchSpec& arch = models::arch_spec(c.family);
  const int64_t n_gqa = c.n_heads / std::max<int64_t>(1, c.kv_heads());  // llama.cpp's n_gqa(), as export uses it
  const bool big = quant::is_70b(arch.gguf_arch, c.n_layers, c.n_heads, c.kv_heads());
  std::vector<std::string> local;
  auto& probs = problems ? *problems : local;
  for (auto& ns : models::linear_slots(model)) {
    if (!restores_base(cfg, ns.name, output_layer)) continue;
    const auto [role, layer] = role_of(arch, ns.name);
    try {
      // No importance matrix: peft.base quantizes with the reference (unweighted) quantizers.
      out[ns.name] = quant::mix_choice(cfg.block_mix, role, layer, c.n_layers, ns.slot->get()->in_features,
                                       c.tie_embeddings, "", n_gqa, /*has_imatrix=*/false, big);
    } catch (const InputError& e) {
      probs.push_back(str("peft.mixture: ", cfg.block_mix, ": layer ", ns.name, " (", gguf_name_of(arch, ns.name),
                          "): ", e.what(), " (peft.base quantizes without an importance matrix; pick another mixture)"));
    }
  }
  if (!problems && !local.empty()) throw ConfigError(local);
  return out;
}

namespace {

// A mixture's choice for one linear: its blocks (the type recorded with them) or its float dtype.
std::shared_ptr<models::LinearBase> mixture_base(const quant::MixChoice& c, const at::Tensor& weight, const at::Tensor& bias) {
  if (c.rule == quant::Rule::Affine) return std::make_shared<models::HalfLinear>(weight, bias, float_dtype(c));
  auto b = std::make_shared<quant::BlockLinear>(weight, bias, c.rule);
  b->record_type();
  return b;
}

// frozen_base for linear `name`: under peft.base mix its entry of `mix`.
std::shared_ptr<models::LinearBase> frozen_base_of(const LoraConfig& cfg, const std::string& name,
                                                   const std::map<std::string, quant::MixChoice>& mix,
                                                   const at::Tensor& weight, const at::Tensor& bias) {
  if (cfg.base == BaseFormat::Blocks && cfg.block_mix == kGgufTypes)
    throw ConfigError(std::vector<std::string>{str(
        "peft.base: gguf keeps the types of model.from's GGUF tensors, but layer ", name, " is not read from a GGUF "
        "file's tensor (model.from must be a .gguf file, without run.init_from or quant rules); use peft.base "
        "mix with peft.mixture (e.g. q4_k_m) to give each linear llama-quantize's type for it")});
  if (cfg.base == BaseFormat::Blocks && !cfg.block_mix.empty()) {
    auto it = mix.find(name);
    TORCH_INTERNAL_ASSERT(it != mix.end(), "peft: no mixture type for ", name);
    return mixture_base(it->second, weight, bias);
  }
  return frozen_base(cfg, weight, bias);
}

}  // namespace

std::shared_ptr<models::LinearBase> frozen_base(const LoraConfig& cfg, const at::Tensor& weight, const at::Tensor& bias) {
  QF_CHECK(cfg.base != BaseFormat::Blocks || cfg.block_mix.empty(), "peft: frozen_base of peft.base ", base_name(cfg),
           " needs the layer (its type varies per linear)");
  switch (cfg.base) {
    case BaseFormat::Nf4: return std::make_shared<quant::Nf4Linear>(weight, bias, cfg.nf4_blocksize, cfg.nf4_double_quant);
    case BaseFormat::Bf16: return std::make_shared<models::HalfLinear>(weight, bias, at::kBFloat16);
    case BaseFormat::Int8: return std::make_shared<quant::Int8LtLinear>(weight, bias, cfg.int8_threshold);
    case BaseFormat::Blocks: return std::make_shared<quant::BlockLinear>(weight, bias, cfg.block_rule);
    case BaseFormat::Packed:
      throw ConfigError(std::vector<std::string>{
          "peft.base: packed keeps the packed int linears of a GPTQ / AWQ / compressed-tensors checkpoint "
          "(model.from), but this base layer is float; use peft.base fp32, bf16, nf4 or a llama.cpp type for it"});
    case BaseFormat::Fp32: break;
  }
  throw Error("peft: frozen_base needs a peft.base other than fp32");
}

models::LinearStreamer frozen_base_streamer(torch::nn::Module& model, const LoraConfig& cfg,
                                            const std::string& output_layer) {
  QF_CHECK(cfg.base != BaseFormat::Fp32, "peft: a frozen-base streamer needs a peft.base other than fp32");
  check_lora(model, cfg, output_layer);
  const auto mix = mixture_types(model, cfg, output_layer);  // check_lora has reported its problems
  models::LinearStreamer s;
  s.claims = [cfg, output_layer](const std::string& name) { return restores_base(cfg, name, output_layer); };
  s.build = [cfg, mix](const std::string& name, const at::Tensor& w, const at::Tensor& b) -> std::shared_ptr<models::LinearBase> {
    if (cfg.base == BaseFormat::Packed)  // a float (or dequantized-only) tensor cannot become a packed base
      throw ConfigError(std::vector<std::string>{str(
          "peft.base: packed: layer ", name, " is not stored as GPTQ / AWQ / compressed-tensors int codes in model.from; "
          "packed keeps such a checkpoint's packed linears (use peft.base fp32, bf16, nf4 or a llama.cpp type here)")});
    return frozen_base_of(cfg, name, mix, w, b);
  };
  if (cfg.base == BaseFormat::Nf4)
    // A bitsandbytes NF4 checkpoint in qforge's layout (the block size and double quant peft.nf4 asks
    // for, nested blocks of 256 with the signed dynamic map) keeps its bytes: bit-identical to
    // bitsandbytes' weights, where dequantize + re-quantize would move them.
    s.build_nf4 = [cfg](const std::string&, const models::PackedNf4& p, const at::Tensor& b) -> std::shared_ptr<models::LinearBase> {
      if (p.blocksize != cfg.nf4_blocksize || p.nested != cfg.nf4_double_quant) return nullptr;
      if (p.nested) {
        if (p.nested_blocksize != 256 || p.nested_code.numel() != 256) return nullptr;
        const auto& map = quant::dynamic_map_signed();
        auto code = p.nested_code.to(at::kFloat).contiguous();
        if (std::memcmp(code.data_ptr<float>(), map.data(), 256 * sizeof(float)) != 0) return nullptr;
      }
      quant::Nf4Tensor t;
      t.packed = p.packed;
      t.absmax = p.absmax;
      t.nested_absmax = p.nested_absmax;
      t.offset = p.offset;
      t.blocksize = p.blocksize;
      t.nested_blocksize = 256;
      t.double_quant = p.nested;
      t.shape = p.shape;
      return std::make_shared<quant::Nf4Linear>(t, b);
    };
  if (cfg.base == BaseFormat::Int8)
    // A bitsandbytes 8-bit checkpoint's weight (CB) and SCB are Int8Params' own bytes: kept as they are.
    s.build_packed = [cfg](const std::string&, const models::HfQuant& q, const std::map<std::string, at::Tensor>& parts,
                           int64_t, int64_t, const at::Tensor& b) -> std::shared_ptr<models::LinearBase> {
      if (q.method != models::HfQuantMethod::Bnb8) return nullptr;
      return std::make_shared<quant::Int8LtLinear>(quant::Int8Weight{parts.at("weight").clone(), parts.at("SCB").clone()},
                                                   b, cfg.int8_threshold);
    };
  if (cfg.base == BaseFormat::Blocks) {
    // A GGUF file's tensor already in the asked type (the layer's mixture type) keeps its bytes; under
    // peft.base gguf every tensor keeps them, as blocks or (F32 / F16 / BF16) as that float.
    const models::ArchSpec* arch = cfg.block_mix.empty() ? nullptr : &models::arch_spec(lm_config(model, cfg).family);
    s.build_blocks = [cfg, mix, arch](const std::string& name, uint32_t gguf_type, const at::Tensor& blocks, int64_t cols,
                                      const at::Tensor& b) -> std::shared_ptr<models::LinearBase> {
      const auto* t = quant::ggml::traits_by_gguf_id(gguf_type);
      if (cfg.block_mix == kGgufTypes) {
        if (t && t->rule != quant::Rule::Affine) {
          auto l = std::make_shared<quant::BlockLinear>(t->rule, blocks.clone(), cols, b);
          l->record_type();
          return l;
        }
        if (t) {  // F32 / F16 / BF16: the file's rows as that dtype
          const auto dt = t->gguf_id == 0 ? at::kFloat : t->gguf_id == 1 ? at::kHalf : at::kBFloat16;
          return std::make_shared<models::HalfLinear>(blocks.view(dt).clone(), b, dt);
        }
        throw ConfigError(std::vector<std::string>{str(
            "peft.base: gguf: tensor ", gguf_name_of(*arch, name), " (layer ", name, ") is stored as ",
            quant::ggml::gguf_type_name(gguf_type), ", which qforge dequantizes but cannot quantize, so it cannot "
            "train and merge on those blocks; use peft.base mix with peft.mixture (e.g. q4_k_m) or a block type (q4_k, "
            "...) to re-quantize such tensors, or bf16 / nf4 to train on the dequantized weights")});
      }
      const quant::Rule want = cfg.block_mix.empty() ? cfg.block_rule : mix.at(name).rule;
      if (!t || want == quant::Rule::Affine || t->rule != want) return nullptr;
      auto l = std::make_shared<quant::BlockLinear>(want, blocks.clone(), cols, b);
      if (!cfg.block_mix.empty()) l->record_type();
      return l;
    };
  }
  if (cfg.base == BaseFormat::Packed)
    s.build_packed = [](const std::string& name, const models::HfQuant& q, const std::map<std::string, at::Tensor>& parts,
                        int64_t out, int64_t in, const at::Tensor& b) -> std::shared_ptr<models::LinearBase> {
      return models::PackedIntLinear::from_checkpoint(q, name, out, in, parts, b);
    };
  return s;
}

ApplyReport apply_lora(torch::nn::Module& model, const LoraConfig& cfg, const std::string& output_layer) {
  auto slots = models::linear_slots(model);
  const std::vector<bool> wrap = validate(slots, model, cfg, output_layer);
  std::set<std::string> to_save(cfg.modules_to_save.begin(), cfg.modules_to_save.end());
  const auto mix = mixture_types(model, cfg, output_layer);  // validate has reported its problems
  auto mix_of = [&](const std::string& name) {
    auto it = mix.find(name);
    return it == mix.end() ? nullptr : &it->second;
  };

  // Nothing can re-store a float layer as a checkpoint's packed format, nor in "the GGUF file's type".
  const bool file_types = cfg.base == BaseFormat::Blocks && cfg.block_mix == kGgufTypes;
  if (cfg.base == BaseFormat::Packed || file_types) {
    std::vector<std::string> problems;
    for (auto& ns : slots)
      if (restores_base(cfg, ns.name, output_layer) && !stored_as(*ns.slot->get(), cfg))
        problems.push_back(file_types ? str("peft.base: gguf: layer ", ns.name, " is not held as a GGUF tensor's own "
                                            "blocks; model.from must be a .gguf file (and no run.init_from or quant "
                                            "rules); use peft.base mix with peft.mixture (e.g. q4_k_m) for other sources")
                                      : str("peft.base: packed: layer ", ns.name, " is not a packed int linear; model.from must be "
                               "a GPTQ, AWQ or compressed-tensors int checkpoint dir whose linears are all packed"));
    if (!problems.empty()) throw ConfigError(problems);
  }
  ApplyReport rep;
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  for (size_t i = 0; i < slots.size(); ++i) {
    auto base = slots[i].slot->get();
    const bool fq = std::dynamic_pointer_cast<quant::FakeQuantLinear>(base) != nullptr;
    if (!fq && restores_base(cfg, slots[i].name, output_layer)) {
      // A base the streaming load already built in this format is kept as it is (frozen_base_streamer).
      if (!stored_as(*base, cfg, mix_of(slots[i].name)))
        base = frozen_base_of(cfg, slots[i].name, mix, base->effective_weight(), base->bias_or_undefined());
      ++rep.n_frozen_converted;
      rep.base_weights += base->in_features * base->out_features;
      for (auto& b : base->buffers()) rep.base_bytes += b.numel() * b.element_size();
    }
    if (wrap[i]) {
      const bool blocks = std::dynamic_pointer_cast<quant::BlockLinear>(base) != nullptr;
      base = std::make_shared<LoraLinear>(base, cfg.r, cfg.scaling(), cfg.dropout, cfg.exact_merge && (fq || blocks));
      rep.wrapped.push_back(slots[i].name);
    }
    if (base != slots[i].slot->get()) slots[i].slot->replace(base);
  }
  for (auto& [name, l] : lora_layers(model)) {
    l->lora_A->weight.set_requires_grad(true);
    l->lora_B->weight.set_requires_grad(true);
  }
  for (auto& p : model.named_parameters())
    for (auto& m : to_save)
      if (p.key().rfind(m + ".", 0) == 0) p.value().set_requires_grad(true);
  count_parameters(model, rep);
  return rep;
}

int64_t install_saved_bases(torch::nn::Module& model, const LoraConfig& cfg,
                            const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& output_layer) {
  if (cfg.base != BaseFormat::Blocks && cfg.base != BaseFormat::Packed) return 0;
  std::map<std::string, at::Tensor> by(state.begin(), state.end());
  auto saved = [&](const std::string& prefix, const char* part) {  // "<linear>.base_layer.<part>" or "<linear>.<part>"
    for (const char* mid : {".base_layer.", "."})
      if (auto it = by.find(prefix + mid + part); it != by.end()) return it->second;
    return at::Tensor();
  };
  int64_t n = 0;
  for (auto& ns : models::linear_slots(model)) {
    const auto& m = *ns.slot->get();
    const bool bias = saved(ns.name, "bias").defined();
    std::shared_ptr<models::LinearBase> base;
    if (cfg.base == BaseFormat::Blocks) {
      auto w = saved(ns.name, "weight");
      const auto zb = bias ? at::zeros({m.out_features}) : at::Tensor();
      if (w.defined() && w.scalar_type() == at::kByte) {
        quant::Rule rule = cfg.block_rule;
        const at::Tensor ty = saved(ns.name, "ggml_type");  // mix / gguf bases save their type
        if (ty.defined()) {
          const auto id = static_cast<uint32_t>(ty.item<int32_t>());
          const auto* t = quant::ggml::traits_by_gguf_id(id);
          QF_CHECK_INPUT(t && t->rule != quant::Rule::Affine, "checkpoint: ", ns.name, ".ggml_type ", id,
                         " is not a llama.cpp block type qforge holds");
          rule = t->rule;
        } else {
          QF_CHECK_INPUT(cfg.block_mix.empty(), "checkpoint: ", ns.name, " holds llama.cpp blocks without their ",
                         "ggml_type, as a single-type peft.base saves them; the run config says peft.base ", base_name(cfg));
        }
        auto blk = std::make_shared<quant::BlockLinear>(rule, at::zeros(w.sizes(), at::kByte), m.in_features, zb);
        if (ty.defined()) blk->record_type();
        base = blk;
      } else if (w.defined() && at::isFloatingType(w.scalar_type()) && !cfg.block_mix.empty() &&
                 restores_base(cfg, ns.name, output_layer)) {  // a float choice of the mixture / file
        base = std::make_shared<models::HalfLinear>(at::zeros(w.sizes(), w.scalar_type()), zb, w.scalar_type());
      }
    } else if (auto qw = saved(ns.name, "qweight"); qw.defined()) {
      auto sc = saved(ns.name, "scales");
      const int64_t in = m.in_features;
      const int bits = qw.size(0) == (in + 7) / 8 ? 4 : qw.size(0) == (in + 15) / 16 ? 2 : 8;
      base = models::PackedIntLinear::zeros(bits, sc.size(0), sc.scalar_type(), m.out_features, m.in_features, bias);
    }
    if (!base) continue;
    ns.slot->replace(std::move(base));
    ++n;
  }
  return n;
}

int64_t merge_lora(torch::nn::Module& model) {
  int64_t n = 0;
  for (auto& ns : models::linear_slots(model)) {
    if (auto l = std::dynamic_pointer_cast<LoraLinear>(ns.slot->get())) {
      ns.slot->replace(l->merged());
      ++n;
    }
  }
  return n;
}

}  // namespace qf::peft
