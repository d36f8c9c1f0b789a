// interop_int8: drives qforge's LLM.int8 code (quant/int8_lt.h) for tests/interop/test_bnb_int8.py.
//   interop_int8 codec IN.safetensors OUT.safetensors THRESHOLD : for every "<n>/w" [out, in] of IN
//       writes "<n>/CB" (int8), "<n>/SCB" (fp32) and "<n>/dq" (int8_dequantize, fp32); where IN has
//       "<n>/x" [..., in] (and optionally "<n>/b" [out], "<n>/g" [..., out]) also "<n>/y" (the
//       Int8LtLinear forward at THRESHOLD, no grad) and, with g, "<n>/gx" (d sum(y * g) / dx).
//   interop_int8 logits DIR IDS.safetensors OUT.safetensors THRESHOLD [ADAPTER] : loads the Hugging Face dir DIR
//       in fp32 with every decoder linear an int8 frozen base (peft::frozen_base_streamer, peft.base
//       int8: a bitsandbytes 8-bit dir keeps its CB / SCB, a float dir is quantized as Int8Params
//       does) and writes "logits" (fp32 [B, T, V]) on "ids" and "kept" (int64 [1]: linears whose
//       bytes came from the file as they were); with ADAPTER (a PEFT adapter dir) the adapter is loaded
//       over those int8 bases first (peft::load_adapter).
// Exit status 0 on success, 1 with the error message otherwise.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <iostream>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "models/hf.h"
#include "peft/adapter.h"
#include "peft/lora.h"
#include "quant/int8_lt.h"

namespace {

void codec(const std::string& in_path, const std::string& out_path, double threshold) {
  auto in = qf::st::load(in_path);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [key, w] : in.tensors) {
    if (key.size() < 2 || key.substr(key.size() - 2) != "/w") continue;
    const std::string n = key.substr(0, key.size() - 2);
    auto q = qf::quant::int8_quantize(w);
    out.emplace_back(n + "/CB", q.cb);
    out.emplace_back(n + "/SCB", q.scb);
    out.emplace_back(n + "/dq", qf::quant::int8_dequantize(q.cb, q.scb));
    if (!in.has(n + "/x")) continue;
    const at::Tensor b = in.has(n + "/b") ? in.get(n + "/b") : at::Tensor();
    qf::quant::Int8LtLinear lin(w, b, threshold);
    auto x = in.get(n + "/x").clone();
    {
      at::NoGradGuard ng;
      out.emplace_back(n + "/y", lin.forward(x));
    }
    if (in.has(n + "/g")) {
      x.set_requires_grad(true);
      auto y = lin.forward(x);
      auto gx = torch::autograd::grad({(y * in.get(n + "/g")).sum()}, {x})[0];
      out.emplace_back(n + "/gx", gx);
    }
  }
  qf::st::save(out_path, out);
}

void logits(const std::string& dir, const std::string& ids_path, const std::string& out_path, double threshold,
            const std::string& adapter) {
  auto ck = qf::models::read_hf_checkpoint(dir);
  ck.config.dtype = qf::models::DType::F32;
  auto model = qf::models::build_model(ck.config, /*init=*/false);
  qf::peft::LoraConfig pc;
  pc.enabled = true;
  pc.base = qf::peft::BaseFormat::Int8;
  pc.int8_threshold = threshold;
  const auto streamer = qf::peft::frozen_base_streamer(*model, pc, "lm_head");
  qf::models::HfLoadReport rep;
  qf::models::load_hf_weights(*model, ck, false, /*populate=*/false, &streamer, &rep);
  int64_t n_int8 = 0;
  for (auto& ns : qf::models::linear_slots(*model))
    n_int8 += dynamic_cast<qf::quant::Int8LtLinear*>(ns.slot->get().get()) != nullptr;
  QF_CHECK(n_int8 > 0, "interop_int8: no linear of ", dir, " became an int8 base");
  if (!adapter.empty()) qf::peft::load_adapter(*model, adapter);
  model->eval();
  auto ids = qf::st::load(ids_path).get("ids").to(at::kLong);
  at::NoGradGuard ng;
  auto l = model->forward(ids).to(at::kFloat).contiguous();
  qf::st::save(out_path, {{"logits", l}, {"kept", at::full({1}, static_cast<int64_t>(rep.kept_packed.size()), at::kLong)},
                          {"int8_linears", at::full({1}, n_int8, at::kLong)}});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (!((mode == "codec" && argc == 5) || (mode == "logits" && (argc == 6 || argc == 7)))) {
    std::cerr << "usage: interop_int8 codec IN.safetensors OUT.safetensors THRESHOLD\n"
                 "       interop_int8 logits DIR IDS.safetensors OUT.safetensors THRESHOLD [ADAPTER]\n";
    return 2;
  }
  try {
    if (mode == "codec")
      codec(argv[2], argv[3], std::stod(argv[4]));
    else
      logits(argv[2], argv[3], argv[4], std::stod(argv[5]), argc == 7 ? argv[6] : "");
  } catch (const std::exception& e) {
    std::cerr << "interop_int8: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
