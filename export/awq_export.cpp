#include "export/awq_export.h"

#include <ATen/ATen.h>

#include <filesystem>
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

// AutoAWQ's packing (nibble order) lives with the reader: models/hf_quantized.h.
using models::packed::pack_awq;
using models::packed::unpack_awq;
constexpr int kBits = 4;
constexpr int64_t kZero = 8;  // a symmetric code q in [-8, 7] is stored as q + 8 with zero point 8
// (integer-zero-point specs, Rule::IntZeroPoint, store their own codes in [0, 15] and zero points)

// What holds each kind of layer, for the refusals.
const char* kOtherFormats =
    "export it with --format gguf (llama.cpp presets, incl. q4_1's float offset), --format hf (float), or "
    "--format gptq / compressed-tensors (int4/int8, symmetric or with integer zero points)";

// AWQ GEMM holds 4-bit integer codes with integer zero points, per group, fp16 scales.
void check_spec(const std::string& layer, const QuantSpec& s) {
  auto refuse = [&](const std::string& why) {
    throw InputError(str("export: ", layer, " is ", s.describe(), "; --format awq (AutoAWQ GEMM) holds ", why,
                         ". Formats that hold it: int4 per-group specs with an integer zero point (int4-g128-zp, "
                         "int4-g32-zp: AutoAWQ's own rule) or symmetric ones (int4-g128, int4-g64, int4-g32) for awq; "
                         "otherwise ", kOtherFormats));
  };
  if (s.kind != quant::Kind::Int) refuse("4-bit integer codes, not NF4 / FP8 code tables");
  if (s.is_ggml()) refuse("integer codes with per-group fp16 scales and packed integer zero points, not llama.cpp blocks");
  if (s.bits != kBits) refuse("4-bit codes only (its WQLinear_GEMM packs 8 per int32)");
  if (s.learn != quant::Learn::None) refuse("(q - z) * s with an integer z, not LSQ's learned float offset");
  if (s.granularity != quant::Granularity::PerGroup) refuse("per-group scales (group_size), not per-channel / per-tensor");
  if (!s.symmetric && !s.int_zero_point())
    refuse("an integer zero point z in [0, 15] per group, and this torchao-style asymmetric spec keeps a "
           "float-domain zero point (min + s * 8) that no integer z reproduces; quantize/train with int4-g128-zp "
           "(or int4-g<G>-zp) for AutoAWQ's asymmetric integer zero points");
}

struct AwqFile {
  at::ScalarType ftype;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, at::Tensor> expect;  // float32 weight [out, in] each packed layer must decode to
  std::vector<std::string> float_layers;      // modules_to_not_convert besides lm_head
  int64_t group = 0;
  AwqExportResult res;
};

// One layer as the file holds it: unsigned codes int64 [out, in] and integer zero points int64
// [out, groups], both in [0, 15], and float32 scales [out, groups]; weight = (u - z) * s.
struct AwqWeights {
  at::Tensor u, z, s;
};
// Symmetric codes q in [-8, 7] -> q + 8 with zero point 8; integer-zero-point codes as they are.
AwqWeights as_unsigned(const QuantSpec& spec, const at::Tensor& codes, const at::Tensor& zeros, const at::Tensor& scales) {
  if (spec.int_zero_point()) return {codes.to(at::kLong), zeros.to(at::kLong), scales};
  return {codes.to(at::kLong) + kZero, at::full(scales.sizes(), kZero, at::kLong), scales};
}

