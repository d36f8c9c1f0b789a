"""GGUF files IN (issue 21): qforge loads a GGUF made by the peers and agrees with them.

- Families: a tiny random transformers checkpoint per family llama.cpp has (llama, Llama 3 rope
  scaling, qwen2, qwen3, gemma2, gemma3, phi3, gpt2; hidden 256 so every K/IQ block fits) is exported to
  an F32 GGUF; qforge's model from that GGUF (config and tokenizer rebuilt from the metadata) gives the
  source checkpoint's logits and greedy tokens, and those of transformers' own GGUF loader.
- llama.cpp's quantize (llama_model_quantize through ctypes, on the F32 GGUF; IQ types with an
  importance matrix of ones) into every type it makes: qforge's dequantized tensors equal gguf-py's
  `dequantize` bit for bit, its logits equal transformers' GGUF load of the same file (which
  dequantizes with gguf-py) and llama.cpp's own within its activation quantization noise.
- gguf-py's GGUFWriter: a file rewritten tensor by tensor in each type gguf-py quantizes loads the same.
- Tokenizers: the GGUF vocabulary (gpt2 byte-level BPE, llama SentencePiece) tokenizes sample text as
  llama.cpp (llama-cpp-python) does on the same file, and decodes back.
- End to end: LoRA from a Q4_K_M GGUF trains (loss falls), with the blocks kept as the frozen base;
  export back to GGUF round-trips; `qforge inspect` lists each tensor's type; bad files are refused
  with the file, tensor/key and rule named.
A missing peer fails at import, loudly."""
import ctypes
import json
import os
import re
import struct
import subprocess

import gguf  # noqa: F401  - the peers
import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import quants
from gguf.constants import GGMLQuantizationType as GT

from st_io import interop_tool, read_safetensors
from test_families import _losses, bpe_tokenizer
from tiny_runs import QFORGE, kjv_corpus, tiny_recipe, tool_logits, train
from tiny_runs import qforge as _qf

IDS = [[1, 45, 7, 99, 3, 120, 18, 64, 5, 140, 12, 77], [2, 9, 33, 101, 7, 7, 60, 3, 88, 21, 130, 4]]
N_NEW = 6
COMMON = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
KINDS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=64)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=64, sliding_window=6, query_pre_attn_scalar=64, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, head_dim=64, sliding_window=5, sliding_window_pattern=6,
        query_pre_attn_scalar=64, rope_theta=100000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "phimini": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, sliding_window=None, pad_token_id=0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_embd=256, n_layer=2, n_head=4,
                                                                         n_positions=128)),
}
# max |a - b| over the logit scale. F32 files: summation order only (ggml's fp16 GELU table for the GELU
# families, see test_gguf_families); the same dequantized weights in qforge and transformers: float32 order.
TOL_F32 = 1e-4
TOL_SAME_WEIGHTS = 1e-4
# llama.cpp against qforge on a quantized file: llama.cpp quantizes the activations (Q8_K / Q8_0 / Q8_1,
# BF16 / F16) inside every quantized or half matmul. Measured on the tiny llama: 1.4-2.3e-2 of the logit
# scale for every block type (IQ1_M the most), 0.8e-3 F16, 4.4e-3 BF16; the bounds are about twice that.
LLAMA_CPP_TOL = {"half": 1e-2, "quant": 5e-2}
# llama.cpp's ftypes (llama.h) made here; the IQ2/IQ1 ones need an importance matrix.
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17,
          "q6_k": 18, "iq2_xxs": 19, "iq2_xs": 20, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26, "iq2_m": 29,
          "iq4_xs": 30, "iq1_m": 31, "bf16": 32, "tq1_0": 36, "tq2_0": 37}
NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq1_s", "iq2_m", "iq1_m", "iq3_xxs", "iq3_s"}
# The type each ftype must put in the file (llama.cpp's iq2_m mixture is the one made of IQ2_S blocks).
EXPECT = {"q2_k": "Q2_K", "q3_k_m": "Q3_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "iq2_m": "IQ2_S"}
PURE = {"iq2_m"}  # every 2-D weight in the ftype's own type
# Files transformers 4.57's GGUF loader reads right: it ignores attention.key_length (qwen3, gemma), sizes gpt2's
# positions by its default n_ctx and gemma2's heads by its default head_dim, and checks phi3's pad id.
TRANSFORMERS_GGUF = {"llama", "qwen2"}  # 4.57 sizes the others from its defaults (head_dim, n_positions, pad id)
STRINGS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "digits 1234567 and 3.14159",
           "it's what they'll do; I'd've", "UPPER lower MiXeD", "<|bos|> literal special", "héllo wörld ünïcode 日本語",
           "And God said, Let there be light: and there was light."]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_in")
    return d, kjv_corpus(d / "kjv.txt", 1500)


