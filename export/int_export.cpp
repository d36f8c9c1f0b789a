#include "export/int_export.h"

#include <ATen/ATen.h>

#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "export/hf_export.h"
#include "export/layer_view.h"
#include "models/arch.h"
#include "models/hf.h"
#include "models/hf_quantized.h"
#include "peft/lora.h"
#include "quant/affine.h"
#include "quant/qat.h"

namespace qf::exporter {
namespace {

using quant::QuantSpec;

// One linear's integer weights: codes int32 [out, in] in [-2^(b-1), 2^(b-1)-1] (symmetric) or in
// [0, 2^b-1] with integer zero points `zeros` [out, groups] (Rule::IntZeroPoint), scales float [out, groups].
struct IntWeights {
  at::Tensor codes, scales;
  at::Tensor zeros;  // integer zero points (undefined: symmetric)
  at::Tensor g_idx;  // GPTQ act-order column groups (undefined: contiguous)
  int bits;
  int64_t group;  // elements per scale along the input (== in for per-channel)
};

void check_spec(const std::string& layer, const QuantSpec& s) {
  if (s.kind != quant::Kind::Int || s.is_ggml() || (!s.symmetric && !s.int_zero_point()) ||
      s.learn != quant::Learn::None || (s.bits != 4 && s.bits != 8) ||
      (s.granularity != quant::Granularity::PerGroup && s.granularity != quant::Granularity::PerChannel))
    throw InputError(str("export: ", layer, " is ", s.describe(),
                         "; GPTQ / compressed-tensors hold int4/int8 per-group or per-channel weights, symmetric "
                         "(e.g. int4-g128, int4-g32, int8-per-channel) or asymmetric with an integer zero point "
                         "(int4-g128-zp, int4-g32-zp). torchao's asymmetric specs (-asym) keep a float-domain zero "
                         "point these formats cannot represent; quantize/train with int4-g128-zp instead, or export "
                         "those with --format gguf (llama.cpp presets) or hf"));
}

// compressed-tensors packs asymmetric zero points for 4-bit codes (pack-quantized); its 8-bit
// int-quantized layout is written here for symmetric codes only.
void check_format(const std::string& layer, const QuantSpec& s, IntFormat fmt) {
  if (fmt == IntFormat::CompressedTensors && s.int_zero_point() && s.bits != 4)
    throw InputError(str("export: ", layer, " is ", s.describe(), "; --format compressed-tensors is written with "
                         "integer zero points for 4-bit codes (pack-quantized) only; use --format gptq, or int4-g<G>-zp"));
}

using models::packed::pack_cols;
using models::packed::unpack_cols;

// --quant and --fallback as integer schemes (every problem refused before any weight is read).
struct Schemes {
  QuantSpec rtn;                // --quant: float linears are RTN'd to it
  std::optional<QuantSpec> fb;  // --fallback as a second integer scheme (compressed-tensors)
  bool float_fallback = false;  // --fallback f16: those linears stay in float
};

Schemes resolve_schemes(IntFormat fmt, const std::string& quant_name, const std::string& fallback) {
  Schemes s{QuantSpec::preset_named(quant_name)};
  check_spec("--quant " + quant_name, s.rtn);
  check_format("--quant " + quant_name, s.rtn, fmt);
  // --fallback: f16 keeps those linears in float (both formats can leave layers unquantized);
  // compressed-tensors also takes a second integer scheme (its own config group).
  s.float_fallback = fallback == "f16" || fallback == "float";
  if (fallback.empty() || s.float_fallback) return s;
  if (fmt == IntFormat::Gptq)
    throw InputError(str("export: --format gptq --fallback ", fallback, ": transformers' GPTQ loader (optimum) holds one "
                         "bits/group_size per file; use --fallback f16 (those linears stay in float) or "
                         "--format compressed-tensors, which takes a second scheme"));
  s.fb = QuantSpec::preset_named(fallback);
  check_spec("--fallback " + fallback, *s.fb);
  check_format("--fallback " + fallback, *s.fb, fmt);
  if (s.fb->bits != s.rtn.bits)
    throw InputError(str("export: --fallback ", fallback, " has ", s.fb->bits, "-bit codes and --quant ", quant_name, " ",
                         s.rtn.bits, "-bit; one file holds one code width (pick a ", s.rtn.bits, "-bit fallback or f16)"));
  return s;
}

// Linears that convert to integer codes (QAT / PTQ) must hold a scheme these formats take; float
// linears whose width --quant's group does not divide get the fallback, or one error names them.
std::set<std::string> fallback_layers(models::CausalLM& model, const Schemes& s, const std::string& quant_name,
                                      const std::string& fallback) {
  const auto widths = float_linear_widths(model, check_spec);
  std::set<std::string> out;
  const auto misfit = quant::width_fallbacks(widths, s.rtn, quant_name, fallback, s.fb ? &*s.fb : nullptr);
  for (size_t i = 0; i < widths.size(); ++i)
    if (misfit[i]) out.insert(widths[i].first);
  return out;
}

// The file being built: its tensors, what each packed layer must decode to, and the schemes used.
struct IntFile {
  IntFormat fmt;
  const char* fname;
  at::ScalarType ftype;                      // float tensors: the model's dtype
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, at::Tensor> expect;  // dequantized weight per layer, to check the file
  std::optional<QuantSpec> used;             // the main scheme (GPTQ: the only one)
  std::optional<QuantSpec> second;           // compressed-tensors: --fallback's scheme (config group 1)
  std::vector<std::string> second_layers, float_layers;
  bool desc_act = false;                     // some layer carries a GPTQ act-order g_idx
  IntExportResult res;
};

// A converted layer's own codes and scales (exact), or RTN of a float layer's weight to `spec`.
IntWeights int_weights(IntFile& f, const std::string& name, models::LinearBase& mod, QuantSpec& spec) {
  if (auto* ql = dynamic_cast<quant::QuantizedLinear*>(&mod)) {
    spec = ql->weight_spec();
    check_spec(name, spec);
    check_format(name, spec, f.fmt);
    IntWeights iw{ql->int_codes(), ql->scales.to(at::kFloat), spec.int_zero_point() ? ql->zeros.to(at::kLong) : at::Tensor(),
                  ql->g_idx, spec.bits, spec.block(mod.in_features)};
    if (iw.g_idx.defined() && f.fmt != IntFormat::Gptq)
      throw InputError(str("export: ", name, " was quantized by GPTQ with act-order (a per-column group map, "
                           "g_idx), which ", f.fname, " does not hold; use --format gptq, or quantize with "
                           "--static-groups"));
    f.desc_act |= iw.g_idx.defined();
    ++f.res.n_exact;
    return iw;
  }
  auto w = mod.effective_weight().to(at::kFloat);
  auto qp = quant::choose_qparams(w, spec);
  return {quant::quantize_affine(w, qp, spec), qp.scale.to(at::kFloat),
          spec.int_zero_point() ? qp.zero_point.to(at::kLong) : at::Tensor(), at::Tensor(), spec.bits,
          spec.block(mod.in_features)};
}

// One layer's tensors in the format's layout, and the weight the runtime will decode from them.
void pack_layer(IntFile& f, const std::string& name, models::LinearBase& mod, const IntWeights& iw,
                const QuantSpec& spec) {
  const auto st = quant::scale_type(spec);
  const int64_t in = mod.in_features, outf = mod.out_features, groups = in / iw.group;
  QF_CHECK(in % (32 / iw.bits) == 0 && outf % (32 / iw.bits) == 0, "export: ", name, " [", outf, ", ", in,
           "] does not pack into 32-bit words of ", iw.bits, "-bit codes");
  const int64_t zero = int64_t{1} << (iw.bits - 1);
  // unsigned codes and zero points [out, groups]: symmetric q + 2^(b-1) with zero point 2^(b-1);
  // integer-zero-point codes and zero points as they are
  const bool zp = iw.zeros.defined();
  auto u = zp ? iw.codes.to(at::kLong) : iw.codes.to(at::kLong) + zero;
  auto z = zp ? iw.zeros.to(at::kLong) : at::full({outf, groups}, zero, at::kLong);
  QF_CHECK(u.min().item<int64_t>() >= 0 && u.max().item<int64_t>() < 2 * zero && z.min().item<int64_t>() >= 0 &&
               z.max().item<int64_t>() < 2 * zero,
           "export: ", name, ": codes or zero points outside [0, ", 2 * zero - 1, "]");
  auto scales = iw.scales.to(st);
  auto& t = f.tensors;
  if (f.fmt == IntFormat::Gptq) {
    // qweight: words along the input, stored [in/pf, out]; qzeros [groups, out/pf]: v1 ("gptq")
    // holds zero - 1 (symmetric), v2 ("gptq_v2", integer zero points, where z = 0 must survive) z.
    t.emplace_back(name + ".qweight", pack_cols(u, iw.bits).t().contiguous());
    t.emplace_back(name + ".qzeros", pack_cols(z.t().contiguous() - (zp ? 0 : 1), iw.bits));
    t.emplace_back(name + ".scales", scales.t().contiguous());
    t.emplace_back(name + ".g_idx", iw.g_idx.defined() ? iw.g_idx.to(at::kInt).contiguous()
                                                       : at::arange(in, at::kInt).div(iw.group, "floor").to(at::kInt));
  } else if (iw.bits == 4) {
    // signed codes q - 8 packed with compressed-tensors' +8 offset: the unsigned nibbles u
    t.emplace_back(name + ".weight_packed", pack_cols(u, 4));
    t.emplace_back(name + ".weight_scale", scales.contiguous());
    t.emplace_back(name + ".weight_shape", at::tensor({outf, in}, at::kLong));
    // asymmetric: signed zero points z - 8, packed along the OUTPUT dim (pack_to_int32 packed_dim=0)
    // with the same offset: [ceil(out/8), groups]
    if (zp) t.emplace_back(name + ".weight_zero_point", pack_cols(z.t().contiguous(), 4).t().contiguous());
  } else {
    t.emplace_back(name + ".weight", iw.codes.to(at::kChar).contiguous());
    t.emplace_back(name + ".weight_scale", scales.contiguous());
  }
  if (auto b = mod.bias_or_undefined(); b.defined()) t.emplace_back(name + ".bias", b.to(f.ftype).contiguous());
  auto per_col = [&](const at::Tensor& g) {  // [out, groups] -> [out, in]
    return iw.g_idx.defined() ? g.index_select(1, iw.g_idx.to(at::kLong)) : g.repeat_interleave(iw.group, 1);
  };
  f.expect[name] = (u - per_col(z)).to(at::kFloat) * per_col(scales.to(at::kFloat));
}

// Every linear, read merged + converted one at a time (export/layer_view.h): lm_head and the float
// fallbacks in float, the rest as integer codes under one scheme (plus compressed-tensors' second).
void add_linears(IntFile& f, models::CausalLM& model, const Schemes& s, const std::set<std::string>& to_fallback) {
  for (auto& ns : models::linear_slots(model)) {
    auto mod = converted_linear(ns.slot->get());
    const bool fall = to_fallback.count(ns.name) > 0;
    if (ns.name == "lm_head" || (fall && s.float_fallback)) {
      f.tensors.emplace_back(ns.name + ".weight", mod->effective_weight().to(f.ftype).contiguous());
      if (ns.name != "lm_head") {
        if (auto b = mod->bias_or_undefined(); b.defined()) f.tensors.emplace_back(ns.name + ".bias", b.to(f.ftype).contiguous());
        f.float_layers.push_back(ns.name);
        ++f.res.n_fallback;
      }
      continue;
    }
    QuantSpec spec = fall ? *s.fb : s.rtn;
    const IntWeights iw = int_weights(f, ns.name, *mod, spec);
    if (fall) {
      f.second = spec;
      f.second_layers.push_back(ns.name);
      ++f.res.n_fallback;
    } else {
      if (f.used && (f.used->bits != spec.bits || f.used->block(mod->in_features) != spec.block(mod->in_features) ||
                     f.used->granularity != spec.granularity || f.used->int_zero_point() != spec.int_zero_point()))
        throw InputError(str("export: ", ns.name, " is ", spec.describe(), " but earlier layers are ", f.used->describe(),
                             "; one ", f.fname, " file holds one weight scheme"));
      f.used = spec;
    }
    pack_layer(f, ns.name, *mod, iw, spec);
    ++f.res.n_quantized;
  }
}

// Everything that is not a linear: the embedding and the norms, in the model's dtype.
void add_others(IntFile& f, models::CausalLM& model) {
  for (auto& t : non_linear_tensors(model, f.ftype)) f.tensors.push_back(std::move(t));
}

// GPTQ's quantization_config (also quantize_config.json). Float linears: GPTQ quantizes the block
// modules named in modules_in_block_to_quantize (by their name inside the block).
nlohmann::json gptq_config(const IntFile& f, const models::ArchSpec& arch) {
  const bool channel = f.used->granularity == quant::Granularity::PerChannel;
  nlohmann::json q = {{"quant_method", "gptq"}, {"bits", f.used->bits}, {"group_size", channel ? -1 : f.used->group_size},
                      {"desc_act", f.desc_act}, {"sym", !f.used->int_zero_point()}, {"true_sequential", true},
                      {"damp_percent", 0.01}, {"static_groups", false},
                      // v1 stores zero - 1, which cannot hold an integer zero point of 0 (gptqmodel's
                      // v1 -> v2 load adds 1 to every nibble): asymmetric files are v2 (gptqmodel)
                      {"checkpoint_format", f.used->int_zero_point() ? "gptq_v2" : "gptq"}, {"lm_head", false},
                      {"meta", {{"quantizer", {"qforge:0.1"}}}}};
  if (f.float_layers.empty()) return q;
  const std::string layers = arch.layers + ".";
  auto in_block = [&](const std::string& n) {  // <layers>.3.<name in the block> -> <name in the block>
    if (n.compare(0, layers.size(), layers) != 0) return n;
    const auto p = n.find('.', layers.size());
    return p == std::string::npos ? n : n.substr(p + 1);
  };
  std::set<std::string> quantized, kept;
  for (auto& [n, w] : f.expect) quantized.insert(in_block(n));
  for (auto& n : f.float_layers) kept.insert(in_block(n));
  for (auto& n : kept)
    if (quantized.count(n))
      throw InputError(str("export: --fallback f16 keeps ", n, " in float in some layers but not in others; GPTQ "
                           "files name the quantized modules per block"));
  q["modules_in_block_to_quantize"] = {std::vector<std::string>(quantized.begin(), quantized.end())};
  return q;
}

// compressed-tensors' quantization_config: group_0 targets Linear; --fallback's layers by exact
// name in group_1 (compressed-tensors prefers a name match over "Linear"); lm_head and float
// fallbacks ignored.
nlohmann::json compressed_config(const IntFile& f) {
  const bool channel = f.used->granularity == quant::Granularity::PerChannel;
  const std::string fmt = f.used->bits == 4 ? "pack-quantized" : "int-quantized";
  nlohmann::json wq = {{"num_bits", f.used->bits}, {"type", "int"}, {"symmetric", !f.used->int_zero_point()},
                       {"strategy", channel ? "channel" : "group"}, {"dynamic", false}, {"actorder", nullptr},
                       {"observer", "minmax"}, {"observer_kwargs", nlohmann::json::object()},
                       {"block_structure", nullptr}};
  wq["group_size"] = channel ? nlohmann::json(nullptr) : nlohmann::json(f.used->group_size);
  std::vector<std::string> ignore{"lm_head"};
  ignore.insert(ignore.end(), f.float_layers.begin(), f.float_layers.end());
  nlohmann::json q = {{"quant_method", "compressed-tensors"}, {"format", fmt},
                      {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", wq}, {"input_activations", nullptr},
                                                      {"output_activations", nullptr}, {"format", fmt}}}}},
                      {"ignore", ignore}, {"quantization_status", "compressed"}, {"kv_cache_scheme", nullptr},
                      {"global_compression_ratio", nullptr}, {"sparsity_config", nlohmann::json::object()}};
  if (f.second) {
    const bool ch2 = f.second->granularity == quant::Granularity::PerChannel;
    auto w2 = wq;
    w2["strategy"] = ch2 ? "channel" : "group";
    w2["symmetric"] = !f.second->int_zero_point();
    w2["group_size"] = ch2 ? nlohmann::json(nullptr) : nlohmann::json(f.second->group_size);
    q["config_groups"]["group_1"] = {{"targets", f.second_layers}, {"weights", w2}, {"input_activations", nullptr},
                                     {"output_activations", nullptr}, {"format", fmt}};
  }
  return q;
}

