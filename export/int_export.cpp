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
#include "models/arch.h"
#include "models/hf.h"
#include "peft/lora.h"
#include "quant/affine.h"
#include "quant/qat.h"

namespace qf::exporter {
namespace {

using quant::QuantSpec;

// One linear's integer weights: codes int32 [out, in] in [-2^(b-1), 2^(b-1)-1], scales float [out, groups].
struct IntWeights {
  at::Tensor codes, scales;
  at::Tensor g_idx;  // GPTQ act-order column groups (undefined: contiguous)
  int bits;
  int64_t group;  // elements per scale along the input (== in for per-channel)
};

void check_spec(const std::string& layer, const QuantSpec& s) {
  if (s.kind != quant::Kind::Int || s.is_ggml() || !s.symmetric || s.learn != quant::Learn::None ||
      (s.bits != 4 && s.bits != 8) ||
      (s.granularity != quant::Granularity::PerGroup && s.granularity != quant::Granularity::PerChannel))
    throw InputError(str("export: ", layer, " is ", s.describe(),
                         "; GPTQ / compressed-tensors hold symmetric int4/int8 per-group or per-channel weights "
                         "(e.g. int4-g128, int4-g32, int8-per-channel). torchao's asymmetric specs keep a "
                         "float-domain zero point these formats cannot represent; export those with --format gguf "
                         "(llama.cpp presets) or hf"));
}

// (u packed b bits at a time along dim 1, element k of each word at bits b*k) -> int32 words.
at::Tensor pack_cols(const at::Tensor& u, int bits) {
  const int64_t pf = 32 / bits;
  auto v = u.to(at::kLong).reshape({u.size(0), u.size(1) / pf, pf});
  auto shifts = at::arange(pf, at::kLong).mul(bits);
  auto words = v.__lshift__(shifts).sum(-1);                             // [rows, cols/pf] in [0, 2^32)
  words = at::where(words.ge(int64_t{1} << 31), words - (int64_t{1} << 32), words);  // as int32 bits
  return words.to(at::kInt).contiguous();
}
at::Tensor unpack_cols(const at::Tensor& w, int bits) {
  const int64_t pf = 32 / bits;
  auto v = w.to(at::kLong).bitwise_and(0xFFFFFFFFLL).unsqueeze(-1);
  auto shifts = at::arange(pf, at::kLong).mul(bits);
  return v.__rshift__(shifts).bitwise_and((1 << bits) - 1).reshape({w.size(0), -1});
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
  const QuantSpec rtn = QuantSpec::preset_named(quant_name);
  check_spec("--quant " + quant_name, rtn);
  // --fallback: f16 keeps those linears in float (both formats can leave layers unquantized);
  // compressed-tensors also takes a second integer scheme (its own config group).
  const bool float_fallback = fallback == "f16" || fallback == "float";
  std::optional<QuantSpec> fb;
  if (!fallback.empty() && !float_fallback) {
    if (fmt == IntFormat::Gptq)
      throw InputError(str("export: --format gptq --fallback ", fallback, ": transformers' GPTQ loader (optimum) holds one "
                           "bits/group_size per file; use --fallback f16 (those linears stay in float) or "
                           "--format compressed-tensors, which takes a second scheme"));
    fb = QuantSpec::preset_named(fallback);
    check_spec("--fallback " + fallback, *fb);
    if (fb->bits != rtn.bits)
      throw InputError(str("export: --fallback ", fallback, " has ", fb->bits, "-bit codes and --quant ", quant_name, " ",
                           rtn.bits, "-bit; one file holds one code width (pick a ", rtn.bits, "-bit fallback or f16)"));
  }
  at::NoGradGuard ng;
  // LoRA folded in and fake quant converted first: the layers that hold trained codes are then
  // QuantizedLinear, and a scheme these formats cannot hold is named before any width problem.
  const int64_t merged = peft::merge_lora(model);
  if (merged) log::info("export: merged ", merged, " LoRA adapters into their base layers");
  quant::convert(model);
  // Float linears whose width --quant's group does not divide: the fallback, or one error naming them.
  std::vector<std::pair<std::string, int64_t>> widths;
  for (auto& ns : models::linear_slots(model)) {
    if (ns.name == "lm_head") continue;
    if (auto ql = std::dynamic_pointer_cast<quant::QuantizedLinear>(ns.slot->get())) {
      check_spec(ns.name, ql->weight_spec());
      continue;
    }
    widths.emplace_back(ns.name, ns.slot->get()->in_features);
  }
  std::set<std::string> to_fallback;
  const auto misfit = quant::width_fallbacks(widths, rtn, quant_name, fallback, fb ? &*fb : nullptr);
  for (size_t i = 0; i < widths.size(); ++i)
    if (misfit[i]) to_fallback.insert(widths[i].first);
  return write_staged_dir(out, force, [&](const std::string& tmp) {
    const at::ScalarType ftype = c.dtype == models::DType::BF16 ? at::kBFloat16 : at::kFloat;
    IntExportResult res;
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::map<std::string, at::Tensor> expect;  // dequantized weight per layer, to check the file
    std::optional<QuantSpec> used;            // the main scheme (GPTQ: the only one)
    std::optional<QuantSpec> second;          // compressed-tensors: --fallback's scheme (config group 1)
    std::vector<std::string> second_layers, float_layers;
    bool desc_act = false;                    // some layer carries a GPTQ act-order g_idx
    std::vector<std::string> slot_names;
    for (auto& ns : models::linear_slots(model)) {
      slot_names.push_back(ns.name);
      auto mod = ns.slot->get();
      const bool fall = to_fallback.count(ns.name) > 0;
      if (ns.name == "lm_head" || (fall && float_fallback)) {
        tensors.emplace_back(ns.name + ".weight", mod->effective_weight().to(ftype).contiguous());
        if (ns.name != "lm_head") {
          if (auto b = mod->bias_or_undefined(); b.defined()) tensors.emplace_back(ns.name + ".bias", b.to(ftype).contiguous());
          float_layers.push_back(ns.name);
          ++res.n_fallback;
        }
        continue;
      }
      IntWeights iw;
      QuantSpec spec = fall ? *fb : rtn;
      if (auto ql = std::dynamic_pointer_cast<quant::QuantizedLinear>(mod)) {
        spec = ql->weight_spec();
        check_spec(ns.name, spec);
        iw = {ql->int_codes(), ql->scales.to(at::kFloat), ql->g_idx, spec.bits, spec.block(mod->in_features)};
        if (iw.g_idx.defined() && fmt != IntFormat::Gptq)
          throw InputError(str("export: ", ns.name, " was quantized by GPTQ with act-order (a per-column group map, "
                               "g_idx), which ", fname, " does not hold; use --format gptq, or quantize with "
                               "--static-groups"));
        desc_act |= iw.g_idx.defined();
        ++res.n_exact;
      } else {
        auto w = mod->effective_weight().to(at::kFloat);
        auto qp = quant::choose_qparams(w, spec);
        iw = {quant::quantize_affine(w, qp, spec), qp.scale.to(at::kFloat), at::Tensor(), spec.bits,
              spec.block(mod->in_features)};
      }
      if (fall) {
        second = spec;
        second_layers.push_back(ns.name);
        ++res.n_fallback;
      } else {
        if (used && (used->bits != spec.bits || used->block(mod->in_features) != spec.block(mod->in_features) ||
                     used->granularity != spec.granularity))
          throw InputError(str("export: ", ns.name, " is ", spec.describe(), " but earlier layers are ", used->describe(),
                               "; one ", fname, " file holds one weight scheme"));
        used = spec;
      }
      const auto st = quant::scale_type(spec);
      const int64_t in = mod->in_features, outf = mod->out_features, groups = in / iw.group;
      QF_CHECK(in % (32 / iw.bits) == 0 && outf % (32 / iw.bits) == 0, "export: ", ns.name, " [", outf, ", ", in,
               "] does not pack into 32-bit words of ", iw.bits, "-bit codes");
      const int64_t zero = int64_t{1} << (iw.bits - 1);
      auto u = iw.codes.to(at::kLong) + zero;  // unsigned codes
      auto scales = iw.scales.to(st);
      if (fmt == IntFormat::Gptq) {
        // qweight: words along the input, stored [in/pf, out]
        tensors.emplace_back(ns.name + ".qweight", pack_cols(u, iw.bits).t().contiguous());
        tensors.emplace_back(ns.name + ".qzeros", pack_cols(at::full({groups, outf}, zero - 1, at::kLong), iw.bits));
        tensors.emplace_back(ns.name + ".scales", scales.t().contiguous());
        tensors.emplace_back(ns.name + ".g_idx", iw.g_idx.defined() ? iw.g_idx.to(at::kInt).contiguous()
                                                                     : at::arange(in, at::kInt).div(iw.group, "floor").to(at::kInt));
      } else if (iw.bits == 4) {
        tensors.emplace_back(ns.name + ".weight_packed", pack_cols(u, 4));
        tensors.emplace_back(ns.name + ".weight_scale", scales.contiguous());
        tensors.emplace_back(ns.name + ".weight_shape", at::tensor({outf, in}, at::kLong));
      } else {
        tensors.emplace_back(ns.name + ".weight", iw.codes.to(at::kChar).contiguous());
        tensors.emplace_back(ns.name + ".weight_scale", scales.contiguous());
      }
      if (auto b = mod->bias_or_undefined(); b.defined()) tensors.emplace_back(ns.name + ".bias", b.to(ftype).contiguous());
      expect[ns.name] = iw.codes.to(at::kFloat) * (iw.g_idx.defined() ? scales.to(at::kFloat).index_select(1, iw.g_idx.to(at::kLong))
                                                                      : scales.to(at::kFloat).repeat_interleave(iw.group, 1));
      ++res.n_quantized;
    }
    // Everything that is not a linear: the embedding and the norms, in the model's dtype.
    const auto emb_name = model.token_embedding_name();
    tensors.emplace_back(emb_name + ".weight", model.token_embedding().get()->table().to(ftype).contiguous());
    for (auto& p : model.named_parameters()) {
      const auto& k = p.key();
      bool owned = k.rfind(emb_name + ".", 0) == 0;
      for (auto& n : slot_names) owned |= k.rfind(n + ".", 0) == 0;
      if (!owned) tensors.emplace_back(k, p.value().detach().to(ftype).contiguous());
    }
    QF_CHECK(used.has_value(), "export: the model has no linear layer to quantize");
    const bool channel = used->granularity == quant::Granularity::PerChannel;
    const std::string tdtype = ftype == at::kBFloat16 ? "bfloat16" : "float32";
    auto cfg = models::hf_config_json(c, tdtype);
    nlohmann::json q;
    if (fmt == IntFormat::Gptq) {
      q = {{"quant_method", "gptq"}, {"bits", used->bits}, {"group_size", channel ? -1 : used->group_size},
           {"desc_act", desc_act}, {"sym", true}, {"true_sequential", true}, {"damp_percent", 0.01},
           {"static_groups", false}, {"checkpoint_format", "gptq"}, {"lm_head", false},
           {"meta", {{"quantizer", {"qforge:0.1"}}}}};
      if (!float_layers.empty()) {
        // Float linears: GPTQ quantizes the block modules named here (by their name inside the block).
        const std::string layers = arch.layers + ".";
        auto in_block = [&](const std::string& n) {  // <layers>.3.<name in the block> -> <name in the block>
          if (n.compare(0, layers.size(), layers) != 0) return n;
          const auto p = n.find('.', layers.size());
          return p == std::string::npos ? n : n.substr(p + 1);
        };
        std::set<std::string> quantized, kept;
        for (auto& [n, w] : expect) quantized.insert(in_block(n));
        for (auto& n : float_layers) kept.insert(in_block(n));
        for (auto& n : kept)
          if (quantized.count(n))
            throw InputError(str("export: --fallback f16 keeps ", n, " in float in some layers but not in others; GPTQ "
                                 "files name the quantized modules per block"));
        q["modules_in_block_to_quantize"] = {std::vector<std::string>(quantized.begin(), quantized.end())};
      }
      fs::write_atomic(tmp + "/quantize_config.json", q.dump(2) + "\n");
    } else {
      const std::string f = used->bits == 4 ? "pack-quantized" : "int-quantized";
      nlohmann::json wq = {{"num_bits", used->bits}, {"type", "int"}, {"symmetric", true},
                           {"strategy", channel ? "channel" : "group"}, {"dynamic", false}, {"actorder", nullptr},
                           {"observer", "minmax"}, {"observer_kwargs", nlohmann::json::object()},
                           {"block_structure", nullptr}};
      wq["group_size"] = channel ? nlohmann::json(nullptr) : nlohmann::json(used->group_size);
      std::vector<std::string> ignore{"lm_head"};
      ignore.insert(ignore.end(), float_layers.begin(), float_layers.end());
      q = {{"quant_method", "compressed-tensors"}, {"format", f},
           {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", wq}, {"input_activations", nullptr},
                                           {"output_activations", nullptr}, {"format", f}}}}},
           {"ignore", ignore}, {"quantization_status", "compressed"}, {"kv_cache_scheme", nullptr},
           {"global_compression_ratio", nullptr}, {"sparsity_config", nlohmann::json::object()}};
      if (second) {
        // --fallback's layers by exact name (compressed-tensors prefers a name match over "Linear").
        const bool ch2 = second->granularity == quant::Granularity::PerChannel;
        auto w2 = wq;
        w2["strategy"] = ch2 ? "channel" : "group";
        w2["group_size"] = ch2 ? nlohmann::json(nullptr) : nlohmann::json(second->group_size);
        q["config_groups"]["group_1"] = {{"targets", second_layers}, {"weights", w2}, {"input_activations", nullptr},
                                         {"output_activations", nullptr}, {"format", f}};
      }
    }
    cfg["quantization_config"] = q;
    fs::write_atomic(tmp + "/config.json", cfg.dump(2) + "\n");
    st::save(tmp + "/model.safetensors", tensors, {{"format", "pt"}});
    copy_tokenizer(tok, tmp);
    // Re-read the file and decode every layer as the runtime does; it must give `expect` exactly.
    auto back = st::load(tmp + "/model.safetensors");
    for (auto& [name, want] : expect) {
      at::Tensor got;
      const int bits = used->bits;
      const int64_t zero = int64_t{1} << (bits - 1);
      if (fmt == IntFormat::Gptq) {
        auto uq = unpack_cols(back.get(name + ".qweight").t().contiguous(), bits);  // [out, in]
        auto z = unpack_cols(back.get(name + ".qzeros"), bits) + 1;                // [groups, out]
        auto g = back.get(name + ".g_idx").to(at::kLong);
        auto s = back.get(name + ".scales").to(at::kFloat);                        // [groups, out]
        got = (uq - z.index_select(0, g).t()).to(at::kFloat) * s.index_select(0, g).t();
      } else if (bits == 4) {
        auto uq = unpack_cols(back.get(name + ".weight_packed"), 4);
        auto s = back.get(name + ".weight_scale").to(at::kFloat);
        got = (uq - zero).to(at::kFloat) * s.repeat_interleave(want.size(1) / s.size(1), 1);
      } else {
        auto s = back.get(name + ".weight_scale").to(at::kFloat);
        got = back.get(name + ".weight").to(at::kFloat) * s.repeat_interleave(want.size(1) / s.size(1), 1);
      }
      QF_CHECK(at::equal(got, want), "export: re-reading ", tmp, " decodes '", name, "' differently from what was meant");
    }
    res.bytes = static_cast<int64_t>(std::filesystem::file_size(tmp + "/model.safetensors"));
    res.dir = out;
    return res;
  });
}

}  // namespace qf::exporter
