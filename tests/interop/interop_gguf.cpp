// interop_gguf OUT.gguf OUT_REF.safetensors: writes a GGUF with export/gguf_writer.h holding every
// metadata value type qforge uses (u32, i32, u64, f32, bool, string, arrays of string/f32/i32) and
// one tensor per ggml type (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; the quantized ones made by
// quant/ggml_blocks.h from seeded random weights, 2-D and 1-D), with a non-default alignment, plus
// OUT_REF.safetensors: "<name>" = qforge's own dequantization of each tensor (fp32), for
// tests/interop/test_gguf_writer.py to compare with gguf-py's reader.
#include <ATen/ATen.h>

#include <iostream>

#include "core/safetensors.h"
#include "export/gguf_writer.h"
#include "quant/ggml_blocks.h"

using qf::gguf::TensorType;
using qf::quant::Rule;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: interop_gguf OUT.gguf OUT_REF.safetensors\n";
    return 2;
  }
  try {
    qf::gguf::Writer w(64);
    w.add_string("general.architecture", "llama");
    w.add_string("general.name", "qforge gguf writer test ✓");
    w.add_u32("test.u32", 4000000000u);
    w.add_i32("test.i32", -7);
    w.add_u64("test.u64", 1ull << 40);
    w.add_f32("test.f32", 0.25f);
    w.add_bool("test.bool", true);
    w.add_strings("test.strings", {"<s>", "▁the", "", "\xe4\xb8\xad"});
    w.add_f32s("test.f32s", {0.0f, -1.5f, 3.25f});
    w.add_i32s("test.i32s", {1, -2, 3});
    auto g = at::detail::createCPUGenerator(5);
    std::vector<std::pair<std::string, at::Tensor>> ref;
    auto blocks_bytes = [](const at::Tensor& b) {
      auto c = b.contiguous();
      return std::string(static_cast<const char*>(c.data_ptr()), c.numel());
    };
    {
      auto t = at::randn({3, 40}, g);
      w.add_tensor("t.f32", {3, 40}, TensorType::F32, std::string(static_cast<const char*>(t.data_ptr()), t.numel() * 4));
      ref.emplace_back("t.f32", t);
      auto h = at::randn({5, 16}, g).to(at::kHalf).contiguous();
      w.add_tensor("t.f16", {5, 16}, TensorType::F16, std::string(static_cast<const char*>(h.data_ptr()), h.numel() * 2));
      ref.emplace_back("t.f16", h.to(at::kFloat));
    }
    const std::vector<std::tuple<std::string, Rule, TensorType, int64_t, int64_t>> qs = {
        {"t.q8_0", Rule::GgmlQ8_0, TensorType::Q8_0, 4, 64}, {"t.q4_0", Rule::GgmlQ4_0, TensorType::Q4_0, 6, 96},
        {"t.q4_1", Rule::GgmlQ4_1, TensorType::Q4_1, 2, 32},  {"t.q4_k", Rule::GgmlQ4_K, TensorType::Q4_K, 3, 512},
        {"t.q6_k", Rule::GgmlQ6_K, TensorType::Q6_K, 2, 256},  {"t.q8_0_1d", Rule::GgmlQ8_0, TensorType::Q8_0, 1, 128}};
    for (auto& [name, rule, type, rows, cols] : qs) {
      auto x = at::randn({rows, cols}, g);
      auto b = qf::quant::ggml::quantize(x, rule);
      std::vector<int64_t> dims = rows == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
      w.add_tensor(name, dims, type, blocks_bytes(b));
      ref.emplace_back(name, qf::quant::ggml::dequantize(b, rule, cols).reshape(dims));
    }
    w.write(argv[1]);
    qf::st::save(argv[2], ref);
  } catch (const std::exception& e) {
    std::cerr << "interop_gguf: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
