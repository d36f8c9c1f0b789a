#include "models/hf_config.h"

#include <cmath>
#include <cstdint>

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

}  // namespace

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
  return ck;
}

}  // namespace qf::models
