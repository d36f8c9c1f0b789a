#include "models/hf_quantized.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/error.h"
#include "core/safetensors.h"
#include "core/strings.h"

namespace qf::models {

namespace packed {

namespace {
// Unsigned words (int64 in [0, 2^32)) as the int32 tensor holding the same bits.
at::Tensor as_int32_bits(const at::Tensor& words) {
  return at::where(words.ge(int64_t{1} << 31), words - (int64_t{1} << 32), words).to(at::kInt).contiguous();
}
}  // namespace

at::Tensor pack_cols(const at::Tensor& u, int bits) {
  if (32 % bits) {  // one bit stream: code k of each 32 at bit bits*k of `bits` words, low word first
    auto b = u.to(at::kLong).unsqueeze(-1).__rshift__(at::arange(bits, at::kLong)).bitwise_and(1);  // [rows, cols, bits]
    auto words = b.reshape({u.size(0), -1, 32}).__lshift__(at::arange(32, at::kLong)).sum(-1);
    return as_int32_bits(words);
  }
  const int64_t pf = 32 / bits;
  auto v = u.to(at::kLong).reshape({u.size(0), u.size(1) / pf, pf});
  return as_int32_bits(v.__lshift__(at::arange(pf, at::kLong).mul(bits)).sum(-1));  // [rows, cols/pf]
}

at::Tensor unpack_cols(const at::Tensor& w, int bits) {
  auto v = w.to(at::kLong).bitwise_and(0xFFFFFFFFLL).unsqueeze(-1);
  if (32 % bits) {
    auto b = v.__rshift__(at::arange(32, at::kLong)).bitwise_and(1).reshape({w.size(0), -1, bits});  // the bit stream
    return b.__lshift__(at::arange(bits, at::kLong)).sum(-1);
  }
  const int64_t pf = 32 / bits;
  return v.__rshift__(at::arange(pf, at::kLong).mul(bits)).bitwise_and((int64_t{1} << bits) - 1).reshape({w.size(0), -1});
}

namespace {
constexpr std::array<int64_t, 8> kAwqOrder{0, 2, 4, 6, 1, 3, 5, 7};    // nibble i <- column kAwqOrder[i]
constexpr std::array<int64_t, 8> kAwqReverse{0, 4, 1, 5, 2, 6, 3, 7};  // column j <- nibble kAwqReverse[j]
at::Tensor index(const std::array<int64_t, 8>& a) { return at::tensor(std::vector<int64_t>(a.begin(), a.end()), at::kLong); }
}  // namespace

at::Tensor pack_awq(const at::Tensor& u) {
  auto v = u.to(at::kLong).reshape({u.size(0), u.size(1) / 8, 8}).index_select(2, index(kAwqOrder));
  return as_int32_bits(v.__lshift__(at::arange(8, at::kLong).mul(4)).sum(-1));
}

at::Tensor unpack_awq(const at::Tensor& w) {
  auto v = w.to(at::kLong).bitwise_and(0xFFFFFFFFLL).unsqueeze(-1);
  auto nib = v.__rshift__(at::arange(8, at::kLong).mul(4)).bitwise_and(15);  // [rows, words, 8] by nibble
  return nib.index_select(2, index(kAwqReverse)).reshape({w.size(0), -1});
}

}  // namespace packed

namespace {



int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_float(st::DType d) { return d == st::DType::F32 || d == st::DType::F16 || d == st::DType::BF16; }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

const char* method_name(HfQuantMethod m) {
  return m == HfQuantMethod::Gptq ? "GPTQ" : m == HfQuantMethod::Awq ? "AWQ" : m == HfQuantMethod::Bnb4 ? "bitsandbytes 4-bit" : m == HfQuantMethod::Bnb8 ? "bitsandbytes 8-bit" : "compressed-tensors";
}

// The compressed-tensors scheme that targets `linear`: an exact name first, then "re:" patterns,
// then the class name "Linear" (compressed-tensors' own precedence).
const HfQuantScheme* ct_scheme(const HfQuant& q, const std::string& linear) {
  for (auto& g : q.groups)
    for (auto& t : g.targets)
      if (t == linear) return &g;
  for (auto& g : q.groups)
    for (auto& t : g.targets)
      if (t.rfind("re:", 0) == 0 && std::regex_match(linear, std::regex(t.substr(3)))) return &g;
  for (auto& g : q.groups)
    for (auto& t : g.targets)
      if (t == "Linear") return &g;
  return nullptr;
}

// One linear's parts as the format defines them, checked as a list of problems.
struct Checker {
  const std::string& linear;
  const QuantizedParts& parts;
  std::vector<std::string> problems;
  const char* what;  // "GPTQ", ...

