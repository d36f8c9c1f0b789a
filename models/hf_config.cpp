#include "models/hf_config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <optional>

#include "core/json_file.h"
#include "models/arch.h"

namespace qf::models {
namespace {

using json = nlohmann::json;

constexpr int64_t kMaxSize = (int64_t{1} << 31) - 1;

// The hyper-parameters every family has, under the spec's key names.
ModelConfig read_common(const HfConfigReader& c, const ArchSpec& a) {
  ModelConfig m;
  m.family = a.family;
  m.vocab_size = c.i64("vocab_size");
  m.dim = c.i64(a.hf_keys.hidden);
  m.n_layers = c.i64(a.hf_keys.layers);
  m.n_heads = c.i64(a.hf_keys.heads);
  m.max_seq_len = c.i64_or(a.hf_keys.max_positions, a.hf_default_max_positions);
  m.norm_eps = c.f64_or(a.hf_keys.norm_eps, a.hf_default_norm_eps);
  return m;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return s;
}

const char* kQuantRead =
    "qforge reads GPTQ (quant_method gptq: 2, 3, 4 or 8 bits, checkpoint_format gptq or gptq_v2), AWQ (quant_method awq, "
    "version gemm, 4 bits) compressed-tensors (pack-quantized int4/int8, int-quantized int8, float-quantized fp8) and bitsandbytes 4-bit (quant_method bitsandbytes, "
    "load_in_4bit: nf4/fp4, double quant; load_in_8bit: LLM.int8) checkpoints";

// An integer key: required (def unset) or defaulted; kMaxSize caps it like the sizes.
int64_t int_key(const HfConfigReader& r, const char* k, std::optional<int64_t> def) {
  if (!r.has(k)) {
    if (def) return *def;
    throw r.bad(k, "is missing");
  }
  const auto& v = r.j[k];
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > kMaxSize) || v.get<int64_t>() < -1 ||
      v.get<int64_t>() > kMaxSize)
    throw r.bad(k, "must be an integer");
  return v.get<int64_t>();
}

std::vector<std::string> string_list(const HfConfigReader& r, const char* k) {
  std::vector<std::string> out;
  if (!r.has(k)) return out;
  if (!r.j[k].is_array()) throw r.bad(k, "must be a list of module names");
  for (auto& e : r.j[k]) {
    if (!e.is_string()) throw r.bad(k, "must be a list of module names");
    out.push_back(e.get<std::string>());
  }
  return out;
}

// A string key; absent or null: `def` (quantization configs write null for "not set").
std::string text_or(const HfConfigReader& r, const char* k, const std::string& def) {
  return r.has(k) ? r.j[k].get<std::string>() : def;
}

int64_t group_key(const HfConfigReader& r, const char* k, std::optional<int64_t> def) {
  const int64_t g = int_key(r, k, def);
  if (g == 0 || g < -1) throw r.bad(k, str("is ", g, "; a group size is a positive number of input columns, or -1 (per channel)"));
  return g;
}

void read_gptq(const HfConfigReader& r, HfQuant& q) {
  q.bits = static_cast<int>(int_key(r, "bits", std::nullopt));
  if (q.bits != 2 && q.bits != 3 && q.bits != 4 && q.bits != 8)
    throw r.bad("bits", str("is ", q.bits, "; GPTQ checkpoints hold 2-, 3-, 4- or 8-bit codes"));
  q.group_size = group_key(r, "group_size", -1);
  q.desc_act = r.bool_or("desc_act", false);
  q.symmetric = r.bool_or("sym", true);
  const std::string fmt = lower(text_or(r, "checkpoint_format", "gptq"));
  if (fmt != "gptq" && fmt != "gptq_v2")
    throw r.bad("checkpoint_format", str("is '", fmt, "'; qforge reads GPTQ checkpoints in checkpoint_format gptq (v1, "
                                         "stored zero points z - 1) or gptq_v2 (z); repack kernel-specific formats "
                                         "(marlin, bitblas, ...) with gptqmodel first"));
  q.zeros_v2 = fmt == "gptq_v2";
  q.skip = string_list(r, "modules_to_not_convert");
}

void read_awq(const HfConfigReader& r, HfQuant& q) {
  const std::string version = lower(text_or(r, "version", "gemm"));
  if (version != "gemm")
    throw r.bad("version", str("is '", version, "'; qforge reads AWQ GEMM checkpoints (version gemm: qweight [in, out/8] "
                               "in AutoAWQ's nibble order); GEMV / exllama / marlin / ipex layouts are not read"));
  q.bits = static_cast<int>(r.has("bits") ? int_key(r, "bits", std::nullopt) : int_key(r, "w_bit", 4));
  if (q.bits != 4) throw r.bad("bits", str("is ", q.bits, "; AWQ GEMM packs 4-bit codes only"));
  q.group_size = r.has("group_size") ? group_key(r, "group_size", std::nullopt) : group_key(r, "q_group_size", 128);
  if (q.group_size < 0) throw r.bad("group_size", "is -1; AWQ GEMM stores per-group scales (a positive group_size)");
  q.symmetric = !r.bool_or("zero_point", true);
  q.skip = string_list(r, "modules_to_not_convert");
}

