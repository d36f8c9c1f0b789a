// interop_affine IN.safetensors OUT.safetensors: runs qforge's affine / fp8 fake quantizers
// (quant/affine.h) over every tensor of IN so tests/interop/test_torchao_fake_quant.py can compare
// them with torchao. Input tensors are named "<spec>/<name>" (float32, bfloat16 or float16; any
// rank: per-channel/per-group view them as [prod(leading dims), last dim], per-token activations
// [B, T, D] are quantized as B*T tokens). <spec> is a QuantSpec preset name (int4-g32,
// int4-g128-asym, int8-per-channel, int8-per-token, fp8-e4m3, fp8-e5m2) or, when it is not a
// preset, int<bits>-<g<N>|per-channel|per-token|per-tensor>[-asym|-sym][-f16|-bf16] (symmetric by
// default; e.g. int8-g64, int4-per-channel) or fp8-<e4m3|e5m2>-<per-channel|per-tensor|g<N>>[-f16|-bf16].
// Writes for integer specs "<spec>/<name>/fq" (input dtype), "/scale" and "/zero_point" (float32,
// [rows, n_blocks]), "/mask" (uint8), "/q" (int32 codes) and "/dq" (dequantize(q), input dtype);
// for fp8 specs only "/fq". Exit status 0 on success, 1 with a message on any error.
#include <ATen/ATen.h>

#include <algorithm>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "quant/affine.h"
#include "quant/spec.h"

namespace {

using qf::quant::Granularity;
using qf::quant::Kind;
using qf::quant::QuantSpec;
using qf::quant::ScaleDType;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  return out;
}

QuantSpec parse_spec(const std::string& name) {
  const auto& presets = QuantSpec::preset_names();
  if (std::find(presets.begin(), presets.end(), name) != presets.end()) {
    QuantSpec s = QuantSpec::preset_named(name);
    QF_CHECK(!s.is_ggml(), "interop_affine: preset '", name, "' is a llama.cpp block format (use interop_ggml)");
    return s;
  }
  auto bad = [&](const std::string& why) {
    return qf::Error("interop_affine: cannot parse spec '" + name + "': " + why +
                     "; expected a preset or int<bits>-<g<N>|per-channel|per-token|per-tensor>[-asym|-sym][-f16|-bf16] or "
                     "fp8-<e4m3|e5m2>-<per-channel|per-tensor|g<N>>[-f16|-bf16]");
  };
  auto tok = split(name, '-');
  size_t i = 0;
  QuantSpec s;
  if (tok.size() >= 2 && tok[0] == "fp8") {
    if (tok[1] == "e4m3") s.kind = Kind::Fp8E4M3;
    else if (tok[1] == "e5m2") s.kind = Kind::Fp8E5M2;
    else throw bad("unknown fp8 format '" + tok[1] + "'");
    s.bits = 8;
    i = 2;
  } else if (!tok.empty() && tok[0].rfind("int", 0) == 0 && tok[0].size() > 3) {
    try {
      s.bits = std::stoi(tok[0].substr(3));
    } catch (const std::exception&) {
      throw bad("bad bit width '" + tok[0] + "'");
    }
    if (s.bits < 2 || s.bits > 8) throw bad("bits must be in [2, 8]");
    i = 1;
  } else {
    throw bad("it starts with neither int<bits> nor fp8");
  }
  if (i >= tok.size()) throw bad("missing granularity");
  if (tok[i] == "per" && i + 1 < tok.size()) {
    const auto& g = tok[i + 1];
    if (g == "channel") s.granularity = Granularity::PerChannel;
    else if (g == "token") s.granularity = Granularity::PerToken;
    else if (g == "tensor") s.granularity = Granularity::PerTensor;
    else throw bad("unknown granularity 'per-" + g + "'");
    i += 2;
  } else if (tok[i].size() > 1 && tok[i][0] == 'g') {
    s.granularity = Granularity::PerGroup;
    try {
      s.group_size = std::stoll(tok[i].substr(1));
    } catch (const std::exception&) {
      throw bad("bad group size '" + tok[i] + "'");
    }
    ++i;
  } else {
    throw bad("unknown granularity '" + tok[i] + "'");
  }
  for (; i < tok.size(); ++i) {
    if (tok[i] == "asym" && s.kind == Kind::Int) s.symmetric = false;
    else if (tok[i] == "sym" && s.kind == Kind::Int) s.symmetric = true;
    else if (tok[i] == "f16") s.scale_dtype = ScaleDType::F16;
    else if (tok[i] == "bf16") s.scale_dtype = ScaleDType::BF16;
    else throw bad("unknown suffix '" + tok[i] + "'");
  }
  return s;
}

int run(const std::string& in_path, const std::string& out_path) {
  auto file = qf::st::load(in_path);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [full, x] : file.tensors) {
    auto slash = full.find('/');
    QF_CHECK(slash != std::string::npos && slash > 0 && slash + 1 < full.size(), "interop_affine: tensor '", full,
             "' is not named <spec>/<name>");
    QuantSpec spec = parse_spec(full.substr(0, slash));
    if (spec.kind == Kind::Fp8E4M3 || spec.kind == Kind::Fp8E5M2) {
      out.emplace_back(full + "/fq", qf::quant::fake_quant_fp8(x, spec));
      continue;
    }
    auto qp = qf::quant::choose_qparams(x, spec);
    auto [fq, mask] = qf::quant::fake_quant_affine(x, qp, spec);
    auto q = qf::quant::quantize_affine(x, qp, spec);
    auto dq = qf::quant::dequantize_affine(q, qp, spec, x.scalar_type());
    out.emplace_back(full + "/fq", fq);
    out.emplace_back(full + "/scale", qp.scale);
    out.emplace_back(full + "/zero_point", qp.zero_point);
    out.emplace_back(full + "/mask", mask.to(at::kByte));
    out.emplace_back(full + "/q", q);
    out.emplace_back(full + "/dq", dq);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  qf::st::save(out_path, out, {{"generated_by", "tests/interop/interop_affine"}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " IN.safetensors OUT.safetensors\n";
    return 1;
  }
  try {
    return run(argv[1], argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "interop_affine: " << e.what() << "\n";
    return 1;
  }
}
