"""Writes tests/fuzz/seeds_hf_config/: config.json files as transformers writes them (to_json_string)
for each architecture qforge imports, plus a few variants (rope scaling, sliding window, GQA) and quantized
checkpoints' quantization_config (GPTQ, AWQ, compressed-tensors).
Run: .venv/bin/python tests/fuzz/make_seeds_hf_config.py"""
import pathlib

from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

out = pathlib.Path(__file__).parent / "seeds_hf_config"
out.mkdir(exist_ok=True)
small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
configs = {
    "llama": LlamaConfig(**small, num_key_value_heads=2, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16"),
    "llama_default": LlamaConfig(architectures=["LlamaForCausalLM"]),
    "llama3_rope": LlamaConfig(**small, architectures=["LlamaForCausalLM"], rope_theta=500000.0, max_position_embeddings=16384,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama_linear_rope": LlamaConfig(**small, architectures=["LlamaForCausalLM"],
                                     rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=True),
    "qwen2": Qwen2Config(**small, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                         sliding_window=32, max_window_layers=1, torch_dtype="float16"),
    "mistral": MistralConfig(**small, num_key_value_heads=1, architectures=["MistralForCausalLM"], sliding_window=64),
    "gpt2": GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                       architectures=["GPT2LMHeadModel"]),
    "gpt2_default": GPT2Config(architectures=["GPT2LMHeadModel"]),
}
# quantized checkpoints (quantization_config as gptqmodel, AutoAWQ / transformers and compressed-tensors write it)
quantized = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
             "checkpoint_format": "gptq", "pack_dtype": "int32", "meta": {"quantizer": ["gptqmodel:4.2.5"]}},
    "awq": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
            "modules_to_not_convert": ["lm_head"]},
    "compressed_tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                           "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                                         "input_activations": None, "output_activations": None,
                                                         "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                                     "strategy": "group", "group_size": 32}}}},
    "bitsandbytes": {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "float32",
                     "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                     "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                     "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
                     "quant_method": "bitsandbytes"},
    "bitsandbytes_8bit": {"_load_in_4bit": False, "_load_in_8bit": True, "bnb_4bit_compute_dtype": "float32",
                          "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                          "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                          "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": False,
                          "load_in_8bit": True, "quant_method": "bitsandbytes"},
}
for name, q in quantized.items():
    configs[f"llama_{name}"] = LlamaConfig(**small, architectures=["LlamaForCausalLM"], quantization_config=q)
for name, c in configs.items():
    (out / f"{name}.json").write_text(c.to_json_string())
