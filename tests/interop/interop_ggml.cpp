// interop_ggml IN.safetensors OUT.safetensors
// For every float32 2-D tensor "<rule>/<name>" in IN (rule: a llama.cpp block preset, q8_0 ... q6_k)
// writes "<rule>/<name>/blocks" (uint8, qf::quant::ggml::quantize) and "<rule>/<name>/dequant"
// (float32, qf::quant::ggml::fake_quant) to OUT; where IN also holds a float32 1-D
// "<rule>/<name>/imatrix", also "<rule>/<name>/blocks_imatrix" (quantize with that importance
// matrix) and "<rule>/<name>/dequant_imatrix" (dequantize of those blocks). For
// tests/interop/test_gguf_blocks.py to compare with libggml and gguf-py.
#include <ATen/ATen.h>

#include <exception>
#include <iostream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "quant/ggml_blocks.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: interop_ggml IN.safetensors OUT.safetensors\n";
    return 2;
  }
  using qf::quant::Rule;
  try {
    auto in = qf::st::load(argv[1]);
    std::map<std::string, at::Tensor> imatrices;
    for (const auto& [name, t] : in.tensors)
      if (t.dim() == 1) imatrices[name] = t;
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (const auto& [name, t] : in.tensors) {
      const auto slash = name.find('/');
      if (slash == std::string::npos || t.scalar_type() != at::kFloat || t.dim() != 2) continue;
      const auto spec = qf::quant::QuantSpec::preset_named(name.substr(0, slash));  // throws listing the presets
      QF_CHECK(spec.is_ggml(), "interop_ggml: tensor '", name, "' names ", spec.describe(), ", not a llama.cpp block format");
      out.emplace_back(name + "/blocks", qf::quant::ggml::quantize(t, spec.rule));
      out.emplace_back(name + "/dequant", qf::quant::ggml::fake_quant(t, spec.rule));
      if (auto it = imatrices.find(name + "/imatrix"); it != imatrices.end()) {
        auto blocks = qf::quant::ggml::quantize(t, spec.rule, it->second);
        out.emplace_back(name + "/dequant_imatrix", qf::quant::ggml::dequantize(blocks, spec.rule, t.size(1)));
        out.emplace_back(name + "/blocks_imatrix", blocks);
      }
    }
    qf::st::save(argv[2], out);
    std::cout << "interop_ggml: wrote " << out.size() << " tensors to " << argv[2] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "interop_ggml: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
