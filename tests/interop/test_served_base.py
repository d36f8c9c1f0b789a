"""LoRA on the served base (issue 23 item 2): `peft.base: <llama.cpp type>` keeps the frozen linears as
the blocks that ship, and `exact_merge: true` trains the adapter against fq_T(dequantize(blocks) + s*BA),
so `qforge export RUN --format gguf` writes the trained model itself.

A tiny Llama (dim 256, ffn 512: the 256-value K-quant blocks tile every width) is trained by qforge,
exported as a Hugging Face dir, and fine-tuned with LoRA on a q4_0 / q4_K / q6_K base:
  - the validation loss falls; `qforge eval` of the run (its checkpoint rebuilt) gives the loss the
    training ended with;
  - every decoder linear of the exported GGUF has the base's type, and gguf-py's dequantization of its
    bytes equals the weight qforge trained with (its fp32 Hugging Face export) bit for bit;
  - llama.cpp's logits (llama-cpp-python) of that GGUF equal qforge's trained model (transformers on the
    fp32 export: qforge's forward) within llama.cpp's activation-quantization noise (its quantized
    matmuls round activations to q8_0/q8_K); the residual is printed and bounded;
  - without exact_merge the same export re-quantizes W + s*BA, which moves the model: the KL divergence
    between llama.cpp's GGUF and the model qforge trained is printed (README "LoRA on the served base")
    and must exceed the exact-merge residual;
  - such a run ships unmerged instead: `export --format gguf-lora` writes base.gguf (the q4_K blocks the
    adapter trained on) and adapter.gguf (llama.cpp's LoRA adapter format, as convert_lora_to_gguf.py
    writes it); llama.cpp with `lora_path` gives qforge's trained model within the same noise, and the
    base alone does not."""
import json
import subprocess

import numpy as np
import pytest

from test_kld_gate import _llama_window_logits
from tiny_runs import QFORGE, kjv_corpus, mean_kld

TOKENS = np.random.default_rng(0).integers(3, 400, size=(6, 33))