// Re-reads the written file and decodes every layer as the runtime does; it must give `expect` exactly.
void check_decoded(const IntFile& f, const std::string& dir) {
  auto back = st::load(dir + "/model.safetensors");
  const int bits = f.used->bits;
  const int64_t zero = int64_t{1} << (bits - 1);
  const bool v2 = f.used->int_zero_point();
  for (auto& [name, want] : f.expect) {
    at::Tensor got;
    if (f.fmt == IntFormat::Gptq) {
      auto uq = unpack_cols(back.get(name + ".qweight").t().contiguous(), bits);  // [out, in]
      auto z = unpack_cols(back.get(name + ".qzeros"), bits) + (v2 ? 0 : 1);     // [groups, out]
      auto g = back.get(name + ".g_idx").to(at::kLong);
      auto s = back.get(name + ".scales").to(at::kFloat);                        // [groups, out]
      got = (uq - z.index_select(0, g).t()).to(at::kFloat) * s.index_select(0, g).t();
    } else if (bits == 4) {
      auto uq = unpack_cols(back.get(name + ".weight_packed"), 4);
      auto s = back.get(name + ".weight_scale").to(at::kFloat);
      const int64_t group = want.size(1) / s.size(1);
      at::Tensor z = at::full(s.sizes(), zero, at::kLong);
      if (back.has(name + ".weight_zero_point"))  // [ceil(out/8), groups], packed along the output
        z = unpack_cols(back.get(name + ".weight_zero_point").t().contiguous(), 4).slice(1, 0, s.size(0)).t();
      got = (uq - z.repeat_interleave(group, 1)).to(at::kFloat) * s.repeat_interleave(group, 1);
    } else {
      auto s = back.get(name + ".weight_scale").to(at::kFloat);
      got = back.get(name + ".weight").to(at::kFloat) * s.repeat_interleave(want.size(1) / s.size(1), 1);
    }
    QF_CHECK(at::equal(got, want), "export: re-reading ", dir, " decodes '", name, "' differently from what was meant");
  }
}

}  // namespace

