#!/usr/bin/env python3
"""Peer side of bench/hf_load.sh: loading a Hugging Face checkpoint with transformers.

  hf_load_peer.py make DIR [--shape 1b|tiny]   writes a random-init LlamaForCausalLM checkpoint (bf16
      safetensors, ~1.1B parameters for 1b: hidden 2048, 16 layers, 32/8 heads, ffn 8192, vocab 32000,
      untied), via transformers' own save_pretrained (max_shard_size 5GB: one file).
  hf_load_peer.py load DIR                     times AutoModelForCausalLM.from_pretrained(DIR,
      torch_dtype="auto") (transformers 4.57 defaults), then one forward over 8 tokens (which reads
      every weight), and prints JSON: load_s, load_and_forward_s, forward_logits_sum, peak_rss_mib
      (getrusage), rss_before_load_mib (the interpreter + torch + transformers themselves).
"""
import json
import resource
import sys
import time


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    mode, d = sys.argv[1], sys.argv[2]
    import torch
    import transformers
    torch.set_num_threads(2)
    if mode == "make":
        shape = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--shape" else "1b"
        if shape == "1b":
            cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                           max_position_embeddings=2048, tie_word_embeddings=False)
        else:
            cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
        m.save_pretrained(d, safe_serialization=True, max_shard_size="5GB")
        print(json.dumps({"made": d, "parameters": sum(p.numel() for p in m.parameters())}))
        return
    before = rss_mib()
    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype="auto").eval()
    t1 = time.perf_counter()
    with torch.no_grad():
        s = m(torch.arange(8).reshape(1, 8)).logits.float().sum().item()
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "load_and_forward_s": t2 - t0, "forward_logits_sum": s,
                      "peak_rss_mib": rss_mib(), "rss_before_load_mib": before, "dtype": str(m.dtype),
                      "transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