def _hf_dir(work, kind):
    """The family's tiny checkpoint (weights nudged off init) with a byte-level BPE tokenizer.json."""
    d, corpus = work
    out = d / kind
    if out.exists():
        return out
    torch.manual_seed(0)
    m = KINDS[kind]().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    m.save_pretrained(out, safe_serialization=True)
    return bpe_tokenizer(out, corpus, 300)


def _f32_gguf(work, kind):
    path = work[0] / f"{kind}_f32.gguf"
    if not path.exists():
        _qf("export", _hf_dir(work, kind), "--format", "gguf", "--quant", "f32", "--out", path)
    return path


def _llama_quantize(src, dst, ftype):
    """llama-quantize SRC DST FTYPE via the library call; IQ types get an importance matrix of ones."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype]
    p.nthread = 2
    p.pure = ftype in PURE
    keep = []
    if ftype in NEEDS_IMATRIX:
        r = gguf.GGUFReader(str(src))
        entries = [t for t in r.tensors if len(t.shape) == 2]
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, t in enumerate(entries):
            ones = np.ones(int(t.shape[0]), dtype=np.float32)  # one value per input column (ne[0])
            name = t.name.encode()
            keep += [ones, name]
            arr[i].name = name
            arr[i].data = ones.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = ones.size
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize({src}, {ftype}) returned {rc}"


def _qforge_logits(path, tag):
    return tool_logits([interop_tool("interop_gguf_in"), "logits", path], path.parent / f"{path.stem}_{tag}_io", IDS, N_NEW)


def _qforge_tensors(path):
    out = path.parent / f"{path.stem}_tensors.safetensors"
    r = subprocess.run([interop_tool("interop_gguf_in"), "tensors", str(path), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return read_safetensors(out)


def _transformers(src, gguf_file=None):
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager",
                                                         **kw).eval()
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits.float().numpy()
        gen = m.generate(torch.tensor(IDS[:1]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=N_NEW)[0, len(IDS[0]):].tolist()
    return logits, gen


def _llama_cpp_logits(path):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    out = []
    for row in IDS:
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    del llm
    return np.stack(out)


def _err(a, b):
    scale = max(1.0, float(np.abs(a).max()))
    return float(np.abs(a - b).max()) / scale


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_gguf_loads_as_its_source(work, kind):
    path = _f32_gguf(work, kind)
    want, want_gen = _transformers(_hf_dir(work, kind))
    got, gen = _qforge_logits(path, "f32")
    e = _err(want, got)
    print(f"\nGGUF_IN {kind} f32: max|transformers(source) - qforge(gguf)| / scale {e:.3g}; greedy equal {gen == want_gen}")
    assert e <= TOL_F32, e
    assert gen == want_gen
    if kind in TRANSFORMERS_GGUF:
        t, _ = _transformers(path.parent, path.name)
        e2 = _err(t, got)
        print(f"GGUF_IN {kind} f32: max|transformers(gguf) - qforge(gguf)| / scale {e2:.3g}")
        assert e2 <= TOL_F32, e2
    info = json.loads(_qf("inspect", path).stdout.strip().splitlines()[-1])
    assert info["source"] == "gguf" and info["quantization"]["types"].get("F32", 0) > 0, info


def test_gguf_exports_to_hf(work):
    """A GGUF file as a Hugging Face dir (`export --format hf`): transformers loads it with the source's
    logits, and its tokenizer (rebuilt from the GGUF vocabulary) gives the source tokenizer.json's ids."""
    import tokenizers
    src = _hf_dir(work, "llama3")
    out = work[0] / "llama3_hf_from_gguf"
    _qf("export", _f32_gguf(work, "llama3"), "--format", "hf", "--dtype", "fp32", "--out", out, "--force")
    want, _ = _transformers(src)
    got, _ = _transformers(out)
    assert _err(want, got) <= TOL_F32, _err(want, got)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    orig = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in STRINGS:
        assert tok(text, add_special_tokens=False)["input_ids"] == orig.encode(text).ids, repr(text)