// A converted layer's own codes, zero points and scales, or RTN of a float layer's weight to `rtn`.
AwqWeights int_weights(AwqFile& f, const std::string& name, models::LinearBase& mod, const QuantSpec& rtn,
                       int64_t& group) {
  if (auto* ql = dynamic_cast<quant::QuantizedLinear*>(&mod)) {
    const QuantSpec& spec = ql->weight_spec();
    check_spec(name, spec);
    if (ql->g_idx.defined())
      throw InputError(str("export: ", name, " was quantized by GPTQ with act-order (a per-column group map, g_idx), "
                           "which AWQ GEMM does not hold; use --format gptq, or quantize with --static-groups"));
    group = spec.block(mod.in_features);
    auto codes = ql->int_codes();
    auto scales = ql->scales.to(at::kFloat);
    // The file stores fp16 scales: exact only when the layer's scales are fp16 values already.
    auto s16 = scales.to(at::kHalf).to(at::kFloat);
    if (!at::equal(s16, scales)) {
      auto bad = (s16 - scales).abs().argmax().item<int64_t>();
      throw InputError(str("export: ", name, " has scales fp16 cannot hold exactly (e.g. ", scales.flatten()[bad].item<double>(),
                           " -> ", s16.flatten()[bad].item<double>(), " in fp16; spec ", spec.describe(),
                           "); AWQ GEMM stores fp16 scales: train/quantize with fp16 scales (the int<b>-g<G> presets such as "
                           "int4-g128 or int4-g64; the int4-g32 preset keeps fp32 scales, so use a rule {bits: 4, "
                           "granularity: per-group, group_size: 32, scale_dtype: fp16}), or export with --format "
                           "gptq / compressed-tensors, which keep the spec's scale dtype"));
    }
    // The runtime's weight (u - z) * s must be the one qforge computes with.
    auto aw = as_unsigned(spec, codes, ql->zeros, scales);
    auto w = (aw.u - aw.z.repeat_interleave(group, 1)).to(at::kFloat) * scales.repeat_interleave(group, 1);
    QF_CHECK(at::equal(w, ql->effective_weight()), "export: ", name,
             ": (codes - zeros) * scales differ from the layer's dequantized weight (", spec.describe(), ")");
    ++f.res.n_exact;
    return aw;
  }
  // RTN with the scales the file holds (fp16, whatever --quant's preset keeps), so the codes are
  // chosen against the scale the runtime multiplies by.
  QuantSpec spec = rtn;
  spec.scale_dtype = quant::ScaleDType::F16;
  group = spec.block(mod.in_features);
  auto w = mod.effective_weight().to(at::kFloat);
  auto qp = quant::choose_qparams(w, spec);
  auto scales = qp.scale.to(at::kFloat);
  QF_CHECK(at::equal(scales.to(at::kHalf).to(at::kFloat), scales), "export: ", name, ": RTN scales are not fp16 values");
  return as_unsigned(spec, quant::quantize_affine(w, qp, spec), qp.zero_point, scales);
}

void pack_layer(AwqFile& f, const std::string& name, models::LinearBase& mod, const AwqWeights& aw, int64_t group) {
  const int64_t in = mod.in_features, outf = mod.out_features;
  if (outf % 8 != 0)
    throw InputError(str("export: ", name, " has ", outf, " outputs; AWQ GEMM packs 8 output columns per int32 word "
                         "(a multiple of 8 is needed); ", kOtherFormats));
  QF_CHECK(in % group == 0, "export: ", name, ": group ", group, " does not divide its ", in, " inputs");
  const auto& [u, z, scales] = aw;  // [out, in], [out, groups] in [0, 15]; [out, groups]
  QF_CHECK(u.min().item<int64_t>() >= 0 && u.max().item<int64_t>() <= 15, "export: ", name, ": codes outside [0, 15]");
  QF_CHECK(z.min().item<int64_t>() >= 0 && z.max().item<int64_t>() <= 15, "export: ", name, ": zero points outside [0, 15]");
  QF_CHECK(z.size(1) == in / group, "export: ", name, ": ", z.size(1), " zero points per row for ", in / group, " groups");
  f.tensors.emplace_back(name + ".qweight", pack_awq(u.t().contiguous()));          // [in, out/8]
  f.tensors.emplace_back(name + ".qzeros", pack_awq(z.t().contiguous()));           // [groups, out/8]
  f.tensors.emplace_back(name + ".scales", scales.t().contiguous().to(at::kHalf));  // [groups, out]
  if (auto b = mod.bias_or_undefined(); b.defined()) f.tensors.emplace_back(name + ".bias", b.to(at::kHalf).contiguous());
  f.expect[name] = (u - z.repeat_interleave(group, 1)).to(at::kFloat) * scales.repeat_interleave(group, 1);
}

// Every linear, merged + converted one at a time: lm_head and the --fallback f16 layers in float.
void add_linears(AwqFile& f, models::CausalLM& model, const QuantSpec& rtn, const std::set<std::string>& to_float) {
  for (auto& ns : models::linear_slots(model)) {
    auto mod = converted_linear(ns.slot->get());
    if (ns.name == "lm_head" || to_float.count(ns.name)) {
      f.tensors.emplace_back(ns.name + ".weight", mod->effective_weight().to(f.ftype).contiguous());
      if (auto b = mod->bias_or_undefined(); b.defined()) f.tensors.emplace_back(ns.name + ".bias", b.to(f.ftype).contiguous());
      if (ns.name != "lm_head") {
        f.float_layers.push_back(ns.name);
        ++f.res.n_fallback;
      }
      continue;
    }
    int64_t group = 0;
    const auto aw = int_weights(f, ns.name, *mod, rtn, group);
    if (f.group && f.group != group)
      throw InputError(str("export: ", ns.name, " has groups of ", group, " but earlier layers of ", f.group,
                           "; an AWQ config holds one group_size (re-export with --quant int4-g", f.group,
                           " for float layers, or --format compressed-tensors, which takes a second scheme)"));
    f.group = group;
    pack_layer(f, ns.name, *mod, aw, group);
    ++f.res.n_quantized;
  }
}