// A float-quantized scheme (what llm-compressor writes for FP8, FP8_DYNAMIC, FP8_BLOCK): fp8 e4m3
// weights with a symmetric scale per tensor, output row or [rows, cols] block. Its input_activations
// (fp8, dynamic or static input_scale) are recorded for inspect and not applied.
void read_fp8_scheme(const HfConfigReader& g, const HfConfigReader& w, const std::string& type, const std::string& strategy,
                     HfQuantScheme& s) {
  if (s.format != "float-quantized")
    throw g.bad("format", str("is '", s.format, "' but the weights are type '", type, "'; fp8 weights are format "
                              "float-quantized"));
  if (type != "float") throw w.bad("type", str("is '", type, "' under format float-quantized; expected float"));
  if (s.bits != 8) throw w.bad("num_bits", str("is ", s.bits, "; float-quantized is read for 8-bit (fp8 e4m3) weights"));
  if (!s.symmetric) throw w.bad("symmetric", "is false; fp8 weights are read symmetric (no zero point)");
  if (strategy == "block") {
    if (!w.has("block_structure") || !w.j["block_structure"].is_array() || w.j["block_structure"].size() != 2 ||
        !w.j["block_structure"][0].is_number_integer() || !w.j["block_structure"][1].is_number_integer() ||
        w.j["block_structure"][0].get<int64_t>() <= 0 || w.j["block_structure"][1].get<int64_t>() <= 0)
      throw w.bad("block_structure", "must be [rows, cols] (two positive integers) with strategy block");
    s.block_rows = w.j["block_structure"][0].get<int64_t>();
    s.block_cols = w.j["block_structure"][1].get<int64_t>();
  } else if (strategy != "tensor" && strategy != "channel") {
    throw w.bad("strategy", str("is '", strategy, "'; fp8 weights are read with strategy tensor, channel or block"));
  }
  s.fp8_strategy = strategy;
  if (!g.has("input_activations")) return;
  if (!g.j["input_activations"].is_object()) throw g.bad("input_activations", "must be an object or null");
  const HfConfigReader a = g.child("input_activations");
  const std::string at = text_or(a, "type", "int");
  const int64_t ab = int_key(a, "num_bits", std::nullopt);
  const std::string as = text_or(a, "strategy", "tensor");
  s.activations = str(at == "float" ? "fp" : "int", ab, a.bool_or("dynamic", false) ? " dynamic" : " static", " per-",
                      as == "group" ? str("group ", int_key(a, "group_size", std::nullopt)) : as);
}

void read_compressed(const HfConfigReader& r, HfQuant& q) {
  const std::string top = text_or(r, "format", "");
  if (!r.has("config_groups") || !r.j["config_groups"].is_object() || r.j["config_groups"].empty())
    throw r.bad("config_groups", "must be an object of quantization schemes");
  const HfConfigReader groups = r.child("config_groups");
  for (auto it = r.j["config_groups"].begin(); it != r.j["config_groups"].end(); ++it) {
    const std::string gname = it.key();
    if (!it->is_object()) throw groups.bad(gname.c_str(), "must be an object");
    const HfConfigReader g = groups.child(gname.c_str());
    HfQuantScheme s;
    s.targets = string_list(g, "targets");
    if (s.targets.empty()) throw g.bad("targets", "must list the modules the scheme applies to");
    s.format = text_or(g, "format", top);
    if (g.has("output_activations"))
      throw g.bad("output_activations", "is set; qforge reads compressed-tensors weights (output activation quantization "
                                        "is not read)");
    if (!g.has("weights") || !g.j["weights"].is_object()) throw g.bad("weights", "must be an object (the weight scheme)");
    const HfConfigReader w = g.child("weights");
    const std::string type = text_or(w, "type", "int");
    if (type != "int" && type != "float")
      throw w.bad("type", str("is '", type, "'; qforge reads int and float (fp8) compressed-tensors weights"));
    s.bits = static_cast<int>(int_key(w, "num_bits", std::nullopt));
    s.symmetric = w.bool_or("symmetric", true);
    const std::string strategy = text_or(w, "strategy", "");
    if (type == "float" || s.format == "float-quantized") {
      read_fp8_scheme(g, w, type, strategy, s);
      q.groups.push_back(std::move(s));
      continue;
    }
    if (g.has("input_activations"))
      throw g.bad("input_activations", "is set on an integer scheme; qforge reads weight-only integer compressed-tensors "
                                       "checkpoints (W8A8 int activation quantization is not simulated)");
    if (strategy == "group") {
      s.group_size = group_key(w, "group_size", std::nullopt);
      if (s.group_size < 0) throw w.bad("group_size", "is -1 with strategy group");
    } else if (strategy == "channel") {
      s.group_size = -1;
    } else {
      throw w.bad("strategy", str("is '", strategy, "'; qforge reads strategy group or channel"));
    }
    if (s.format == "pack-quantized") {
      if (s.bits != 4 && s.bits != 8) throw w.bad("num_bits", str("is ", s.bits, "; pack-quantized is read for 4 and 8 bits"));
    } else if (s.format == "int-quantized") {
      if (s.bits != 8) throw w.bad("num_bits", str("is ", s.bits, "; int-quantized is read for 8-bit weights"));
    } else {
      throw g.bad("format", str("is '", s.format, "'; qforge reads compressed-tensors formats pack-quantized, "
                                "int-quantized and float-quantized (marlin-24, nvfp4, sparse formats are not read)"));
    }
    q.groups.push_back(std::move(s));
  }
  q.skip = string_list(r, "ignore");
}