  const QuantizedPart* need(const std::string& part, const char* holds) {
    auto it = parts.find(part);
    if (it != parts.end()) return &it->second;
    std::string file = parts.empty() ? std::string("the checkpoint") : parts.begin()->second.file;
    problems.push_back(str(file, ": tensor '", linear, ".", part, "' is missing (", what, " stores ", holds, " per linear)"));
    return nullptr;
  }
  void dtype(const QuantizedPart* p, const std::string& part, bool ok, const char* want) {
    if (p && !ok)
      problems.push_back(str(p->file, ": tensor '", linear, ".", part, "' has dtype ", st::info(p->entry.dtype).name,
                             ", expected ", want));
  }
  void shape(const QuantizedPart* p, const std::string& part, const std::vector<int64_t>& want, const std::string& rule) {
    if (p && p->entry.shape != want)
      problems.push_back(str(p->file, ": tensor '", linear, ".", part, "' has shape ", shape_str(p->entry.shape), "; ",
                             rule, " gives ", shape_str(want)));
  }
};

std::string group_rule(int64_t group, int64_t in, int64_t groups) {
  return group < 0 ? str("group_size -1 (per channel) has 1 group") : str("group_size ", group, " over in_features ", in,
                                                                           " gives ", groups, " groups, so [groups, ...]");
}

// qweight / qzeros (int32 words) and scales (float), shaped as the format packs them: the parts
// GPTQ and AWQ share. `words` is the qweight shape, `zero_words` the qzeros columns.
void check_words_zeros_scales(Checker& c, const char* holds, const std::vector<int64_t>& words, const std::string& words_rule,
                              int64_t groups, int64_t zero_words, const std::string& grule, int64_t out) {
  auto* qw = c.need("qweight", holds);
  auto* qz = c.need("qzeros", holds);
  auto* sc = c.need("scales", holds);
  c.dtype(qw, "qweight", qw && qw->entry.dtype == st::DType::I32, "I32");
  c.dtype(qz, "qzeros", qz && qz->entry.dtype == st::DType::I32, "I32");
  c.dtype(sc, "scales", sc && is_float(sc->entry.dtype), "a float type");
  c.shape(qw, "qweight", words, words_rule);
  c.shape(qz, "qzeros", {groups, zero_words}, "qzeros is inconsistent with the group size: " + grule);
  c.shape(sc, "scales", {groups, out}, "scales is inconsistent with the group size: " + grule + " [groups, out]");
}

std::vector<std::string> check_gptq(const HfQuant& q, const std::string& linear, int64_t out, int64_t in, Checker& c) {
  // Codes tile whole words: pf codes per word (2, 4, 8 bits), or 32 codes per 3 words (3 bits).
  const int64_t pf = 32 % q.bits ? 32 : 32 / q.bits;
  const int64_t groups = q.group_size < 0 ? 1 : ceil_div(in, q.group_size);
  const std::string file = c.parts.empty() ? std::string() : c.parts.begin()->second.file;
  if (in % pf != 0 || out % pf != 0) {
    c.problems.push_back(str(file, ": ", linear, " [", out, ", ", in, "] cannot hold ", q.bits, "-bit GPTQ codes: in and out "
                             "features must be multiples of ", pf, " (", pf, " codes per ", 32 % q.bits ? "3 int32 words" : "int32 word", ")"));
    return c.problems;
  }
  check_words_zeros_scales(c, "qweight, qzeros, scales and g_idx", {in * q.bits / 32, out},
                           str("qweight packs ", q.bits, "-bit codes into int32 words along the input: [in*bits/32, out] "
                               "for the linear's in ", in, ", out ", out),
                           groups, out * q.bits / 32, group_rule(q.group_size, in, groups) + " [groups, out*bits/32]", out);
  if (auto it = c.parts.find("g_idx"); it != c.parts.end()) {
    c.dtype(&it->second, "g_idx", it->second.entry.dtype == st::DType::I32 || it->second.entry.dtype == st::DType::I64, "I32");
    c.shape(&it->second, "g_idx", {in}, "g_idx maps each input column to its group: [in]");
  } else if (q.desc_act) {
    c.need("g_idx", "g_idx (desc_act true: the column -> group map)");
  }
  return c.problems;
}

std::vector<std::string> check_awq(const HfQuant& q, const std::string& linear, int64_t out, int64_t in, Checker& c) {
  const std::string file = c.parts.empty() ? std::string() : c.parts.begin()->second.file;
  if (out % 8 != 0 || in % q.group_size != 0) {
    c.problems.push_back(str(file, ": ", linear, " [", out, ", ", in, "] cannot hold AWQ GEMM codes: out features must be a "
                             "multiple of 8 and group_size ", q.group_size, " must divide in features"));
    return c.problems;
  }
  const int64_t groups = in / q.group_size;
  check_words_zeros_scales(c, "qweight, qzeros and scales", {in, out / 8},
                           str("AWQ GEMM packs 8 4-bit codes per int32 along the output: [in, out/8] for the linear's in ", in,
                               ", out ", out),
                           groups, out / 8, group_rule(q.group_size, in, groups) + " [groups, out/8]", out);
  return c.problems;
}

// The weight_scale shape of an fp8 scheme over a linear [out, in].
std::vector<int64_t> fp8_scale_shape(const HfQuantScheme& s, int64_t out, int64_t in) {
  if (s.fp8_strategy == "channel") return {out, 1};
  if (s.fp8_strategy == "block") return {ceil_div(out, s.block_rows), ceil_div(in, s.block_cols)};
  return {1};
}

// float-quantized: weight F8_E4M3 [out, in], weight_scale float shaped by the strategy; input_scale /
// input_zero_point (static activations) are floats read for nothing but their dtype.
void check_ct_fp8(const HfQuantScheme& s, int64_t out, int64_t in, Checker& c) {
  auto* w = c.need("weight", "weight (float8_e4m3fn) and weight_scale");
  auto* ws = c.need("weight_scale", "weight (float8_e4m3fn) and weight_scale");
  c.dtype(w, "weight", w && w->entry.dtype == st::DType::F8_E4M3, "F8_E4M3 (float8_e4m3fn: format float-quantized, 8 bits)");
  c.shape(w, "weight", {out, in}, "float-quantized stores fp8 codes [out, in]");
  c.dtype(ws, "weight_scale", ws && is_float(ws->entry.dtype), "a float type");
  const auto want = fp8_scale_shape(s, out, in);
  const bool tensor_scalar = s.fp8_strategy == "tensor" && ws && ws->entry.shape.empty();  // [] and [1] are one scale
  if (!tensor_scalar)
    c.shape(ws, "weight_scale", want,
            s.fp8_strategy == "block" ? str("strategy block ", s.block_rows, "x", s.block_cols, " over [", out, ", ", in,
                                            "] gives [ceil(out/", s.block_rows, "), ceil(in/", s.block_cols, ")]")
                                      : str("strategy ", s.fp8_strategy, " gives ", s.fp8_strategy == "channel" ? "[out, 1]" : "[1]"));
  if (c.parts.count("weight_zero_point"))
    c.problems.push_back(str(c.parts.at("weight_zero_point").file, ": tensor '", c.linear, ".weight_zero_point' is set, "
                             "but fp8 weights are symmetric (config.json's scheme says symmetric true)"));
  for (const char* part : {"input_scale", "input_zero_point"})
    if (auto it = c.parts.find(part); it != c.parts.end())
      c.dtype(&it->second, part, is_float(it->second.entry.dtype) || it->second.entry.dtype == st::DType::F8_E4M3, "a float type");
}

std::vector<std::string> check_ct(const HfQuant& q, const std::string& linear, int64_t out, int64_t in, Checker& c) {
  const std::string file = c.parts.empty() ? std::string() : c.parts.begin()->second.file;
  const HfQuantScheme* s = ct_scheme(q, linear);
  if (!s) {
    c.problems.push_back(str(file, ": ", linear, " holds packed tensors but no config_groups entry targets it"));
    return c.problems;
  }
  if (s->fp8()) {
    check_ct_fp8(*s, out, in, c);
    return c.problems;
  }
  const int64_t groups = s->group_size < 0 ? 1 : ceil_div(in, s->group_size);
  const std::string grule = group_rule(s->group_size, in, groups);
  if (s->format == "pack-quantized") {
    const int64_t pf = 32 / s->bits;
    auto* wp = c.need("weight_packed", "weight_packed, weight_scale and weight_shape");
    auto* ws = c.need("weight_scale", "weight_packed, weight_scale and weight_shape");
    auto* sh = c.need("weight_shape", "weight_packed, weight_scale and weight_shape");
    c.dtype(wp, "weight_packed", wp && wp->entry.dtype == st::DType::I32, "I32");
    c.dtype(ws, "weight_scale", ws && is_float(ws->entry.dtype), "a float type");
    c.dtype(sh, "weight_shape", sh && (sh->entry.dtype == st::DType::I64 || sh->entry.dtype == st::DType::I32), "I64");
    c.shape(sh, "weight_shape", {2}, "weight_shape holds [out, in]");
    c.shape(wp, "weight_packed", {out, ceil_div(in, pf)},
            str("pack-quantized packs ", pf, " ", s->bits, "-bit codes per int32 along the input: [out, ceil(in*bits/32)] for "
                "the linear's in ", in, ", out ", out));
    c.shape(ws, "weight_scale", {out, groups}, str("weight_scale is inconsistent with the group size: ", grule, " [out, groups]"));
    if (auto it = c.parts.find("weight_zero_point"); it != c.parts.end()) {
      const auto& e = it->second.entry;
      const bool packed = e.dtype == st::DType::I32 && e.shape == std::vector<int64_t>{ceil_div(out, pf), groups};
      const bool plain = (e.dtype == st::DType::I8 || e.dtype == st::DType::I32) && e.shape == std::vector<int64_t>{out, groups};
      if (!packed && !plain)
        c.problems.push_back(str(it->second.file, ": tensor '", linear, ".weight_zero_point' has shape ", shape_str(e.shape),
                                 " dtype ", st::info(e.dtype).name, "; weight_zero_point is inconsistent with the group size: ",
                                 grule, " I32 [ceil(out*bits/32), groups] (packed along the output) or [out, groups]"));
    } else if (!s->symmetric) {
      c.need("weight_zero_point", "weight_zero_point (symmetric false)");
    }
  } else {  // int-quantized int8
    auto* w = c.need("weight", "weight (int8) and weight_scale");
    auto* ws = c.need("weight_scale", "weight (int8) and weight_scale");
    c.dtype(ws, "weight_scale", ws && is_float(ws->entry.dtype), "a float type");
    c.shape(w, "weight", {out, in}, "int-quantized stores int8 codes [out, in]");
    c.shape(ws, "weight_scale", {out, groups}, str("weight_scale is inconsistent with the group size: ", grule, " [out, groups]"));
    if (auto it = c.parts.find("weight_zero_point"); it != c.parts.end())
      c.shape(&it->second, "weight_zero_point", {out, groups},
              str("weight_zero_point is inconsistent with the group size: ", grule, " [out, groups]"));
    else if (!s->symmetric)
      c.need("weight_zero_point", "weight_zero_point (symmetric false)");
  }
  if (auto it = c.parts.find("weight_g_idx"); it != c.parts.end()) c.shape(&it->second, "weight_g_idx", {in}, "[in]");
  return c.problems;
}

// g_idx (GPTQ, compressed-tensors actorder) as int64 [in], every entry a group index.
at::Tensor checked_g_idx(const QuantizedPart& p, const std::string& linear, const std::string& part, const at::Tensor& t,
                         int64_t groups) {
  auto g = t.to(at::kLong);
  const int64_t lo = g.numel() ? g.min().item<int64_t>() : 0, hi = g.numel() ? g.max().item<int64_t>() : 0;
  QF_CHECK_INPUT(lo >= 0 && hi < groups, p.file, ": tensor '", linear, ".", part, "' has entries in [", lo, ", ", hi,
                 "], outside [0, ", groups, "): each input column's group must be one of the ", groups,
                 " groups the scales hold");
  return g;
}

// GPTQ qzeros as unsigned words holding z (int64 in [0, 2^32)): v1 files store z - 1 per code, which
// gptqmodel's convert_gptq_v1_to_v2_format undoes by one int32 add of 1 per code (0x11111111 for 4
// bits, 0x01010101 for 8), wrapping like the int32 tensor it adds to (carries included).
// 3-bit words are converted by gptqmodel (utils/model.py convert_gptq_v1_to_v2_format_module) with one
// constant per word position in each 3-word run: 0x24924924, 0x92492492, 0x49249249 (its values,
// copied as data; its v2 -> v1 save subtracts the same ones). The first and the last do not add 1 at
// each code's low bit: a 3-bit v1 file reads as gptqmodel reads it, not as z = stored + 1.
at::Tensor gptq_zero_words(const HfQuant& q, const at::Tensor& qzeros) {
  auto zw = qzeros.to(at::kLong).bitwise_and(0xFFFFFFFFLL);
  if (q.zeros_v2) return zw;
  if (q.bits == 3) {
    auto add = at::tensor({int64_t{0x24924924}, int64_t{0x92492492}, int64_t{0x49249249}}, at::kLong)
                   .repeat({ceil_div(zw.size(1), 3)}).slice(0, 0, zw.size(1));
    return zw.add(add).bitwise_and(0xFFFFFFFFLL);
  }
  int64_t one_each = 0;
  for (int k = 0; k < 32 / q.bits; ++k) one_each |= int64_t{1} << (q.bits * k);
  return zw.add(one_each).bitwise_and(0xFFFFFFFFLL);
}

int64_t groups_of(const HfQuant& q, const std::string& linear, int64_t in) {
  int64_t gs = q.group_size;
  if (q.method == HfQuantMethod::CompressedTensors) gs = ct_scheme(q, linear)->group_size;
  return gs < 0 ? 1 : ceil_div(in, gs);
}


// bitsandbytes get_4bit_type: nf4 as listed; fp4 = {0, 0.0625, 8, 12, 4, 6, 2, 3, -...} / 12 in fp32.
const std::array<float, 16>& bnb_code(const std::string& type) {
  static const std::array<float, 16> nf4 = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  static const std::array<float, 16> fp4 = [] {
    const float raw[16] = {0, 0.0625f, 8, 12, 4, 6, 2, 3, 0, -0.0625f, -8, -12, -4, -6, -2, -3};
    std::array<float, 16> a{};
    volatile float twelve = 12.0f;  // one fp32 division each, as torch's data /= data.abs().max()
    for (int i = 0; i < 16; ++i) a[i] = raw[i] / twelve;
    return a;
  }();
  return type == "nf4" ? nf4 : fp4;
}

bool bnb_block_ok(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

std::vector<std::string> check_bnb(const std::string& linear, int64_t out, int64_t in, Checker& c) {
  const char* holds = "weight (uint8 codes), weight.absmax, weight.quant_map and weight.quant_state.bitsandbytes__<type>";
  auto name = [&](const std::string& part) { return part == "weight" ? part : "weight." + part; };
  auto need = [&](const std::string& part) -> const QuantizedPart* {
    auto it = c.parts.find(part);
    if (it != c.parts.end()) return &it->second;
    const std::string file = c.parts.empty() ? std::string("the checkpoint") : c.parts.begin()->second.file;
    c.problems.push_back(str(file, ": tensor '", linear, ".", name(part), "' is missing (bitsandbytes 4-bit stores ", holds,
                             " per linear)"));
    return nullptr;
  };
  auto dtype = [&](const QuantizedPart* p, const std::string& part, bool ok, const char* want) {
    if (p && !ok)
      c.problems.push_back(str(p->file, ": tensor '", linear, ".", name(part), "' has dtype ", st::info(p->entry.dtype).name,
                               ", expected ", want));
  };
  auto numel = [](const QuantizedPart* p) {
    int64_t n = 1;
    for (auto d : p->entry.shape) n *= d;
    return n;
  };
  auto* w = need("weight");
  auto* qs = need("quant_state");
  auto* am = need("absmax");
  auto* qm = need("quant_map");
  dtype(w, "weight", w && w->entry.dtype == st::DType::U8, "U8 (bnb_4bit_quant_storage uint8)");
  if (w && w->entry.dtype == st::DType::U8 && numel(w) != ceil_div(out * in, 2))
    c.problems.push_back(str(w->file, ": tensor '", linear, ".weight' holds ", numel(w), " bytes, but the linear [", out, ", ",
                             in, "] packs 2 4-bit codes per byte into ceil(", out, "*", in, "/2) = ", ceil_div(out * in, 2)));
  if (qs) {
    dtype(qs, "quant_state", qs->entry.dtype == st::DType::U8, "U8 (the JSON bytes of the quant_state)");
    const std::string& n = qs->entry.name;
    const std::string type = n.substr(n.rfind("bitsandbytes__") == std::string::npos ? n.size() : n.rfind("bitsandbytes__") + 14);
    if (type != "nf4" && type != "fp4")
      c.problems.push_back(str(qs->file, ": tensor '", n, "': the quant_state key must end in bitsandbytes__nf4 or "
                               "bitsandbytes__fp4 (bitsandbytes' QuantState.valid_qs_type_keys)"));
  }
  const auto* nested = c.parts.count("nested_absmax") ? &c.parts.at("nested_absmax") : nullptr;
  dtype(am, "absmax", am && (nested ? am->entry.dtype == st::DType::U8 : is_float(am->entry.dtype)),
        nested ? "U8 (double quant: 8-bit codes of the block scales)" : "a float type (the block scales)");
  dtype(qm, "quant_map", qm && qm->entry.dtype == st::DType::F32 && numel(qm) == 16, "F32 [16] (the 4-bit code)");
  if (nested) {
    dtype(nested, "nested_absmax", is_float(nested->entry.dtype), "a float type");
    auto* nq = need("nested_quant_map");
    dtype(nq, "nested_quant_map", nq && nq->entry.dtype == st::DType::F32 && numel(nq) == 256, "F32 [256] (the 8-bit code)");
  }
  return c.problems;
}

// LLM.int8 (Linear8bitLt's state dict): weight int8 [out, in], SCB fp32 [out], optional weight_format (uint8 scalar).
std::vector<std::string> check_bnb8(int64_t out, int64_t in, Checker& c) {
  auto* w = c.need("weight", "weight (int8 [out, in]) and SCB (float32 [out])");
  auto* scb = c.need("SCB", "weight (int8 [out, in]) and SCB (float32 [out])");
  c.dtype(w, "weight", w && w->entry.dtype == st::DType::I8, "I8 (Int8Params' row-wise codes)");
  c.shape(w, "weight", {out, in}, "the linear [out, in]");
  c.dtype(scb, "SCB", scb && scb->entry.dtype == st::DType::F32, "F32 (one absmax per output row)");
  c.shape(scb, "SCB", {out}, "one scale per output row");
  if (c.parts.count("bnb4_part")) {
    const auto& p4 = c.parts.at("bnb4_part");
    c.problems.push_back(str(p4.file, ": tensor '", p4.entry.name, "' is a bitsandbytes 4-bit part (load_in_4bit), but "
                             "config.json's quantization_config says load_in_8bit (LLM.int8 stores weight int8 + SCB)"));
  }
  if (c.parts.count("weight_format")) {
    const auto* f = &c.parts.at("weight_format");
    c.dtype(f, "weight_format", f->entry.dtype == st::DType::U8, "U8 (bitsandbytes' weight format code)");
    c.shape(f, "weight_format", {}, "a scalar");
  }
  return c.problems;
}

}  // namespace

BnbQuantState bnb_quant_state(const std::string& linear, const QuantizedParts& parts,
                              const std::map<std::string, at::Tensor>& t, int64_t out, int64_t in) {
  const QuantizedPart& qp = parts.at("quant_state");
  const std::string where = str(qp.file, ": tensor '", qp.entry.name, "'");
  auto bytes = t.at("quant_state").contiguous();
  const std::string text(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(bytes.numel()));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  QF_CHECK_INPUT(j.is_object(), where, " is not the JSON object of a bitsandbytes quant_state (pack_dict_to_tensor)");
  auto bad = [&](const char* key, const std::string& why) { return InputError(str(where, ": quant_state '", key, "' ", why)); };
  auto text_key = [&](const char* key) {
    if (!j.contains(key) || !j[key].is_string()) throw bad(key, "is missing or not a string");
    return j[key].get<std::string>();
  };
  auto int_key = [&](const char* key) {
    if (!j.contains(key) || !j[key].is_number_integer()) throw bad(key, "is missing or not an integer");
    return j[key].get<int64_t>();
  };
  BnbQuantState s;
  s.quant_type = text_key("quant_type");
  if (s.quant_type != "nf4" && s.quant_type != "fp4") throw bad("quant_type", str("is '", s.quant_type, "'; nf4 or fp4"));
  if (qp.entry.name.size() < 3 || qp.entry.name.substr(qp.entry.name.size() - 3) != s.quant_type)
    throw bad("quant_type", str("is '", s.quant_type, "' but the tensor's key names another type"));
  s.blocksize = int_key("blocksize");
  if (!bnb_block_ok(s.blocksize))
    throw bad("blocksize", str("is ", s.blocksize, "; bitsandbytes' 4-bit block sizes are 32, 64, ..., 4096"));
  s.dtype = text_key("dtype");
  if (s.dtype != "float32" && s.dtype != "bfloat16" && s.dtype != "float16")
    throw bad("dtype", str("is '", s.dtype, "'; dequantize_4bit returns float32, bfloat16 or float16"));
  if (!j.contains("shape") || !j["shape"].is_array() || j["shape"].size() != 2 || !j["shape"][0].is_number_integer() ||
      !j["shape"][1].is_number_integer() || j["shape"][0].get<int64_t>() != out || j["shape"][1].get<int64_t>() != in)
    throw bad("shape", str("is ", j.contains("shape") ? j["shape"].dump() : std::string("missing"), " but the linear is [", out,
                           ", ", in, "] (config.json)"));
  const int64_t n = out * in, nblocks = ceil_div(n, s.blocksize);
  auto numel = [&](const char* part) { return t.count(part) ? t.at(part).numel() : -1; };
  if (numel("weight") >= 0 && numel("weight") != ceil_div(n, 2))
    throw InputError(str(parts.at("weight").file, ": tensor '", linear, ".weight' holds ", numel("weight"),
                         " bytes; the quant_state shape [", out, ", ", in, "] packs into ", ceil_div(n, 2)));
  if (numel("absmax") >= 0 && numel("absmax") != nblocks)
    throw InputError(str(parts.at("absmax").file, ": tensor '", linear, ".weight.absmax' has ", numel("absmax"),
                         " block scales; blocksize ", s.blocksize, " over ", n, " values gives ceil(", n, "/", s.blocksize,
                         ") = ", nblocks));
  s.nested = parts.count("nested_absmax") > 0;
  if (s.nested != j.contains("nested_blocksize"))
    throw bad("nested_blocksize", s.nested ? "is missing, but the linear has weight.nested_absmax (double quant)"
                                           : "is set, but the linear has no weight.nested_absmax tensor (double quant)");
  if (s.nested) {
    s.nested_blocksize = int_key("nested_blocksize");
    if (s.nested_blocksize <= 0) throw bad("nested_blocksize", str("is ", s.nested_blocksize, "; must be positive"));
    if (!j.contains("nested_offset") || !j["nested_offset"].is_number()) throw bad("nested_offset", "is missing or not a number");
    s.nested_offset = static_cast<float>(j["nested_offset"].get<double>());
    const int64_t want = ceil_div(nblocks, s.nested_blocksize);
    if (numel("nested_absmax") >= 0 && numel("nested_absmax") != want)
      throw InputError(str(parts.at("nested_absmax").file, ": tensor '", linear, ".weight.nested_absmax' has ",
                           numel("nested_absmax"), " scales; nested_blocksize ", s.nested_blocksize, " over ", nblocks,
                           " block scales gives ", want));
  }
  return s;
}

bool bnb_packed_nf4(const HfQuant& q, const std::string& linear, int64_t out, int64_t in, const QuantizedParts& parts,
                    const std::map<std::string, at::Tensor>& t, at::ScalarType model_dtype, PackedNf4& pk) {
  if (q.method != HfQuantMethod::Bnb4) return false;
  const BnbQuantState s = bnb_quant_state(linear, parts, t, out, in);
  const bool same = s.dtype == "float32" || (s.dtype == "bfloat16" && model_dtype == at::kBFloat16) ||
                    (s.dtype == "float16" && model_dtype == at::kHalf);
  if (s.quant_type != "nf4" || !same) return false;
  pk.packed = t.at("weight").reshape({-1}).clone();
  pk.absmax = s.nested ? t.at("absmax").reshape({-1}).clone() : t.at("absmax").reshape({-1}).to(at::kFloat).clone();
  if (s.nested) {
    pk.nested_absmax = t.at("nested_absmax").reshape({-1}).to(at::kFloat).clone();
    pk.nested_code = t.at("nested_quant_map").reshape({-1}).clone();
  }
  pk.offset = s.nested_offset;
  pk.blocksize = s.blocksize;
  pk.nested_blocksize = s.nested ? s.nested_blocksize : 256;
  pk.nested = s.nested;
  pk.shape = {out, in};
  return true;
}

void check_quantized_data(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                          const QuantizedParts& parts, const std::map<std::string, at::Tensor>& t) {
  if (q.method == HfQuantMethod::Bnb4) {
    if (t.count("quant_state")) bnb_quant_state(linear, parts, t, out, in);
    return;
  }
  if (q.method == HfQuantMethod::Bnb8) {
    if (t.count("weight_format")) {
      const int64_t f = t.at("weight_format").to(at::kLong).item<int64_t>();
      QF_CHECK_INPUT(f == 0, parts.at("weight_format").file, ": tensor '", linear, ".weight_format' is ", f,
                     "; bitsandbytes reads only format 0 (row-major int8 rows)");
    }
    return;
  }
  for (const char* part : {"g_idx", "weight_g_idx"})
    if (t.count(part)) checked_g_idx(parts.at(part), linear, part, t.at(part), groups_of(q, linear, in));
  if (t.count("weight_shape")) {
    auto shape = t.at("weight_shape").to(at::kLong).contiguous();
    const std::vector<int64_t> v(shape.data_ptr<int64_t>(), shape.data_ptr<int64_t>() + shape.numel());
    QF_CHECK_INPUT(v == std::vector<int64_t>({out, in}), parts.at("weight_shape").file, ": tensor '", linear,
                   ".weight_shape' holds ", shape_str(v), " but the linear is [", out, ", ", in, "] (config.json)");
  }
}

std::string quantized_part(const HfQuant& q, const std::string& name, st::DType dtype, std::string& linear) {
  static const std::vector<std::string> kGptq{"qweight", "qzeros", "scales", "g_idx"};
  static const std::vector<std::string> kAwq{"qweight", "qzeros", "scales"};
  static const std::vector<std::string> kCt{"weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                            "weight_g_idx", "input_scale", "input_zero_point"};
  if (q.method == HfQuantMethod::Bnb8) {
    for (const char* part : {"weight", "SCB", "weight_format"}) {
      const std::string suffix = std::string(".") + part;
      if (ends_with(name, suffix) && (std::string(part) != "weight" || !is_float(dtype))) {
        linear = name.substr(0, name.size() - suffix.size());
        return part;
      }
    }
    // A 4-bit part (weight.absmax, weight.quant_state.*, ...) under a load_in_8bit config: kept with its
    // linear so check_bnb8 names the mix-up once per linear.
    const auto w = name.rfind(".weight.");
    if (w == std::string::npos) return "";
    linear = name.substr(0, w);
    return "bnb4_part";
  }
  if (q.method == HfQuantMethod::Bnb4) {
    if (ends_with(name, ".weight") && dtype == st::DType::U8) {
      linear = name.substr(0, name.size() - 7);
      return "weight";
    }
    const auto w = name.rfind(".weight.");
    if (w == std::string::npos) return "";
    const std::string part = name.substr(w + 8);
    static const std::vector<std::string> kBnb{"absmax", "quant_map", "nested_absmax", "nested_quant_map"};
    const bool qs = part.rfind("quant_state.", 0) == 0;
    if (!qs && std::find(kBnb.begin(), kBnb.end(), part) == kBnb.end()) return "";
    linear = name.substr(0, w);
    return qs ? "quant_state" : part;
  }
  const auto dot = name.rfind('.');
  if (dot == std::string::npos || !q.quantized()) return "";
  const std::string part = name.substr(dot + 1);
  const auto& list = q.method == HfQuantMethod::Gptq ? kGptq : q.method == HfQuantMethod::Awq ? kAwq : kCt;
  const bool coded_weight = q.method == HfQuantMethod::CompressedTensors && part == "weight" &&
                            (dtype == st::DType::I8 || dtype == st::DType::F8_E4M3 || dtype == st::DType::F8_E5M2);
  if (!coded_weight && std::find(list.begin(), list.end(), part) == list.end()) return "";
  linear = name.substr(0, dot);
  return part;
}

std::vector<std::string> check_quantized_linear(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                                                const QuantizedParts& parts) {
  Checker c{linear, parts, {}, method_name(q.method)};
  switch (q.method) {
    case HfQuantMethod::Gptq:
      return check_gptq(q, linear, out, in, c);
    case HfQuantMethod::Awq:
      return check_awq(q, linear, out, in, c);
    case HfQuantMethod::CompressedTensors:
      return check_ct(q, linear, out, in, c);
    case HfQuantMethod::Bnb4:
      return check_bnb(linear, out, in, c);
    case HfQuantMethod::Bnb8:
      return check_bnb8(out, in, c);
    case HfQuantMethod::None:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "check_quantized_linear on a float checkpoint");
}

at::Tensor dequantize_linear(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                             const QuantizedParts& parts, const std::map<std::string, at::Tensor>& t) {
  auto get = [&](const std::string& part) {
    auto it = t.find(part);
    TORCH_INTERNAL_ASSERT(it != t.end(), "dequantize_linear: ", linear, ".", part, " was not loaded");
    return it->second;
  };
  if (q.method == HfQuantMethod::Bnb8) {  // int8_vectorwise_dequant
    check_quantized_data(q, linear, out, in, parts, t);
    return get("weight") * get("SCB").view({-1, 1}) * 7.874015718698502e-3;
  }
  if (q.method == HfQuantMethod::Bnb4) {
    const BnbQuantState s = bnb_quant_state(linear, parts, t, out, in);
    const int64_t n = out * in, nblocks = ceil_div(n, s.blocksize);
    at::Tensor scales;
    if (s.nested) {  // dequantize_blockwise (code2[a] * nested absmax, fp32), then += offset
      auto code2 = get("nested_quant_map").reshape({-1}).to(at::kFloat);
      auto nab = get("nested_absmax").reshape({-1}).to(at::kFloat).repeat_interleave(s.nested_blocksize).slice(0, 0, nblocks);
      scales = code2.index_select(0, get("absmax").reshape({-1}).to(at::kLong)).mul(nab);
      scales = scales.add(at::scalar_tensor(s.nested_offset, at::kFloat));
    } else {
      scales = get("absmax").reshape({-1}).to(at::kFloat);
    }
    const auto& code = bnb_code(s.quant_type);
    auto table = at::tensor(std::vector<float>(code.begin(), code.end()), at::kFloat);
    auto bytes = get("weight").reshape({-1});
    auto codes = at::stack({bytes.bitwise_right_shift(4), bytes.bitwise_and(15)}, 1).reshape({-1}).slice(0, 0, n);
    auto w = table.index_select(0, codes.to(at::kLong)).mul(scales.repeat_interleave(s.blocksize).slice(0, 0, n));
    const auto dt = s.dtype == "bfloat16" ? at::kBFloat16 : s.dtype == "float16" ? at::kHalf : at::kFloat;
    return w.to(dt).to(at::kFloat).reshape({out, in});
  }
  auto per_col = [](const at::Tensor& g_rows, const at::Tensor& g) { return g_rows.index_select(0, g).t(); };  // [G, out] -> [out, in]
  if (q.method == HfQuantMethod::Gptq) {
    const int64_t groups = q.group_size < 0 ? 1 : ceil_div(in, q.group_size);
    at::Tensor g = t.count("g_idx") ? checked_g_idx(parts.at("g_idx"), linear, "g_idx", get("g_idx"), groups)
                                    : at::arange(in, at::kLong).div(q.group_size < 0 ? in : q.group_size, "floor");
    auto u = packed::unpack_cols(get("qweight").t().contiguous(), q.bits);  // [out, in]
    auto z = packed::unpack_cols(gptq_zero_words(q, get("qzeros")), q.bits);  // [groups, out]
    auto s = get("scales").to(at::kFloat);      // [groups, out]
    return (u - per_col(z, g)).to(at::kFloat) * per_col(s, g);
  }
  if (q.method == HfQuantMethod::Awq) {
    const int64_t gs = q.group_size;
    auto u = packed::unpack_awq(get("qweight"));  // [in, out]
    auto z = packed::unpack_awq(get("qzeros"));   // [groups, out]
    auto s = get("scales").to(at::kFloat);
    return ((u - z.repeat_interleave(gs, 0)).to(at::kFloat) * s.repeat_interleave(gs, 0)).t().contiguous();
  }
  const HfQuantScheme& s = *ct_scheme(q, linear);
  if (s.fp8()) {  // compressed-tensors' dequantize: x_q.to(scale dtype) * scale, in the scale's dtype
    auto scale = get("weight_scale");
    if (s.fp8_strategy == "channel") scale = scale.reshape({out, 1});
    if (s.fp8_strategy == "block")
      scale = scale.repeat_interleave(s.block_rows, 0).repeat_interleave(s.block_cols, 1).slice(0, 0, out).slice(1, 0, in);
    if (s.fp8_strategy == "tensor") scale = scale.reshape({});
    return get("weight").to(scale.scalar_type()).mul(scale).to(at::kFloat);
  }
  const int64_t groups = s.group_size < 0 ? 1 : ceil_div(in, s.group_size);
  at::Tensor g = t.count("weight_g_idx")
                     ? checked_g_idx(parts.at("weight_g_idx"), linear, "weight_g_idx", get("weight_g_idx"), groups)
                     : at::arange(in, at::kLong).div(s.group_size < 0 ? in : s.group_size, "floor");
  auto scale = get("weight_scale").to(at::kFloat).t();  // [groups, out]
  at::Tensor codes, zp;                                  // signed codes [out, in]; signed zero points [groups, out]
  if (s.format == "pack-quantized") {
    check_quantized_data(q, linear, out, in, parts, t);
    const int64_t offset = int64_t{1} << (s.bits - 1);  // pack_to_int32 stores q + 2^(b-1)
    codes = packed::unpack_cols(get("weight_packed"), s.bits).slice(1, 0, in) - offset;
    if (t.count("weight_zero_point")) {
      auto zt = get("weight_zero_point");
      const bool plain = zt.scalar_type() == at::kChar || zt.size(0) != ceil_div(out, 32 / s.bits);  // [out, groups]
      zp = plain ? zt.to(at::kLong).t()  // signed values
                 : packed::unpack_cols(zt.t().contiguous(), s.bits).slice(1, 0, out) - offset;  // packed along the output
    }
  } else {
    codes = get("weight").to(at::kLong);
    if (t.count("weight_zero_point")) zp = get("weight_zero_point").to(at::kLong).t();
  }
  if (!zp.defined()) zp = at::zeros({groups, out}, at::kLong);
  return (codes - per_col(zp, g)).to(at::kFloat) * per_col(scale, g);
}

PackedInt packed_int(const HfQuant& q, const std::string& linear, int64_t out, int64_t in,
                     const std::map<std::string, at::Tensor>& t) {
  auto get = [&](const std::string& part) {
    auto it = t.find(part);
    TORCH_INTERNAL_ASSERT(it != t.end(), "packed_int: ", linear, ".", part, " was not loaded");
    return it->second;
  };
  QF_CHECK(q.method == HfQuantMethod::Gptq || q.method == HfQuantMethod::Awq || q.method == HfQuantMethod::CompressedTensors,
           "packed_int: ", linear, " is not a GPTQ / AWQ / compressed-tensors int linear (", q.describe(), ")");
  PackedInt p;
  at::Tensor u, z, g;  // codes [out, in], zero points [groups, out] (unsigned, int64), group of each column [in]
  if (q.method == HfQuantMethod::Gptq) {
    QF_CHECK(32 % q.bits == 0, "packed_int: ", linear, ": GPTQ int", q.bits, " codes do not tile an int32 word");
    p.bits = q.bits;
    u = packed::unpack_cols(get("qweight").t().contiguous(), q.bits);
    z = packed::unpack_cols(gptq_zero_words(q, get("qzeros")), q.bits).slice(1, 0, out);
    p.scales = get("scales").clone();
    g = t.count("g_idx") ? get("g_idx").to(at::kLong)
                         : at::arange(in, at::kLong).div(q.group_size < 0 ? in : q.group_size, "floor");
  } else if (q.method == HfQuantMethod::Awq) {
    p.bits = 4;
    u = packed::unpack_awq(get("qweight")).t();
    z = packed::unpack_awq(get("qzeros"));
    p.scales = get("scales").clone();
    g = at::arange(in, at::kLong).div(q.group_size, "floor");
  } else {
    const HfQuantScheme& s = *ct_scheme(q, linear);
    QF_CHECK(!s.fp8(), "packed_int: ", linear, " holds compressed-tensors fp8 weights, not int codes");
    QF_CHECK(32 % s.bits == 0, "packed_int: ", linear, ": compressed-tensors int", s.bits, " codes do not tile an int32 word");
    p.bits = s.bits;
    const int64_t offset = int64_t{1} << (s.bits - 1);  // signed codes and zero points -> unsigned
    const int64_t groups = s.group_size < 0 ? 1 : ceil_div(in, s.group_size);
    if (s.format == "pack-quantized") {
      u = packed::unpack_cols(get("weight_packed"), s.bits).slice(1, 0, in);  // stored as q + 2^(b-1)
      if (t.count("weight_zero_point")) {
        auto zt = get("weight_zero_point");
        const bool plain = zt.scalar_type() == at::kChar || zt.size(0) != ceil_div(out, 32 / s.bits);
        z = plain ? zt.to(at::kLong).t() + offset : packed::unpack_cols(zt.t().contiguous(), s.bits).slice(1, 0, out);
      }
    } else {
      u = get("weight").to(at::kLong) + offset;
      if (t.count("weight_zero_point")) z = get("weight_zero_point").to(at::kLong).t() + offset;
    }
    if (!z.defined()) z = at::full({groups, out}, offset, at::kLong);
    p.scales = get("weight_scale").t().contiguous().clone();
    g = t.count("weight_g_idx") ? get("weight_g_idx").to(at::kLong)
                                : at::arange(in, at::kLong).div(s.group_size < 0 ? in : s.group_size, "floor");
  }
  QF_CHECK_INPUT(z.min().item<int64_t>() >= 0 && z.max().item<int64_t>() < (int64_t{1} << p.bits), linear,
                 ": zero points outside the ", p.bits, "-bit code range cannot be kept packed");
  const int64_t pf = 32 / p.bits;
  auto pad = [&](const at::Tensor& a, int64_t cols) {  // zero codes up to whole words
    return cols % pf ? at::constant_pad_nd(a, {0, pf - cols % pf}) : a;
  };
  p.qweight = packed::pack_cols(pad(u, in), p.bits).t().contiguous();
  p.qzeros = packed::pack_cols(pad(z, out), p.bits);
  p.g_idx = g.to(at::kInt).clone();  // never a view of the file mapping
  p.group_size = contiguous_group_size(p, in);
  return p;
}

int64_t contiguous_group_size(const PackedInt& p, int64_t in) {
  const int64_t groups = p.scales.size(0);
  if (groups <= 0 || in % groups != 0) return 0;
  const int64_t gs = in / groups;
  auto want = at::arange(in, p.g_idx.options().dtype(at::kLong)).div(gs, "floor");
  return at::equal(p.g_idx.to(at::kLong), want) ? gs : 0;
}

at::Tensor dequantize_packed_int(const PackedInt& p, int64_t out, int64_t in) {
  if (!p.qweight.device().is_cpu()) return dequantize_packed_int_aten(p, out, in);
  const int bits = p.bits;
  const int64_t pf = 32 / bits, rows = p.qweight.size(0), groups = p.scales.size(0), zcols = p.qzeros.size(1);
  const uint32_t mask = (1u << bits) - 1;
  // Per (group, output) zero point and scale as floats, decoded once: (float(u) - z) * s equals
  // float(u - z) * s bit for bit (both sides of the subtraction are small exact integers).
  auto sf = p.scales.to(at::kFloat).contiguous();
  auto zf = at::empty({groups, out}, at::kFloat);
  {
    auto qz = p.qzeros.contiguous();
    const uint32_t* zs = reinterpret_cast<const uint32_t*>(qz.data_ptr<int32_t>());
    float* zd = zf.data_ptr<float>();
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t o = 0; o < out; ++o) zd[g * out + o] = static_cast<float>((zs[g * zcols + o / pf] >> (bits * (o % pf))) & mask);
  }
  auto qw = p.qweight.contiguous();
  auto gi = p.g_idx.to(at::kInt).contiguous();
  auto w = at::empty({out, in}, at::kFloat);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>());
  const int32_t* gidx = gi.data_ptr<int32_t>();
  const float* zd = zf.data_ptr<float>();
  const float* sd = sf.data_ptr<float>();
  float* dst = w.data_ptr<float>();
  // Contiguous groups that hold whole words: one zero point and scale per word (no g_idx lookups).
  const int64_t gs = p.group_size > 0 && p.group_size % pf == 0 ? p.group_size : 0;
  constexpr int64_t kRows = 16;  // output rows per task: 16 consecutive words of each packed row (one cache line)
  at::parallel_for(0, (out + kRows - 1) / kRows, 1, [&](int64_t b, int64_t e) {
    for (int64_t o0 = b * kRows; o0 < std::min(out, e * kRows); o0 += kRows)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i0 = r * pf, n = std::min(pf, in - i0);
        for (int64_t o = o0; o < std::min(out, o0 + kRows); ++o) {
          const uint32_t word = src[r * out + o];
          float* row = dst + o * in + i0;
          if (gs) {
            const int64_t at = (i0 / gs) * out + o;
            const float z = zd[at], sc = sd[at];
            for (int64_t j = 0; j < n; ++j) row[j] = (static_cast<float>((word >> (bits * j)) & mask) - z) * sc;
          } else {
            for (int64_t j = 0; j < n; ++j) {
              const int64_t at = gidx[i0 + j] * out + o;
              row[j] = (static_cast<float>((word >> (bits * j)) & mask) - zd[at]) * sd[at];
            }
          }
        }
      }
  });
  return w;
}