IntExportResult export_int(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out, IntFormat fmt,
                           const std::string& quant_name, const std::string& fallback, bool force) {
  const auto& c = model.cfg;
  const char* fname = fmt == IntFormat::Gptq ? "gptq" : "compressed-tensors";
  const models::ArchSpec& arch = models::arch_spec(c.family);
  if (arch.has_conv1d())
    throw InputError(str("export: --format ", fname, " covers families with nn.Linear layers (Llama, Qwen2, Mistral); ",
                         c.family_name(), " stores Conv1D weights, which GPTQ/compressed-tensors loaders do not pack"));
  const Schemes schemes = resolve_schemes(fmt, quant_name, fallback);
  at::NoGradGuard ng;
  const auto n_lora = peft::lora_layers(model).size();
  if (n_lora) log::info("export: merging ", n_lora, " LoRA adapters into their base layers as they are written");
  // Layers are read as merge_lora + convert would leave them: those holding trained codes are
  // QuantizedLinear, and a scheme these formats cannot hold is named before any width problem.
  const auto to_fallback = fallback_layers(model, schemes, quant_name, fallback);
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    IntFile f{fmt, fname, c.dtype == models::DType::BF16 ? at::kBFloat16 : at::kFloat};
    add_linears(f, model, schemes, to_fallback);
    add_others(f, model);
    QF_CHECK(f.used.has_value(), "export: the model has no linear layer to quantize");
    auto cfg = models::hf_config_json(c, f.ftype == at::kBFloat16 ? "bfloat16" : "float32");
    cfg.update(hf_special_token_ids(tok));
    nlohmann::json q;
    if (fmt == IntFormat::Gptq) {
      q = gptq_config(f, arch);
      fs::write_atomic(tmp + "/quantize_config.json", q.dump(2) + "\n");
    } else {
      q = compressed_config(f);
    }
    cfg["quantization_config"] = q;
    fs::write_atomic(tmp + "/config.json", cfg.dump(2) + "\n");
    st::save(tmp + "/model.safetensors", f.tensors, {{"format", "pt"}});
    copy_tokenizer(tok, tmp);
    check_decoded(f, tmp);
    f.res.bytes = static_cast<int64_t>(std::filesystem::file_size(tmp + "/model.safetensors"));
    f.res.dir = out;
    return f.res;
  });
}

}  // namespace qf::exporter