void read_bnb(const HfConfigReader& r, HfQuant& q) {
  const bool in4 = r.bool_or("load_in_4bit", false), in8 = r.bool_or("load_in_8bit", false);
  if (in4 && in8) throw r.bad("load_in_8bit", "is true and so is 'load_in_4bit'; a bitsandbytes checkpoint is one or the other");
  if (in8) {  // LLM.int8: per linear an int8 `weight` (Int8Params' CB) and fp32 `SCB`
    q.method = HfQuantMethod::Bnb8;
    q.bits = 8;
    if (r.bool_or("llm_int8_has_fp16_weight", false))
      throw r.bad("llm_int8_has_fp16_weight", "is true: the linears were kept in float16 (trained in place), not stored as "
                                              "int8; qforge reads load_in_8bit checkpoints with llm_int8_has_fp16_weight false");
    q.bnb_int8_threshold = r.f64_or("llm_int8_threshold", 6.0);
    if (!(q.bnb_int8_threshold >= 0)) throw r.bad("llm_int8_threshold", str("is ", q.bnb_int8_threshold, "; must be >= 0"));
    q.skip = string_list(r, "llm_int8_skip_modules");
    return;
  }
  if (!in4)
    throw r.bad("load_in_4bit", "is not true (nor 'load_in_8bit'); qforge reads bitsandbytes checkpoints saved with "
                                "load_in_4bit or load_in_8bit");
  q.bits = 4;
  q.bnb_quant_type = lower(text_or(r, "bnb_4bit_quant_type", "fp4"));
  if (q.bnb_quant_type != "nf4" && q.bnb_quant_type != "fp4")
    throw r.bad("bnb_4bit_quant_type", str("is '", q.bnb_quant_type, "'; bitsandbytes' 4-bit types are nf4 and fp4"));
  q.bnb_double_quant = r.bool_or("bnb_4bit_use_double_quant", false);
  const std::string storage = lower(text_or(r, "bnb_4bit_quant_storage", "uint8"));
  if (storage != "uint8")
    throw r.bad("bnb_4bit_quant_storage", str("is '", storage, "'; qforge reads 4-bit codes stored as uint8 (the default)"));
  q.skip = string_list(r, "llm_int8_skip_modules");
}

}  // namespace

std::string HfQuant::describe() const {
  switch (method) {
    case HfQuantMethod::None:
      return "float";
    case HfQuantMethod::Gptq:
      return str("gptq int", bits, group_size < 0 ? std::string(" per channel") : str(" group ", group_size),
                 symmetric ? " sym" : " asym", desc_act ? " desc_act" : "", " (checkpoint_format ",
                 zeros_v2 ? "gptq_v2" : "gptq", ")");
    case HfQuantMethod::Awq:
      return str("awq int", bits, " group ", group_size, symmetric ? "" : " zero_point", " (gemm)");
    case HfQuantMethod::Bnb4:
      return str("bitsandbytes 4-bit ", bnb_quant_type, bnb_double_quant ? " double quant" : "");
    case HfQuantMethod::Bnb8:
      return str("bitsandbytes 8-bit LLM.int8 (threshold ", bnb_int8_threshold, ")");
    case HfQuantMethod::CompressedTensors: {
      std::string s = "compressed-tensors";
      for (auto& g : groups)
        s += g.fp8() ? str(" float-quantized fp8-e4m3 per ", g.fp8_strategy == "block" ? str("block ", g.block_rows, "x", g.block_cols)
                                                                                        : g.fp8_strategy,
                           g.activations.empty() ? std::string() : str(" (input activations ", g.activations, ": not applied)"))
                     : str(" ", g.format, " int", g.bits, g.group_size < 0 ? std::string(" per channel") : str(" group ", g.group_size),
                           g.symmetric ? " sym" : " asym");
      return s;
    }
  }
  return "?";
}