at::Tensor dequantize_packed_int_aten(const PackedInt& p, int64_t out, int64_t in) {
  const int64_t pf = 32 / p.bits;
  const auto opts = p.qweight.options();
  auto shifts = at::arange(0, 32, p.bits, opts);  // int32 on the tensors' device
  const int32_t mask = (1 << p.bits) - 1;           // arithmetic shifts: the sign bits are masked off
  auto u = p.qweight.unsqueeze(1).__rshift__(shifts.view({1, pf, 1})).bitwise_and(mask).reshape({-1, out}).slice(0, 0, in);
  auto z = p.qzeros.unsqueeze(-1).__rshift__(shifts).bitwise_and(mask).reshape({p.qzeros.size(0), -1}).slice(1, 0, out);
  if (p.group_size > 0) {  // contiguous groups: each group's zero point and scale broadcast over its columns
    const int64_t groups = in / p.group_size;
    auto w = (u.view({groups, p.group_size, out}) - z.unsqueeze(1)).to(at::kFloat).mul_(p.scales.to(at::kFloat).unsqueeze(1));
    return w.view({in, out}).t();
  }
  auto g = p.g_idx.to(at::kLong);
  auto w = (u - z.index_select(0, g)).to(at::kFloat).mul(p.scales.to(at::kFloat).index_select(0, g));  // [in, out]
  return w.t();
}

