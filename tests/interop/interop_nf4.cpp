// interop_nf4 IN.safetensors OUT.safetensors BLOCKSIZE: runs qforge's NF4 codec (quant/nf4.h) over
// every tensor of IN (fp32/bf16/fp16) so tests/interop/test_bnb_nf4.py can compare it with
// bitsandbytes.functional.quantize_4bit(quant_type="nf4"). Writes "<name>/packed" (uint8),
// "<name>/absmax" (uint8 codes), "<name>/nested_absmax", "<name>/offset" (fp32 [1]) and
// "<name>/dq" (dequantized in the input dtype) with double quant, "<name>/absmax_plain" (fp32) and
// "<name>/dq_plain" without, plus "dynamic_map" (the 256-entry signed 8-bit map). Exit 1 on error.
#include <ATen/ATen.h>

#include <iostream>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "quant/nf4.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: interop_nf4 IN.safetensors OUT.safetensors BLOCKSIZE\n";
    return 2;
  }
  try {
    const int64_t bs = std::stoll(argv[3]);
    auto in = qf::st::load(argv[1]);
    std::vector<std::pair<std::string, at::Tensor>> out;
    const auto& dm = qf::quant::dynamic_map_signed();
    out.emplace_back("dynamic_map", at::from_blob(const_cast<float*>(dm.data()), {256}, at::kFloat).clone());
    for (auto& [name, t] : in.tensors) {
      auto q = qf::quant::nf4_quantize(t, bs, true);
      out.emplace_back(name + "/packed", q.packed);
      out.emplace_back(name + "/absmax", q.absmax);
      out.emplace_back(name + "/nested_absmax", q.nested_absmax);
      out.emplace_back(name + "/offset", at::full({1}, q.offset, at::kFloat));
      out.emplace_back(name + "/dq", qf::quant::nf4_dequantize(q, t.scalar_type()));
      auto p = qf::quant::nf4_quantize(t, bs, false);
      out.emplace_back(name + "/absmax_plain", p.absmax);
      out.emplace_back(name + "/dq_plain", qf::quant::nf4_dequantize(p, t.scalar_type()));
    }
    qf::st::save(argv[2], out);
  } catch (const std::exception& e) {
    std::cerr << "interop_nf4: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