def _check_quantized(path, label, family_tol, with_transformers=True):
    """Bit-exact tensors against gguf-py, logits against transformers' GGUF load and llama.cpp."""
    r = gguf.GGUFReader(str(path))
    ours = _qforge_tensors(path)
    types = {}
    for t in r.tensors:
        want = quants.dequantize(t.data, t.tensor_type)
        want = np.asarray(want, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        got = ours[t.name].numpy()
        assert got.shape == want.shape, (t.name, got.shape, want.shape)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
            f"{label} {t.name} ({t.tensor_type.name}): {int((got != want).sum())} values differ from gguf-py"
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    got, gen = _qforge_logits(path, label)
    e_l = _err(_llama_cpp_logits(path), got)
    msg = f"\nGGUF_IN {label}: types {types}; tensors == gguf-py dequantize bit for bit; max|llama.cpp - qforge| / scale {e_l:.3g}"
    if with_transformers:
        t_logits, t_gen = _transformers(path.parent, path.name)
        e_t = _err(t_logits, got)
        msg += f"; max|transformers(gguf) - qforge| / scale {e_t:.3g} (greedy equal {gen == t_gen})"
        assert e_t <= TOL_SAME_WEIGHTS, e_t
    print(msg)
    assert e_l <= family_tol, e_l
    return types


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_llama_cpp_quantized(work, ftype):
    src = _f32_gguf(work, "llama")
    dst = work[0] / f"llama_{ftype}.gguf"
    _llama_quantize(src, dst, ftype)
    types = _check_quantized(dst, ftype, LLAMA_CPP_TOL["half" if ftype == "bf16" else "quant"])
    want = EXPECT.get(ftype, ftype.upper())
    assert want in types, (want, types)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "gemma2", "gemma3", "phimini", "gpt2"])
def test_other_families_quantized(work, kind):
    """Each family's Q4_K_M file (llama.cpp's quantize): tensors as gguf-py, logits as llama.cpp (and
    transformers' GGUF load where it reads the family)."""
    dst = work[0] / f"{kind}_q4_k_m.gguf"
    _llama_quantize(_f32_gguf(work, kind), dst, "q4_k_m")
    tol = LLAMA_CPP_TOL["quant"]
    _check_quantized(dst, f"{kind} q4_k_m", tol, with_transformers=kind in TRANSFORMERS_GGUF)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"])
def test_gguf_py_writer(work, qtype):
    """gguf-py's GGUFWriter: the F32 file's metadata copied, every 2-D weight quantized by gguf-py."""
    src = gguf.GGUFReader(str(_f32_gguf(work, "llama")))
    dst = work[0] / f"llama_gguf_py_{qtype}.gguf"
    w = gguf.GGUFWriter(str(dst), "llama")
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        else:
            w.add_key_value(name, field.contents(), vt)
    t = getattr(GT, qtype)
    for ti in src.tensors:
        data = np.asarray(ti.data, dtype=np.float32).reshape([int(x) for x in reversed(ti.shape)])
        if data.ndim == 2:
            w.add_tensor(ti.name, quants.quantize(data, t), raw_dtype=t)
        else:
            w.add_tensor(ti.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _check_quantized(dst, f"gguf-py {qtype}", LLAMA_CPP_TOL["half" if qtype in ("F16", "BF16") else "quant"])


# Every type a file may hold that gguf-py dequantizes, including NVFP4, which neither gguf-py nor this
# llama.cpp quantizes on the CPU: random block bytes (any bit pattern: signs, grid indices, scales).
RANDOM_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS",
                "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
                "BF16", "F16"]
SCALE_FIRST = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ4_NL",
               "IQ4_XS"}  # blocks that open with their fp16 scale


