// interop_gguf_in, GGUF files in (export/gguf_in.h) for tests/interop/test_gguf_in.py:
//   logits FILE.gguf IDS.safetensors OUT.safetensors N_NEW: the model qforge loads from the file (fp32),
//     "logits" (fp32 [B, T, V]) on "ids" [B, T] (int64) and "generated" (int64 [N_NEW], greedy from ids[0]);
//   tensors FILE.gguf OUT.safetensors: every tensor dequantized to float32 in its GGUF layout
//     (gguf_tensor_f32: what gguf-py's dequantize returns), keyed by its GGUF name.
// Exit 1 with the error message on failure.
#include <ATen/ATen.h>

#include <iostream>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "export/gguf_in.h"
#include "models/generate.h"
#include "quant/ggml_more.h"

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (!((mode == "logits" && argc == 6) || (mode == "tensors" && argc == 4))) {
    std::cerr << "usage: interop_gguf_in logits FILE.gguf IDS.safetensors OUT.safetensors N_NEW\n"
                 "       interop_gguf_in tensors FILE.gguf OUT.safetensors\n";
    return 2;
  }
  try {
    if (mode == "tensors") {
      const auto f = qf::gguf_in::File::open(argv[2], qf::quant::ggml::gguf_type_geometry);  // no model needed
      std::vector<std::pair<std::string, at::Tensor>> out;
      for (const auto& t : f->tensors()) out.emplace_back(t.name, qf::exporter::gguf_tensor_f32(*f, t));
      qf::st::save(argv[3], out);
      return 0;
    }
    auto model = qf::exporter::load_gguf_model(argv[2], qf::models::DType::F32, false);
    model->eval();
    auto ids = qf::st::load(argv[3]).get("ids").to(at::kLong);
    at::NoGradGuard ng;
    auto logits = model->forward(ids).to(at::kFloat).contiguous();
    qf::models::SamplingConfig s;
    s.temperature = 0;
    s.max_new_tokens = std::stoll(argv[5]);
    s.stop_at_eos = false;
    auto row = ids[0].contiguous();
    std::vector<int64_t> prompt(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    auto gen = qf::models::generate(*model, prompt, s, -1);
    qf::st::save(argv[4], {{"logits", logits}, {"generated", at::tensor(gen, at::kLong)}});
  } catch (const std::exception& e) {
    std::cerr << "interop_gguf_in: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