HfQuant parse_hf_quant(const nlohmann::json& j, const std::string& path) {
  HfQuant q;
  QF_CHECK_INPUT(j.is_object(), path, ": 'quantization_config' must be an object");
  const HfConfigReader r{j, path + ": quantization_config"};
  return json_file::interpret(path, [&] {
    const std::string method = lower(text_or(r, "quant_method", ""));
    if (method == "gptq") {
      q.method = HfQuantMethod::Gptq;
      read_gptq(r, q);
    } else if (method == "awq") {
      q.method = HfQuantMethod::Awq;
      read_awq(r, q);
    } else if (method == "compressed-tensors") {
      q.method = HfQuantMethod::CompressedTensors;
      read_compressed(r, q);
    } else if (method == "bitsandbytes") {
      q.method = HfQuantMethod::Bnb4;
      read_bnb(r, q);
    } else {
      throw r.bad("quant_method", str("is '", method, "', which qforge does not read; ", kQuantRead));
    }
    return q;
  });
}

InputError HfConfigReader::bad(const char* k, const std::string& why) const {
  return InputError(str(path, ": '", k, "' ", why));
}

int64_t HfConfigReader::i64(const char* k) const {
  if (!has(k)) throw bad(k, "is missing");
  if (!j[k].is_number_integer() || (j[k].is_number_unsigned() && j[k].get<uint64_t>() > kMaxSize) ||
      j[k].get<int64_t>() <= 0 || j[k].get<int64_t>() > kMaxSize)
    throw bad(k, str("must be a positive integer (at most ", kMaxSize, ")"));
  return j[k].get<int64_t>();
}

double HfConfigReader::f64_or(const char* k, double def) const {
  if (!has(k)) return def;
  if (!j[k].is_number()) throw bad(k, "must be a number");
  return j[k].get<double>();
}

double HfConfigReader::pos_f64_or(const char* k, double def) const {
  const double v = f64_or(k, def);
  if (!(v > 0.0) || !std::isfinite(v)) throw bad(k, "must be a positive number");
  return v;
}

bool HfConfigReader::bool_or(const char* k, bool def) const {
  if (!has(k)) return def;
  if (!j[k].is_boolean()) throw bad(k, "must be true or false");
  return j[k].get<bool>();
}

// json::value throws type_error on a non-string; json_file::interpret (around every reader) turns it
// into "<file>: '<key>': expected a string, found ...".
std::string HfConfigReader::string_or(const char* k, const std::string& def) const { return j.value(k, def); }

HfConfigReader HfConfigReader::child(const char* k) const { return HfConfigReader(j[k], path + ": " + k); }

HfConfig parse_hf_config(const std::string& text, const std::string& cpath) {
  HfConfig ck;
  const json j = json_file::parse(text, cpath);
  QF_CHECK_INPUT(j.is_object(), cpath, ": expected a JSON object");
  HfConfigReader c{j, cpath};
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  const ArchSpec* spec = arch_for_hf(arch);
  QF_CHECK_INPUT(spec, cpath, ": architecture '", arch, "' is not supported; qforge loads ", hf_architectures_list());
  ck.architecture = arch;
  for (const char* k : {"torch_dtype", "dtype"})
    QF_CHECK_INPUT(!j.contains(k) || j[k].is_null() || j[k].is_string(), cpath, ": '", k, "' must be a string such as \"bfloat16\"");
  ck.torch_dtype = "float32";
  for (const char* k : {"dtype", "torch_dtype"})  // torch_dtype wins when both are there
    if (j.contains(k) && j[k].is_string()) ck.torch_dtype = j[k].get<std::string>();
  // A key of the wrong JSON type (e.g. "hidden_act": 3): "<file>: 'hidden_act': expected a string, found a number".
  ck.config = json_file::interpret(cpath, [&] {
    ModelConfig m = read_common(c, *spec);
    spec->read_hf(c, arch, m, ck.notes);
    return m;
  });
  if (j.contains("quantization_config") && !j["quantization_config"].is_null())
    ck.quant = parse_hf_quant(j["quantization_config"], cpath);
  return ck;
}

}  // namespace qf::models
