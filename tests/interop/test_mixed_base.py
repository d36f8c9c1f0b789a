"""LoRA on a served base of mixed llama.cpp types: `peft.base: mix` + `peft.mixture: <llama-quantize
mixture>` gives each frozen linear the type llama-quantize's rules (llama_tensor_get_type) give that
tensor, and `peft.base: gguf` keeps each tensor of a GGUF model.from in the type the file stores it in.
Against llama.cpp (llama-cpp-python 0.3.36: llama_model_quantize, and its inference) and gguf-py:
  - the per-tensor types qforge chooses (the types `export --format gguf --quant MIX` of the LoRA run
    writes for every decoder linear) equal llama_model_quantize's for the same float model, for the
    K mixtures q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m and iq4_xs, q4_0, q6_k on an 8-layer model with 4
    query heads per KV head (use_more_bits picks layers 0, 3, 6, 7; q2_k / iq4_xs take the GQA rule);
  - LoRA with exact_merge on mix q4_k_m trains (the validation loss falls), `qforge eval` of the run
    gives the loss training ended with, and gguf-py's dequantization of the exported GGUF's linears
    (Q4_K and Q6_K) equals the weights of the model qforge trained (its fp32 Hugging Face export) bit
    for bit; llama.cpp's logits of that GGUF equal qforge's within its activation rounding;
  - a Q4_K_M file made by llama_model_quantize keeps all 14 linears' bytes under `peft.base: gguf`
    (the checkpoint holds the file's blocks, rows in qforge's order, and their ggml type) and under
    `peft.base: mix` + `mixture: q4_k_m`; the exact-merge export writes each linear in the file's type,
    dequantizing to the trained weights bit for bit;
  - a file with a type qforge only dequantizes (IQ3_XXS) is refused under `peft.base: gguf`, naming the
    tensor, the type and what to use instead."""
import json
import re
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest

from llama_ref import LLAMA_FTYPE, llama_quantize
from st_io import read_safetensors
from test_kld_gate import _llama_window_logits
from tiny_runs import QFORGE, kjv_corpus, mean_kld

TOKENS = np.random.default_rng(0).integers(3, 400, size=(6, 33))
LINEARS = [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
           ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
           ("ffn_down", "mlp.down_proj")]


def _qf(*args, check=True):
    r = subprocess.run([QFORGE, *map(str, args)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    if check:
        assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


def _recipe(d, name, body):
    cfg = d / f"{name}.yaml"
    cfg.write_text(f"""# qforge train recipe (tests/interop/test_mixed_base.py)
run: {{name: {name}, out_dir: {d}/{name}, seed: 3, threads: 2}}
tokenizer: {{path: {d}/tok.model, train: {{enabled: true, sources: [{d}/corpus.txt], vocab_size: 400}}}}
data: {{sources: [{{path: {d}/corpus.txt, split: line}}], seq_len: 32, val_fraction: 0.05, cache_dir: {d}/cache}}
{body}
""")
    return cfg


def _float_model(d, steps, layers, kv_heads):
    """A float Llama trained by qforge: d/fp, its fp32 Hugging Face dir d/fp_hf and f32 GGUF d/f32.gguf."""
    kjv_corpus(d / "corpus.txt", 2500)
    _qf("-q", "train", _recipe(d, "fp", f"""
model: {{dim: 256, n_layers: {layers}, n_heads: 4, n_kv_heads: {kv_heads}, ffn_dim: 512, max_seq_len: 64, tie_embeddings: false}}
trainer: {{max_steps: {steps}, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 10, optim: {{lr: 0.003}},
          schedule: {{warmup_steps: 2}}}}"""))
    _qf("-q", "export", d / "fp", "--format", "hf", "--dtype", "fp32", "--out", d / "fp_hf")
    _qf("-q", "export", d / "fp", "--format", "gguf", "--quant", "f32", "--out", d / "f32.gguf")
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 layers (14 linears), 2 query heads per KV head, 80 float steps: the LoRA runs' model."""
    return _float_model(tmp_path_factory.mktemp("mixed"), 80, 2, 2)


def _lora(d, name, source, peft, steps, lr=0.02):
    r = _qf("train", _recipe(d, name, f"""
model: {{from: {source}}}
peft: {{r: 8, alpha: 16, {peft}}}
trainer: {{max_steps: {steps}, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 1, optim: {{lr: {lr}}},
          schedule: {{warmup_steps: 2}}}}"""))
    return d / name, r.stdout + r.stderr


def _val_losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def _linear_types(path):
    """{GGUF name: ggml type name} of every decoder linear (blk.N.*.weight, 2-D)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}


def _permute(w, n_head):
    """convert_hf_to_gguf.py's Q/K row order (llama.cpp's RoPE layout) of HF rows: a GGUF file's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(layer_name, kv_heads):
    return 4 if layer_name == "attn_q" else kv_heads if layer_name == "attn_k" else 0


def _assert_gguf_is_trained_model(g, hf_dir, n_layers, kv_heads):
    """gguf-py's dequantization of every decoder linear of g == qforge's trained weights (HF export)."""
    ours = read_safetensors(hf_dir / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}
    for layer in range(n_layers):
        for gname, hname in LINEARS:
            t = tensors[f"blk.{layer}.{gname}.weight"]
            w = ours[f"model.layers.{layer}.{hname}.weight"].numpy()
            if h := _heads(gname, kv_heads):
                w = _permute(w, h)
            deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            assert np.array_equal(deq, w), (layer, gname, t.tensor_type.name)


def _hf_logits(path):
    import torch
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(TOKENS[:, :-1])).logits.reshape(-1, m.config.vocab_size).numpy()