def _qf(*args):
    r = subprocess.run([QFORGE, "-q", *map(str, args)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


def _recipe(d, name, body):
    cfg = d / f"{name}.yaml"
    cfg.write_text(f"""
run: {{name: {name}, out_dir: {d}/{name}, seed: 3, threads: 2}}
tokenizer: {{path: {d}/tok.model, train: {{enabled: true, sources: [{d}/corpus.txt], vocab_size: 400}}}}
data: {{sources: [{{path: {d}/corpus.txt, split: line}}], seq_len: 32, val_fraction: 0.05, cache_dir: {d}/cache}}
{body}
""")
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A float Llama trained by qforge (80 steps), exported as a Hugging Face dir: the LoRA runs' model.from."""
    d = tmp_path_factory.mktemp("served")
    kjv_corpus(d / "corpus.txt", 2500)
    _qf("train", _recipe(d, "fp", """
model: {dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 512, max_seq_len: 64, tie_embeddings: false}
trainer: {max_steps: 80, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 10, optim: {lr: 0.003},
          schedule: {warmup_steps: 2}}"""))
    _qf("export", d / "fp", "--format", "hf", "--dtype", "fp32", "--out", d / "fp_hf")
    return d


def _lora_run(d, name, base_type, exact):
    _qf("train", _recipe(d, name, f"""
model: {{from: {d}/fp_hf}}
peft: {{r: 8, alpha: 16, base: {base_type}, exact_merge: {str(exact).lower()}}}
trainer: {{max_steps: 60, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 5, optim: {{lr: 0.02}},
          schedule: {{warmup_steps: 2}}}}"""))
    return d / name


def _val_losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def _llama_logits(path, lora=None):
    return np.concatenate(_llama_window_logits(path, TOKENS, lora))


def _hf_logits(path):
    import torch
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(TOKENS[:, :-1])).logits.reshape(-1, m.config.vocab_size).numpy()


GGUF_TYPE = {"q4_0": "Q4_0", "q4_k": "Q4_K", "q6_k": "Q6_K"}


@pytest.mark.parametrize("base_type", ["q4_0", "q4_k", "q6_k"])
def test_exact_merge_gguf_is_the_trained_model_in_llama_cpp(base, base_type):
    import gguf
    d = base
    exact = _lora_run(d, f"exact_{base_type}", base_type, True)
    plain = _lora_run(d, f"plain_{base_type}", base_type, False)
    v = _val_losses(exact)
    assert len(v) == 2 and v[1] < v[0], v
    r = _qf("eval", exact, "--max-batches", "2")  # the run's checkpoint rebuilt (blocks from the checkpoint)
    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["loss"] - v[1]) < 1e-5
    res = {}
    for name, run in (("exact", exact), ("plain", plain)):
        g, hf = d / f"{run.name}.gguf", d / f"{run.name}_hf"
        _qf("export", run, "--format", "gguf", "--quant", "f32", "--out", g)
        _qf("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
        tensors = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}
        assert {t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and n.endswith("_v.weight")} == {
            GGUF_TYPE[base_type]}
        assert tensors["output.weight"].tensor_type.name == "F32"
        if name == "exact":  # the GGUF's blocks decode to the weights qforge trained with, bit for bit
            from st_io import read_safetensors
            ours = read_safetensors(hf / "model.safetensors")
            for layer in (0, 1):
                for gname, hname in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj"),
                                     ("ffn_up", "mlp.up_proj")):
                    t = tensors[f"blk.{layer}.{gname}.weight"]
                    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[f"model.layers.{layer}.{hname}.weight"].shape)
                    assert np.array_equal(deq, ours[f"model.layers.{layer}.{hname}.weight"].numpy()), (layer, gname)
        ll, ref = _llama_logits(g), _hf_logits(hf)
        res[name] = (mean_kld(ref, ll), float(np.abs(ll - ref).max()), float(np.abs(ref).max()))
    print(f"\nSERVED_BASE {base_type}: val loss {v[0]:.4f} -> {v[1]:.4f}; llama.cpp on the exported GGUF vs qforge's "
          f"trained model: exact_merge KLD {res['exact'][0]:.2e} (max |logit diff| {res['exact'][1]:.2e}, logit scale "
          f"{res['exact'][2]:.2f}); without exact_merge (W + s*BA re-quantized) KLD {res['plain'][0]:.2e} "
          f"(max |logit diff| {res['plain'][1]:.2e})")
    # llama.cpp's quantized matmuls round activations to 8 bits: the residual stays at that noise level
    assert res["exact"][0] < 2e-3 and res["exact"][1] < 0.05 * res["exact"][2], res
    assert res["plain"][0] > res["exact"][0], res


def test_gguf_lora_adapter_applies_in_llama_cpp(base):
    import gguf
    d = base
    run = _lora_run(d, "adapter_q4_k", "q4_k", False)
    out, hf = d / "adapter_q4_k_gguf", d / "adapter_q4_k_hf"
    _qf("export", run, "--format", "gguf-lora", "--quant", "f32", "--out", out)
    _qf("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    r = gguf.GGUFReader(str(out / "adapter.gguf"))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    assert abs(kv["adapter.lora.alpha"] - 16.0) < 1e-6  # s * r = 2 * 8
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # gguf-py: innermost first
    assert len(shapes) == 28 and shapes["blk.0.ffn_down.weight.lora_a"] == (512, 8), shapes
    assert shapes["blk.0.ffn_down.weight.lora_b"] == (8, 256)
    base_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "base.gguf")).tensors}
    assert base_types["blk.1.attn_q.weight"] == "Q4_K" and base_types["output.weight"] == "F32"
    ref = _hf_logits(hf)
    with_adapter, alone = _llama_logits(out / "base.gguf", out / "adapter.gguf"), _llama_logits(out / "base.gguf")
    k, k0 = mean_kld(ref, with_adapter), mean_kld(ref, alone)
    print(f"\nSERVED_BASE gguf-lora q4_k: llama.cpp base.gguf + adapter.gguf vs qforge's trained model KLD {k:.2e} "
          f"(max |logit diff| {np.abs(with_adapter - ref).max():.2e}); base.gguf alone KLD {k0:.2e}")
    assert k < 2e-3 and k0 > 10 * k, (k, k0)
    # an exact-merge run's model is fq(W + s*BA), not base + adapter: refused
    exact = _lora_run(d, "adapter_exact", "q4_0", True)
    r = subprocess.run([QFORGE, "-q", "export", str(exact), "--format", "gguf-lora", "--out", str(d / "refused")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "exact-merge" in r.stderr, r.stderr
