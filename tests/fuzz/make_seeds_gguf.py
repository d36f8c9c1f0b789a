"""Writes tests/fuzz/seeds_gguf/: small GGUF files as gguf-py's GGUFWriter writes them, one per
architecture qforge reads (llama with Llama 3 rope_freqs, qwen2, qwen3, gemma2, gemma3, phi3 with
LongRoPE factors, gpt2) with tensors in several types (F32, F16, Q8_0, Q4_0 from gguf-py's quantizer;
IQ2_XXS / IQ3_S / IQ1_M / MXFP4 / NVFP4 blocks of random bytes), a v2 file, and broken ones (bad magic,
truncated, absurd counts), so the fuzzer starts past the header checks.
Run: .venv/bin/python tests/fuzz/make_seeds_gguf.py"""
import pathlib
import struct

import numpy as np
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

out = pathlib.Path(__file__).parent / "seeds_gguf"
out.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
V, D, F, L, H = 16, 32, 64, 1, 4  # head width 8, 2 KV heads: K/V rows 16


def model(name, arch, types, extra=None, tensors=None):
    path = out / f"{name}.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.vocab_size", V)
    w.add_uint32(f"{arch}.context_length", 32)
    w.add_uint32(f"{arch}.embedding_length", D)
    w.add_uint32(f"{arch}.block_count", L)
    w.add_uint32(f"{arch}.feed_forward_length", F)
    w.add_uint32(f"{arch}.attention.head_count", H)
    w.add_uint32(f"{arch}.attention.head_count_kv", 2)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    for k, v in (extra or {}).items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(V)])
    w.add_array("tokenizer.ggml.merges", ["t 1"])
    for i, (tn, shape) in enumerate(tensors):
        t = types[i % len(types)]
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1 or t == T.F32:
            w.add_tensor(tn, x)
        elif t == T.F16:
            w.add_tensor(tn, x.astype(np.float16))
        elif t in (T.Q8_0, T.Q4_0):
            w.add_tensor(tn, quants.quantize(x, t), raw_dtype=t)
        else:
            blk, nb = GGML_QUANT_SIZES[t]
            cols = shape[-1] // blk * blk or blk
            raw = rng.integers(0, 256, size=(shape[0], cols // blk * nb), dtype=np.uint8)
            w.add_tensor(tn, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def layer(names):
    return [(f"blk.0.{n}", s) for n, s in names]


llama = [("token_embd.weight", (V, D)), ("output_norm.weight", (D,))] + layer(
    [("attn_norm.weight", (D,)), ("ffn_norm.weight", (D,)), ("attn_q.weight", (D, D)), ("attn_k.weight", (16, D)),
     ("attn_v.weight", (16, D)), ("attn_output.weight", (D, D)), ("ffn_gate.weight", (F, D)), ("ffn_up.weight", (F, D)),
     ("ffn_down.weight", (D, F))])
model("llama", "llama", [T.F32, T.F16, T.Q8_0, T.Q4_0], tensors=llama + [("output.weight", (V, D)),
                                                                        ("rope_freqs.weight", (4,))])
model("qwen2", "qwen2", [T.F32], tensors=llama + [(f"blk.0.attn_{x}.bias", (n,)) for x, n in (("q", D), ("k", 16), ("v", 16))])
qk = [("blk.0.attn_q_norm.weight", (8,)), ("blk.0.attn_k_norm.weight", (8,))]
model("qwen3", "qwen3", [T.F16], tensors=llama + qk)
gem = llama + layer([("post_attention_norm.weight", (D,)), ("post_ffw_norm.weight", (D,))])
model("gemma2", "gemma2", [T.F32], {"gemma2.attention.sliding_window": 8, "gemma2.attn_logit_softcapping": 50.0}, gem)
model("gemma3", "gemma3", [T.F32], {"gemma3.attention.sliding_window": 8}, gem + qk)
phi = [("token_embd.weight", (V, D)), ("output_norm.weight", (D,)), ("output.weight", (V, D)),
       ("rope_factors_long.weight", (4,)), ("rope_factors_short.weight", (4,))] + layer(
    [("attn_norm.weight", (D,)), ("ffn_norm.weight", (D,)), ("attn_qkv.weight", (D + 32, D)), ("attn_output.weight", (D, D)),
     ("ffn_up.weight", (2 * F, D)), ("ffn_down.weight", (D, F))])
model("phi3", "phi3", [T.F32], {"phi3.rope.scaling.original_context_length": 16, "phi3.rope.dimension_count": 8}, phi)
gpt = [("token_embd.weight", (V, D)), ("position_embd.weight", (32, D)), ("output_norm.weight", (D,)),
       ("output_norm.bias", (D,))] + layer(
    [("attn_norm.weight", (D,)), ("attn_norm.bias", (D,)), ("ffn_norm.weight", (D,)), ("ffn_norm.bias", (D,)),
     ("attn_qkv.weight", (3 * D, D)), ("attn_qkv.bias", (3 * D,)), ("attn_output.weight", (D, D)),
     ("attn_output.bias", (D,)), ("ffn_up.weight", (4 * D, D)), ("ffn_up.bias", (4 * D,)), ("ffn_down.weight", (D, 4 * D)),
     ("ffn_down.bias", (D,))])
model("gpt2", "gpt2", [T.F32], tensors=gpt)
big = [("token_embd.weight", (2, 256)), ("blk.0.x.weight", (2, 256)), ("blk.0.y.weight", (2, 256))]
iq = model("iq_types", "llama", [T.IQ2_XXS, T.IQ3_S, T.IQ1_M], tensors=big)
model("fp4_types", "llama", [T.MXFP4, T.NVFP4, T.IQ2_XS], tensors=big)
b = (out / "llama.gguf").read_bytes()
(out / "v2.gguf").write_bytes(b[:4] + struct.pack("<I", 2) + b[8:])
(out / "bad_magic.gguf").write_bytes(b"GGML" + b[4:])
(out / "truncated.gguf").write_bytes(b[: len(b) // 2])
(out / "absurd_count.gguf").write_bytes(b[:8] + struct.pack("<Q", 1 << 62) + b[16:])
print(sorted(p.name for p in out.iterdir()))