MIXTURES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "iq4_xs", "q4_0", "q6_k"]


def test_mixture_types_equal_llama_quantize(tmp_path_factory):
    d = _float_model(tmp_path_factory.mktemp("deep"), 2, 8, 1)  # 8 layers, n_gqa 4
    summary = []
    for mix in MIXTURES:
        run, _ = _lora(d, f"lora_{mix}", d / "fp_hf", f"base: mix, mixture: {mix}, exact_merge: true", 2)
        ours = d / f"{mix}.gguf"
        _qf("-q", "export", run, "--format", "gguf", "--quant", mix, "--out", ours)
        ref = d / f"ref_{mix}.gguf"
        llama_quantize(d / "f32.gguf", ref, mix)
        a, b = _linear_types(ours), _linear_types(ref)
        assert len(a) == 56 and a == b, {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b[k]}
        counts = {}
        for t in a.values():
            counts[t] = counts.get(t, 0) + 1
        summary.append(f"{mix} " + "/".join(f"{n} {t}" for t, n in sorted(counts.items())))
    print("\nMIXED_BASE types == llama_model_quantize's (56 linears): " + "; ".join(summary))


def test_mixed_lora_trains_and_exact_merge_export_is_the_trained_model(base):
    d = base
    run, _ = _lora(d, "mix_q4_k_m", d / "fp_hf", "base: mix, mixture: q4_k_m, exact_merge: true", 60)
    v = _val_losses(run)
    assert len(v) == 2 and v[1] < v[0], v
    r = _qf("-q", "eval", run, "--max-batches", "2")  # the checkpoint rebuilt: each linear in its saved type
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["loss"] - v[1]) < 1e-5
    g, hf = d / "mix_q4_k_m.gguf", d / "mix_q4_k_m_hf"
    _qf("-q", "export", run, "--format", "gguf", "--quant", "q4_k_m", "--out", g)
    _qf("-q", "export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    llama_quantize(d / "f32.gguf", d / "ref_q4_k_m.gguf", "q4_k_m")
    types = _linear_types(g)
    assert types == _linear_types(d / "ref_q4_k_m.gguf"), types
    assert sorted(set(types.values())) == ["Q4_K", "Q6_K"]
    _assert_gguf_is_trained_model(g, hf, 2, 2)
    ll, ref = np.concatenate(_llama_window_logits(g, TOKENS)), _hf_logits(hf)
    kld, mx, scale = mean_kld(ref, ll), float(np.abs(ll - ref).max()), float(np.abs(ref).max())
    print(f"\nMIXED_BASE mix q4_k_m exact_merge: val loss {v[0]:.4f} -> {v[1]:.4f}; types "
          f"{sum(t == 'Q6_K' for t in types.values())} Q6_K / {sum(t == 'Q4_K' for t in types.values())} Q4_K as "
          f"llama-quantize; llama.cpp on the exported GGUF vs qforge's trained model: KLD {kld:.2e} "
          f"(max |logit diff| {mx:.2e}, logit scale {scale:.2f})")
    assert kld < 2e-3 and mx < 0.05 * scale, (kld, mx, scale)


def test_gguf_file_types_are_kept(base):
    d = base
    q = d / "q4_k_m.gguf"
    llama_quantize(d / "f32.gguf", q, "q4_k_m")
    file = {t.name: t for t in gguf.GGUFReader(str(q)).tensors}
    file_types = _linear_types(q)
    assert sorted(set(file_types.values())) == ["Q4_K", "Q6_K"]
    kept = {}
    for name, peft in (("keep_mix", "base: mix, mixture: q4_k_m"), ("keep_gguf", "base: gguf, exact_merge: true")):
        run, log = _lora(d, name, q, peft, 60)
        m = re.search(r"(\d+) of (\d+) streamed linears kept as their llama.cpp blocks", log)
        assert m and m.groups() == ("14", "14"), (name, m and m.group(0))
        v = _val_losses(run)
        assert len(v) == 2 and v[1] < v[0], (name, v)
        kept[name] = f"{m.group(0)}, val loss {v[0]:.4f} -> {v[1]:.4f}"
    # The checkpoint holds the file's own bytes (rows in HF order) and each tensor's ggml type id.
    run = d / "keep_gguf"
    step = max((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ck = read_safetensors(step / "model.safetensors")
    for layer in range(2):
        for gname, hname in LINEARS:
            t = file[f"blk.{layer}.{gname}.weight"]
            prefix = f"model.layers.{layer}.{hname}.base_layer."
            blocks = ck[prefix + "weight"].numpy()
            if h := _heads(gname, 2):
                blocks = _permute(blocks, h)
            assert np.array_equal(blocks, np.asarray(t.data).reshape(blocks.shape)), (layer, gname)
            assert int(ck[prefix + "ggml_type"].numpy()[0]) == int(t.tensor_type), (layer, gname)
    g, hf = d / "keep_gguf.gguf", d / "keep_gguf_hf"
    _qf("-q", "export", run, "--format", "gguf", "--quant", "q4_k_m", "--out", g)
    _qf("-q", "export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    assert _linear_types(g) == file_types
    _assert_gguf_is_trained_model(g, hf, 2, 2)
    print(f"\nMIXED_BASE from a llama_model_quantize Q4_K_M file ({sum(t == 'Q6_K' for t in file_types.values())} Q6_K "
          f"+ {sum(t == 'Q4_K' for t in file_types.values())} Q4_K linears): mix q4_k_m {kept['keep_mix']}; gguf "
          f"{kept['keep_gguf']}; checkpoint bytes == the file's, export types == the file's")


def test_gguf_type_qforge_cannot_quantize_is_refused(base):
    d = base
    ftypes = dict(LLAMA_FTYPE, iq3_xxs=23)  # LLAMA_FTYPE_MOSTLY_IQ3_XXS
    import llama_ref
    llama_ref.LLAMA_FTYPE = ftypes
    src = gguf.GGUFReader(str(d / "f32.gguf"))
    ones = {t.name: np.ones(int(t.shape[0]), np.float32) for t in src.tensors if len(t.shape) == 2}
    q = d / "iq3_xxs.gguf"
    llama_quantize(d / "f32.gguf", q, "iq3_xxs", imatrix=ones)
    assert "IQ3_XXS" in set(_linear_types(q).values())
    r = _qf("train", _recipe(d, "iq3", f"""
model: {{from: {q}}}
peft: {{r: 8, base: gguf}}
trainer: {{max_steps: 2, batch_size: 8, eval_every: 0}}"""), check=False)
    assert r.returncode != 0
    m = re.search(r"peft\.base: gguf: tensor (blk\.\d+\.\w+\.weight) \(layer [\w.]+\) is stored as IQ3_XXS", r.stderr)
    assert m and "peft.base mix" in r.stderr, r.stderr[-2000:]
    print(f"\nMIXED_BASE IQ3_XXS file under peft.base gguf: exit {r.returncode}, {m.group(0)}")