def test_random_blocks_dequantize_like_gguf_py(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "random_blocks.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name in RANDOM_TYPES:
        t = getattr(GT, name)
        blk, nb = gguf.GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, size=(8, 512 // blk * nb), dtype=np.uint8)
        if name in ("F16", "BF16"):
            raw[:, 1::2] &= 0x3F  # finite halves
        elif name in SCALE_FIRST:  # a finite fp16 scale (other fields: any bits; NaNs must match too)
            raw[:, 1::nb] &= 0x3B
        w.add_tensor(f"t.{name}", raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = _qforge_tensors(path)
    for t in gguf.GGUFReader(str(path)).tensors:
        want = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(8, 512)
        got = ours[t.name].numpy()
        nan = np.isnan(want)
        assert np.array_equal(nan, np.isnan(got)), t.name
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), \
            f"{t.name}: {int((got[~nan] != want[~nan]).sum())} of {want.size} values differ from gguf-py"
    print(f"\nGGUF_IN random blocks: {len(RANDOM_TYPES)} types == gguf-py dequantize bit for bit")


def _tokens(path, strings, tmp):
    (tmp / "in.json").write_text(json.dumps(strings))
    r = subprocess.run([interop_tool("interop_tok"), str(path), str(tmp / "in.json"), str(tmp / "out.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bpe_vocabulary_tokenizes_like_llama_cpp(work, tmp_path, kind):
    path = _f32_gguf(work, kind)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ours = _tokens(path, STRINGS, tmp_path)
    assert ours["bos"] == llm.token_bos() and ours["eos"] == llm.token_eos()
    for text, ids, decoded in zip(STRINGS, ours["ids"], ours["decoded"]):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, repr(text)
        assert decoded == text, repr(text)
        assert llm.detokenize(ids, special=True).decode() == decoded, repr(text)


def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    """A qforge run's trained sentencepiece tokenizer exported as llama.cpp's "llama" vocabulary."""
    cfg = tiny_recipe(tmp_path, "run", tie=False, max_steps=2)
    train(cfg, f"tokenizer.train.sources=[{tmp_path}/corpus.txt]", "tokenizer.train.vocab_size=600")
    path = tmp_path / "spm.gguf"
    _qf("export", tmp_path / "run", "--format", "gguf", "--quant", "f32", "--out", path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = STRINGS[:5] + STRINGS[6:] + ["def f(x):\n    return x", "runs   of    spaces\tand tabs  ", " ", "\n", ""]
    ours = _tokens(path, texts, tmp_path)
    spm = _tokens(tmp_path / "tok.model", texts, tmp_path)  # the run's own sentencepiece model
    assert ours["bos"] == llm.token_bos() == 1
    for text, ids, decoded, own in zip(texts, ours["ids"], ours["decoded"], spm["ids"]):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, repr(text)
        assert ids == own, repr(text)
        assert decoded == text, repr(text)
    # As a Hugging Face dir: the rebuilt sentencepiece model is transformers' tokenizer.model
    out = tmp_path / "hf"
    _qf("export", path, "--format", "hf", "--out", out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text, ids in zip(texts, ours["ids"]):
        if text.strip():  # (transformers' Llama tokenizer trims around whitespace-only text)
            assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text)


def _recipe(tmp, name, gguf_path, corpus, body):
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"""
run: {{name: {name}, out_dir: {tmp}/{name}, threads: 2, seed: 1}}
model: {{from: {gguf_path}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 24, val_fraction: 0.05, cache_dir: {tmp}/cache}}
{body}
""")
    return cfg


@pytest.mark.parametrize("base", ["fp32", "q4_k"])
def test_lora_from_gguf_trains_and_exports_back(work, tmp_path, base):
    src = _f32_gguf(work, "llama")
    q = work[0] / "llama_q4_k_m.gguf"
    if not q.exists():
        _llama_quantize(src, q, "q4_k_m")
    cfg = _recipe(tmp_path, "lora", q, work[1], f"""
peft: {{r: 8, alpha: 16, base: {base}}}
trainer: {{max_steps: 20, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1, optim: {{lr: 0.01}},
          schedule: {{warmup_steps: 1}}}}
""")
    r = subprocess.run([QFORGE, "train", str(cfg)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(tmp_path / "lora")
    assert len(losses) >= 15 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    kept = re.search(r"(\d+) of (\d+) streamed linears kept as their llama.cpp blocks", r.stderr + r.stdout)
    if base == "q4_k":  # the Q4_K tensors keep the file's bytes; the Q6_K ones (attn_v, ffn_down) re-quantize
        n_q4k = sum(t.tensor_type == GT.Q4_K and t.name.startswith("blk.") for t in gguf.GGUFReader(str(q)).tensors)
        assert kept and int(kept.group(1)) == n_q4k and int(kept.group(2)) == 14, (kept and kept.group(0), n_q4k)
    print(f"\nGGUF_IN LoRA (peft.base {base}) from a Q4_K_M GGUF: loss {np.mean(losses[:3]):.3f} -> "
          f"{np.mean(losses[-3:]):.3f}; {kept.group(0) if kept else 'no streamed base'}")
    back = tmp_path / "back.gguf"
    _qf("export", tmp_path / "lora", "--format", "gguf", "--quant", "f32", "--out", back)
    got, _ = _qforge_logits(back, "back")
    assert np.isfinite(got).all()
    # Round trip of the file itself: GGUF -> qforge -> GGUF F32 holds the dequantized weights exactly.
    rt = tmp_path / "rt.gguf"
    _qf("export", q, "--format", "gguf", "--quant", "f32", "--out", rt)
    a, b = _qforge_tensors(q), _qforge_tensors(rt)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _err(_qforge_logits(q, "rt_src")[0], _qforge_logits(rt, "rt")[0]) == 0.0


def test_quantize_and_eval_from_gguf(work, tmp_path):
    """`qforge quantize FILE.gguf` (RTN q4_0) exported back to GGUF holds llama.cpp's own q4_0 blocks for every
    decoder linear (llama-quantize of the same F32 file), and `eval FILE.gguf` scores text."""
    src = _f32_gguf(work, "llama")
    cal = tmp_path / "calib.yaml"
    cal.write_text(f"data: {{sources: [{{path: {work[1]}, split: line}}], seq_len: 32, val_fraction: 0.05, "
                   f"cache_dir: {tmp_path}/cache}}\n")
    _qf("quantize", src, "--method", "rtn", "--quant", "q4_0", "--calib", cal, "--out", tmp_path / "q", "--no-eval")
    ours = tmp_path / "q.gguf"
    _qf("export", tmp_path / "q", "--format", "gguf", "--quant", "q4_0", "--out", ours)
    ref = work[0] / "llama_q4_0.gguf"
    if not ref.exists():
        _llama_quantize(src, ref, "q4_0")
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    n = 0
    for t in gguf.GGUFReader(str(ref)).tensors:
        if t.name.startswith("blk.") and t.tensor_type == GT.Q4_0:
            assert a[t.name].tensor_type == GT.Q4_0 and bytes(a[t.name].data) == bytes(t.data), t.name
            n += 1
    assert n == 14, n
    r = json.loads(_qf("eval", src, "--text", work[1], "--max-batches", "2").stdout.strip().splitlines()[-1])
    assert np.isfinite(r["ppl"]) and r["tokens"] > 0, r


def _bad(tmp, name, blob):
    p = tmp / f"{name}.gguf"
    p.write_bytes(blob)
    r = _qf("inspect", p, check=False)
    assert r.returncode == 1, (name, r.returncode, r.stderr)
    return r.stderr


def test_bad_files_are_refused_naming_the_rule(work, tmp_path):
    good = _f32_gguf(work, "llama").read_bytes()
    r = gguf.GGUFReader(str(_f32_gguf(work, "llama")))
    assert "bad magic" in _bad(tmp_path, "magic", b"GGUX" + good[4:])
    assert "version 7" in _bad(tmp_path, "version", good[:4] + struct.pack("<I", 7) + good[8:])
    assert "tensor count" in _bad(tmp_path, "count", good[:8] + struct.pack("<Q", 1 << 40) + good[16:])
    err = _bad(tmp_path, "truncated", good[: len(good) - 1000])
    assert "runs past the end of the file" in err and "output.weight" in err or "token_embd" in err, err
    # an unknown type id in the first tensor info
    t0 = r.tensors[0]
    info_at = good.index(t0.name.encode()) + len(t0.name)
    nd = struct.unpack_from("<I", good, info_at)[0]
    type_at = info_at + 4 + 8 * nd
    blob = bytearray(good)
    struct.pack_into("<I", blob, type_at, 77)
    err = _bad(tmp_path, "type", bytes(blob))
    assert "unknown ggml type id 77" in err and t0.name in err, err
    # a misaligned data offset
    blob = bytearray(good)
    off = struct.unpack_from("<Q", good, type_at + 4)[0]
    struct.pack_into("<Q", blob, type_at + 4, off + 4)
    err = _bad(tmp_path, "misaligned", bytes(blob))
    assert "not a multiple of the alignment" in err and t0.name in err, err
    # an architecture qforge does not read
    blob = good.replace(b"llama", b"bloom", 1)
    assert re.search(r"general\.architecture 'bloom'", _bad(tmp_path, "arch", blob))
