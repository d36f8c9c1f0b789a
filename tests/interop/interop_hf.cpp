// interop_hf DIR IDS.safetensors OUT.safetensors N_NEW: loads the Hugging Face checkpoint directory
// DIR with models/hf.h, runs fp32 logits on "ids" [B, T] (int64) and greedy generation of N_NEW
// tokens from ids[0] (no EOS stop), and writes "logits" (fp32 [B, T, V]) and "generated" (int64
// [N_NEW]) for tests/interop/test_hf_models.py. Exit 1 with the error message on failure.
#include <ATen/ATen.h>

#include <iostream>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "models/generate.h"
#include "models/hf.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: interop_hf DIR IDS.safetensors OUT.safetensors N_NEW\n";
    return 2;
  }
  try {
    auto model = qf::models::load_hf_model(argv[1], false);
    model->eval();
    auto ids = qf::st::load(argv[2]).get("ids").to(at::kLong);
    at::NoGradGuard ng;
    auto logits = model->forward(ids).to(at::kFloat).contiguous();
    qf::models::SamplingConfig s;
    s.temperature = 0;
    s.max_new_tokens = std::stoll(argv[4]);
    s.stop_at_eos = false;
    auto row = ids[0].contiguous();
    std::vector<int64_t> prompt(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    auto gen = qf::models::generate(*model, prompt, s, -1);
    qf::st::save(argv[3], {{"logits", logits}, {"generated", at::tensor(gen, at::kLong)}});
  } catch (const std::exception& e) {
    std::cerr << "interop_hf: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