// The embedding and every parameter outside the linears (norms), in the model's dtype.
void add_others(AwqFile& f, models::CausalLM& model) {
  for (auto& t : non_linear_tensors(model, f.ftype)) f.tensors.push_back(std::move(t));
}

// Re-reads the file and decodes every packed layer as AutoAWQ's dequantize_gemm does ((q - z) * s,
// here in float32); it must give `expect` bit for bit.
void check_decoded(const AwqFile& f, const std::string& dir) {
  auto back = st::load(dir + "/model.safetensors");
  for (auto& [name, want] : f.expect) {
    auto q = unpack_awq(back.get(name + ".qweight"));                     // [in, out]
    auto z = unpack_awq(back.get(name + ".qzeros"));                      // [groups, out]
    auto s = back.get(name + ".scales");                                  // [groups, out] fp16
    QF_CHECK(s.scalar_type() == at::kHalf, "export: re-reading ", dir, ": '", name, ".scales' is not fp16");
    const int64_t group = q.size(0) / s.size(0);
    auto got = ((q - z.repeat_interleave(group, 0)).to(at::kFloat) * s.to(at::kFloat).repeat_interleave(group, 0)).t();
    QF_CHECK(at::equal(got, want), "export: re-reading ", dir, " decodes '", name, "' differently from what was meant");
  }
}

}  // namespace

AwqExportResult export_awq(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                           const std::string& quant_name, const std::string& fallback, bool force) {
  const auto& c = model.cfg;
  const models::ArchSpec& arch = models::arch_spec(c.family);
  if (arch.has_conv1d())
    throw InputError(str("export: --format awq covers families with nn.Linear layers (Llama, Qwen2, Mistral, ...); ",
                         c.family_name(), " stores Conv1D weights, which AWQ GEMM loaders do not pack; ", kOtherFormats));
  const QuantSpec rtn = QuantSpec::preset_named(quant_name);
  check_spec("--quant " + quant_name, rtn);
  const bool float_fallback = fallback == "f16" || fallback == "float";
  if (!fallback.empty() && !float_fallback)
    throw InputError(str("export: --format awq --fallback ", fallback, ": an AWQ config holds one bits/group_size; use "
                         "--fallback f16 (those linears stay in float, in modules_to_not_convert) or --format "
                         "compressed-tensors, which takes a second scheme"));
  at::NoGradGuard ng;
  const auto n_lora = peft::lora_layers(model).size();
  if (n_lora) log::info("export: merging ", n_lora, " LoRA adapters into their base layers as they are written");
  // Every converted layer's scheme is checked (naming the layer) before any width problem or weight.
  const auto widths = float_linear_widths(model, check_spec);
  std::set<std::string> to_float;
  const auto misfit = quant::width_fallbacks(widths, rtn, quant_name, float_fallback ? fallback : "", nullptr);
  for (size_t i = 0; i < widths.size(); ++i)
    if (misfit[i]) to_float.insert(widths[i].first);
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    AwqFile f{c.dtype == models::DType::BF16 ? at::kBFloat16 : at::kFloat};
    add_linears(f, model, rtn, to_float);
    add_others(f, model);
    QF_CHECK(f.group > 0, "export: the model has no linear layer to quantize");
    std::vector<std::string> skip{"lm_head"};
    skip.insert(skip.end(), f.float_layers.begin(), f.float_layers.end());
    auto cfg = models::hf_config_json(c, f.ftype == at::kBFloat16 ? "bfloat16" : "float32");
    cfg.update(hf_special_token_ids(tok));
    cfg["quantization_config"] = {{"quant_method", "awq"}, {"version", "gemm"}, {"bits", kBits},
                                  {"group_size", f.group}, {"zero_point", true}, {"backend", "autoawq"},
                                  {"modules_to_not_convert", skip}};
    fs::write_atomic(tmp + "/config.json", cfg.dump(2) + "\n");
    // AutoAWQ's own file (its from_quantized reads it when config.json has no quantization_config).
    nlohmann::json qc = {{"zero_point", true}, {"q_group_size", f.group}, {"w_bit", kBits}, {"version", "GEMM"},
                         {"modules_to_not_convert", skip}};
    fs::write_atomic(tmp + "/quant_config.json", qc.dump(2) + "\n");
    st::save(tmp + "/model.safetensors", f.tensors, {{"format", "pt"}});
    copy_tokenizer(tok, tmp);
    check_decoded(f, tmp);
    f.res.bytes = static_cast<int64_t>(std::filesystem::file_size(tmp + "/model.safetensors"));
    f.res.group_size = f.group;
    f.res.dir = out;
    return f.res;
  });
}

}  // namespace qf::exporter
