// interop_lora: drives qforge's LoRA + PEFT adapter I/O for tests/interop/test_peft_lora.py.
//   interop_lora make DIR [rslora] : builds a tiny random Llama (seed 7), writes it in Hugging Face
//       layout to DIR/base (config.json + model.safetensors), wraps q_proj/v_proj/down_proj in rank-4
//       LoRA (alpha 8; rsLoRA when asked) with random non-zero factors, saves the adapter to
//       DIR/adapter with peft/adapter.h, and writes DIR/qforge.safetensors: "ids" [2, 11] int64,
//       "logits_base" and "logits_lora" (fp32 [2, 11, vocab]), "logits_merged" (after merge_lora).
//   interop_lora load DIR ADAPTER OUT : rebuilds the base from DIR/base/model.safetensors, loads the
//       PEFT adapter ADAPTER into it and writes OUT with "logits" on the same ids.
// Exit status 0 on success, 1 with the error message otherwise.
#include <ATen/ATen.h>

#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "models/transformer.h"
#include "peft/adapter.h"
#include "peft/lora.h"
#include "trainer/checkpoint.h"
#include "tests/tiny_model.h"

namespace {

qf::models::ModelConfig tiny() {
  auto c = qf::testing::tiny_llama(96, 64, 0.02);
  c.tie_embeddings = false;
  return c;
}

at::Tensor ids() { return (at::arange(22, at::kLong) * 37 + 5).remainder(96).reshape({2, 11}); }

at::Tensor logits(qf::models::CausalLM& m) {
  at::NoGradGuard ng;
  m.eval();
  return m.forward(ids()).to(at::kFloat).contiguous();
}

void write_hf_base(qf::models::CausalLM& m, const qf::models::ModelConfig& c, const std::string& dir) {
  qf::fs::ensure_dir(dir);
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"vocab_size", c.vocab_size},
                      {"hidden_size", c.dim},
                      {"intermediate_size", c.ffn_dim},
                      {"num_hidden_layers", c.n_layers},
                      {"num_attention_heads", c.n_heads},
                      {"num_key_value_heads", c.kv_heads()},
                      {"head_dim", c.hdim()},
                      {"max_position_embeddings", c.max_seq_len},
                      {"rope_theta", c.rope_theta},
                      {"rms_norm_eps", c.norm_eps},
                      {"tie_word_embeddings", c.tie_embeddings},
                      {"attention_bias", false},
                      {"mlp_bias", false},
                      {"hidden_act", "silu"},
                      {"torch_dtype", "float32"}};
  qf::fs::write_atomic(dir + "/config.json", j.dump(2));
  qf::st::save(dir + "/model.safetensors", qf::trainer::model_state(m), {{"format", "pt"}});
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    auto cfg = tiny();
    auto model = qf::models::build_model(cfg);
    if (mode == "make" && (argc == 3 || argc == 4)) {
      const std::string dir = argv[2];
      at::manual_seed(7);
      model->init_weights(7);
      write_hf_base(*model, cfg, dir + "/base");
      auto base_logits = logits(*model);
      qf::peft::LoraConfig lc;
      lc.enabled = true;
      lc.r = 4;
      lc.alpha = 8;
      lc.rslora = argc == 4 && std::string(argv[3]) == "rslora";
      lc.target_modules = {"q_proj", "v_proj", "down_proj"};
      qf::peft::apply_lora(*model, lc, "lm_head");
      {
        at::NoGradGuard ng;
        for (auto& [name, l] : qf::peft::lora_layers(*model)) l->lora_B->weight.normal_(0.0, 0.2);
      }
      qf::peft::save_adapter(*model, lc, dir + "/adapter", dir + "/base", false);
      auto lora_logits = logits(*model);
      qf::peft::merge_lora(*model);
      auto merged = logits(*model);
      qf::st::save(dir + "/qforge.safetensors",
                   {{"ids", ids()}, {"logits_base", base_logits}, {"logits_lora", lora_logits}, {"logits_merged", merged}});
    } else if (mode == "load" && argc == 5) {
      auto f = qf::st::load(std::string(argv[2]) + "/base/model.safetensors");
      qf::trainer::load_model_state(*model, f.tensors, argv[2]);
      qf::peft::load_adapter(*model, argv[3]);
      qf::st::save(argv[4], {{"logits", logits(*model)}});
    } else {
      std::cerr << "usage: interop_lora make DIR [rslora] | interop_lora load DIR ADAPTER OUT\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "interop_lora: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
