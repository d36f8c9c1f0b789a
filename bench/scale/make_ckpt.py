#!/usr/bin/env python3
"""Random-init Llama checkpoints in Hugging Face layout for bench/scale.sh, plus a small tokenizer.json.

    make_ckpt.py DIR --shape tiny|1b|8b [--method transformers|stream] [--max-shard-size 5GB]
                     [--tokenizer-corpus FILE] [--tokenizer-vocab 8192] [--seed 0]

Shapes (`LlamaForCausalLM`, bf16, vocab 128256, rope_theta 500000, llama3 rope scaling as the
published configs, max_position_embeddings 131072):
  tiny  hidden 256, 2 layers, 8/4 heads, ffn 768, tied          (smoke tests of the bench itself)
  1b    hidden 2048, 16 layers, 32/8 heads, ffn 8192, tied       (Llama-3.2-1B: 1.236e9 params)
  8b    hidden 4096, 32 layers, 32/8 heads, ffn 14336, untied    (Llama-3.1-8B: 8.030e9 params)

--method transformers (default for tiny and 1b): `LlamaForCausalLM._from_config(cfg, dtype=bf16)`
  (transformers' own init: N(0, initializer_range=0.02) linears and embedding, ones for the norms)
  then `save_pretrained(DIR, max_shard_size=...)`: everything transformers writes, as it writes it.
  Needs about 2x the bf16 model in RAM (1b: ~5 GB).
--method stream (default for 8b): the config is still `LlamaConfig(...).save_pretrained(DIR)` and the
  tensor names and shapes are those of `LlamaForCausalLM` built on the meta device (no memory), but
  each tensor is drawn on its own (N(0, 0.02) in fp32 then cast to bf16; norms = ones, as HF's init)
  and written shard by shard with safetensors (`model-0000i-of-0000n.safetensors`, metadata
  {"format": "pt"}, greedy packing in state_dict order up to --max-shard-size, the index
  `model.safetensors.index.json` with metadata.total_size and weight_map): HF's sharded layout.
  Peak RAM is one shard plus one fp32 tensor (8b, 5GB shards: ~7 GB), not the 16 GB bf16 model.
  The draw is torch.Generator(seed) per tensor, so a checkpoint is reproducible.

Tokenizer: a byte-level BPE (Llama-3-like layout: ByteLevel pre-tokenizer and decoder, BOS/EOS as
added special tokens, BOS prepended by a TemplateProcessing post-processor) trained by `tokenizers`
on --tokenizer-corpus (default: data/corpora/kjv.txt, Debian's bible-kjv text that scripts/setup.sh
extracts), --tokenizer-vocab ids, all < the model's vocab (128256): the embedding rows above it are
never looked up, which changes neither memory nor step time. Trained once per vocab size and cached
next to DIR (DIR/../tokenizer-v<vocab>.json), then copied into each checkpoint with a
tokenizer_config.json naming bos/eos. Writes DIR/make_ckpt.json describing how the dir was made.
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=768, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}
ROPE_SCALING = {"1b": 32.0, "8b": 8.0, "tiny": 8.0}  # llama3 rope scaling factor as the published configs
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama_config(shape, vocab, max_pos, rope_scaling):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_pos, rope_theta=500000.0, rms_norm_eps=1e-5,
                      initializer_range=0.02, hidden_act="silu", attention_bias=False, mlp_bias=False,
                      attention_dropout=0.0, bos_token_id=0, eos_token_id=1, use_cache=True,
                      rope_scaling=({"rope_type": "llama3", "factor": ROPE_SCALING[shape], "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                                    if rope_scaling else None),
                      torch_dtype="bfloat16", **kw)
    return cfg


def parse_size(s):
    s = s.strip().upper()
    for suf, m in (("GB", 10**9), ("MB", 10**6), ("GIB", 2**30), ("MIB", 2**20)):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * m)
    return int(s)


def write_transformers(d, cfg, max_shard):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    m.save_pretrained(d, safe_serialization=True, max_shard_size=max_shard)
    n = sum(p.numel() for p in m.parameters())
    del m
    return n


def write_stream(d, cfg, max_shard_bytes, seed):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg.architectures = ["LlamaForCausalLM"]  # what a model's save_pretrained records
    cfg.save_pretrained(d)  # config.json
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    sd = m.state_dict()
    if cfg.tie_word_embeddings:  # save_pretrained drops the tied duplicate
        sd.pop("lm_head.weight", None)
    names = list(sd.keys())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    del m, sd
    # greedy packing in state_dict order, as transformers' shard_checkpoint does
    shards, cur, cur_b = [], [], 0
    for k in names:
        b = 2 * int(torch.tensor(shapes[k]).prod().item()) if shapes[k] else 2
        if cur and cur_b + b > max_shard_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(k)
        cur_b += b
    if cur:
        shards.append(cur)
    n_sh = len(shards)
    weight_map, total, nparams = {}, 0, 0
    for i, ks in enumerate(shards, 1):
        fname = "model.safetensors" if n_sh == 1 else f"model-{i:05d}-of-{n_sh:05d}.safetensors"
        tensors = {}
        for k in ks:
            shp = shapes[k]
            if k.endswith("norm.weight"):
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 1000003 + names.index(k))
                t = torch.empty(shp, dtype=torch.float32).normal_(0.0, cfg.initializer_range, generator=g)
                t = t.to(torch.bfloat16)
            tensors[k] = t
            weight_map[k] = fname
            total += t.numel() * 2
            nparams += t.numel()
        t0 = time.time()
        save_file(tensors, os.path.join(d, fname), metadata={"format": "pt"})
        print(f"  {fname}: {len(ks)} tensors, {sum(t.numel() for t in tensors.values()) * 2 / 1e9:.2f} GB "
              f"({time.time() - t0:.1f}s to write)", file=sys.stderr)
        del tensors
    if n_sh > 1:
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            f.write("\n")
    return nparams


def tokenizer_json(cache_dir, corpus, vocab):
    path = os.path.join(cache_dir, f"tokenizer-v{vocab}.json")
    if os.path.exists(path):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus], trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                            show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--method", choices=["transformers", "stream"], default=None,
                    help="default: transformers for tiny/1b, stream for 8b")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--max-position", type=int, default=131072)
    ap.add_argument("--no-rope-scaling", action="store_true")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-corpus", default=os.path.join(os.path.dirname(__file__), "../../data/corpora/kjv.txt"))
    ap.add_argument("--tokenizer-vocab", type=int, default=8192)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    method = a.method or ("stream" if a.shape == "8b" else "transformers")
    d = os.path.abspath(a.dir)
    if os.path.exists(os.path.join(d, "make_ckpt.json")) and not a.force:
        print(f"make_ckpt: {d} exists (make_ckpt.json); --force to rewrite", file=sys.stderr)
        return
    if a.tokenizer_vocab >= a.vocab:
        raise SystemExit("--tokenizer-vocab must be < --vocab")
    import transformers

    transformers.logging.set_verbosity_error()
    tmp = d + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = llama_config(a.shape, a.vocab, a.max_position, not a.no_rope_scaling)
    t0 = time.time()
    if method == "transformers":
        nparams = write_transformers(tmp, cfg, a.max_shard_size)
    else:
        nparams = write_stream(tmp, cfg, parse_size(a.max_shard_size), a.seed)
    t_weights = time.time() - t0
    cache = os.path.dirname(d)
    tj = tokenizer_json(cache, os.path.abspath(a.tokenizer_corpus), a.tokenizer_vocab)
    shutil.copy(tj, os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "model_max_length": a.max_position,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    st = [x for x in os.listdir(tmp) if x.endswith(".safetensors")]
    info = {"shape": a.shape, "method": method, "params": nparams,
            "arch": {k: v for k, v in SHAPES[a.shape].items()}, "vocab_size": a.vocab,
            "max_position_embeddings": a.max_position, "rope_scaling": None if a.no_rope_scaling else "llama3",
            "dtype": "bfloat16", "safetensors_files": sorted(st),
            "safetensors_bytes": sum(os.path.getsize(os.path.join(tmp, x)) for x in st),
            "max_shard_size": a.max_shard_size,
            "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab": a.tokenizer_vocab,
                          "corpus": os.path.abspath(a.tokenizer_corpus)},
            "weights_s": round(t_weights, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "how": ("LlamaForCausalLM._from_config(dtype=bf16) + save_pretrained" if method == "transformers" else
                    "LlamaConfig.save_pretrained + per-tensor N(0, 0.02) bf16 (norms 1) written shard by shard "
                    "with safetensors under LlamaForCausalLM's (meta device) state_dict names + index json")}
    with open(os.path.join(tmp, "make_ckpt.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.replace(tmp, d)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
