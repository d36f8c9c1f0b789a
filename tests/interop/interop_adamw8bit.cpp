// interop_adamw8bit IN.safetensors OUT.safetensors [CHUNK]: runs qforge's AdamW8bit
// (trainer/adamw8bit.h) so tests/interop/test_bnb_adamw8bit.py can compare it with
// bitsandbytes.optim.AdamW8bit on the CPU. IN holds "param/<name>" (initial values), "grad/<name>"
// ([T, *shape]: the gradient of each step), "wd/<name>" (its weight decay, f64 scalar), "hp" (f64
// [lr, beta1, beta2, eps]), "lr" (f64 [T]: the lr of each step) and "quant/<name>" (fp32 tensors to
// quantize). Each parameter is its own param group. After T/2 steps the optimizer state goes through
// the checkpoint form (adamw8bit_state -> load_adamw8bit_state into a fresh optimizer), as a resume
// would. OUT: "step<t>/param/<name>" and "step<t>/<state1|state2|absmax1|absmax2>/<name>" after
// every step t = 1..T; "quant/<name>/<s|u>_codes", "_absmax", "_dq" (signed / unsigned map);
// "map/signed", "map/unsigned". CHUNK: elements per update chunk (default: the optimizer's). Exit 1
// on error.
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <iostream>
#include <map>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "trainer/adamw8bit.h"

namespace {

using Named = std::vector<std::pair<std::string, at::Tensor>>;
using qf::trainer::AdamW8bit;

std::unique_ptr<AdamW8bit> make_opt(const std::map<std::string, at::Tensor>& params,
                                    const std::map<std::string, double>& wd, const at::Tensor& hp, int64_t chunk) {
  auto h = hp.accessor<double, 1>();
  auto base = torch::optim::AdamWOptions(h[0]).betas({h[1], h[2]}).eps(h[3]);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (auto& [name, p] : params)
    groups.emplace_back(std::vector<at::Tensor>{p}, std::make_unique<torch::optim::AdamWOptions>(base.weight_decay(wd.at(name))));
  auto opt = std::make_unique<AdamW8bit>(std::move(groups), base);
  if (chunk > 0) opt->set_chunk_elements(chunk);
  return opt;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::cerr << "usage: interop_adamw8bit IN.safetensors OUT.safetensors [CHUNK]\n";
    return 2;
  }
  try {
    const int64_t chunk = argc == 4 ? std::stoll(argv[3]) : 0;
    auto in = qf::st::load(argv[1]);
    Named out;
    for (bool s : {true, false}) {
      const auto& map = qf::trainer::dynamic_map(s);
      out.emplace_back(s ? "map/signed" : "map/unsigned",
                       at::from_blob(const_cast<float*>(map.data()), {256}, at::kFloat).clone());
    }
    torch::nn::Module m;
    std::map<std::string, at::Tensor> params, grads;
    std::map<std::string, double> wd;
    for (auto& [name, t] : in.tensors) {
      const auto slash = name.find('/');
      const std::string kind = name.substr(0, slash), rest = name.substr(slash + 1);
      if (kind == "param") params[rest] = m.register_parameter(rest, t.clone());
      if (kind == "grad") grads[rest] = t;
      if (kind == "wd") wd[rest] = t.item<double>();
      if (kind == "quant") {
        for (bool s : {true, false}) {
          auto q = qf::trainer::quantize_blockwise8(t, s);
          const std::string p = name + (s ? "/s_" : "/u_");
          out.emplace_back(p + "codes", q.codes);
          out.emplace_back(p + "absmax", q.absmax);
          out.emplace_back(p + "dq", qf::trainer::dequantize_blockwise8(q.codes, q.absmax, s));
        }
      }
    }
    const auto hp = in.get("hp").contiguous();
    const auto lrs = in.get("lr").contiguous();
    const int64_t steps = lrs.numel();
    auto opt = make_opt(params, wd, hp, chunk);
    for (int64_t t = 1; t <= steps; ++t) {
      if (t == steps / 2 + 1) {  // resume: the state through its checkpoint form, into a fresh optimizer
        auto saved = qf::trainer::adamw8bit_state(m, *opt);
        opt = make_opt(params, wd, hp, chunk);
        qf::trainer::load_adamw8bit_state(m, *opt, saved, "<resume>", "");
      }
      for (auto& g : opt->param_groups())
        static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lrs[t - 1].item<double>());
      for (auto& [name, p] : params) p.mutable_grad() = grads.at(name)[t - 1].clone();
      opt->step();
      const std::string pre = "step" + std::to_string(t) + "/";
      for (auto& [name, p] : params) out.emplace_back(pre + "param/" + name, p.detach().clone());
      for (auto& [k, v] : qf::trainer::adamw8bit_state(m, *opt))
        if (k.rfind("step/", 0) != 0) out.emplace_back(pre + k, v.clone());
    }
    qf::st::save(argv[2], out);
  } catch (const std::exception& e) {
    std::cerr << "interop_adamw8bit: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