std::string describe_quantized_linear(const HfQuant& q, const std::string& linear, const QuantizedParts& parts) {
  if (q.method == HfQuantMethod::Bnb4) {
    const std::string& n = parts.count("quant_state") ? parts.at("quant_state").entry.name : std::string("?");
    return str("bitsandbytes 4-bit ", n.substr(n.size() >= 3 ? n.size() - 3 : 0),
               parts.count("nested_absmax") ? " double quant" : "");
  }
  if (q.method != HfQuantMethod::CompressedTensors) {
    std::string d = q.describe();
    if (q.method == HfQuantMethod::Gptq && parts.count("g_idx") && q.desc_act) d += ", act-order g_idx";
    return d;
  }
  const HfQuantScheme* s = ct_scheme(q, linear);
  if (!s) return "compressed-tensors (no scheme)";
  if (s->fp8())
    return str("compressed-tensors float-quantized fp8-e4m3 per ",
               s->fp8_strategy == "block" ? str("block ", s->block_rows, "x", s->block_cols) : s->fp8_strategy,
               s->activations.empty() ? std::string() : str(", input activations ", s->activations, " not applied"));
  return str("compressed-tensors ", s->format, " int", s->bits,
             s->group_size < 0 ? std::string(" per channel") : str(" group ", s->group_size), s->symmetric ? " sym" : " asym",
             parts.count("weight_g_idx") ? ", g_idx" : "");
}

}  // namespace qf::models
