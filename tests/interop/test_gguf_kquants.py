"""The low-bit K-quants (q2_k, q3_k, q5_k) end to end, from `qforge train` (QAT with the preset) and
`qforge quantize --method rtn` to a GGUF that llama.cpp runs:
  * QAT-converted runs: `export --format gguf` keeps the trained blocks; gguf-py's dequantization of
    every decoder linear equals qforge's own weights (its fp32 HF export, after convert_hf_to_gguf's
    Q/K row permutation) bit for bit, and the tensors have the preset's type;
  * RTN runs: the blocks are byte-identical to libggml's ggml_quantize_chunk of the float run's
    weights (what llama-quantize writes for that type);
  * llama.cpp (llama-cpp-python) loads each QAT GGUF and its logits match qforge's forward on the same
    weights within llama.cpp's activation quantization (Q8_K inside the K-quant dot products), with the
    same greedy continuation.
Widths 256 / 512 so every linear takes the 256-blocks. A missing peer is a failure, not a skip."""
import os
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest

from llama_ref import quantize as ggml_quantize
from test_gguf_export import _permute, llama_vs_qforge
from st_io import read_safetensors
from tiny_runs import QFORGE, tiny_recipe, train

PRESETS = {"q2_k": "Q2_K", "q3_k": "Q3_K", "q5_k": "Q5_K"}
SHAPE = ("model.dim=256", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=512")
GGUF_NAMES = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}
HEADS = {"attn_q.weight": 4, "attn_k.weight": 2}
ENV = dict(os.environ, OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kquants")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg, *SHAPE)
    for p in PRESETS:
        train(cfg, *SHAPE, f"run.out_dir={d}/qat_{p}", f"run.init_from={d}/fp",
              f"quant.rules=[{{pattern: 'model.layers.*', weight: {{preset: {p}}}}}]", "trainer.max_steps=3")
        r = subprocess.run([QFORGE, "-q", "quantize", str(d / "fp"), "--method", "rtn", "--quant", p, "--no-eval",
                            "--out", str(d / f"rtn_{p}")], capture_output=True, text=True, env=ENV)
        assert r.returncode == 0, r.stderr
    return d


def _hf(tmp_path, run, name):
    out = tmp_path / name
    subprocess.run([QFORGE, "-q", "export", str(run), "--format", "hf", "--dtype", "fp32", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def _gguf(tmp_path, run):
    out = tmp_path / "m.gguf"
    r = subprocess.run([QFORGE, "-q", "export", str(run), "--format", "gguf", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("method", ["qat", "rtn"])
def test_blocks_read_back_exactly(tmp_path, runs, preset, method):
    run = runs / (f"qat_{preset}/converted" if method == "qat" else f"rtn_{preset}")
    tensors = {t.name: t for t in gguf.GGUFReader(str(_gguf(tmp_path, run))).tensors}
    ours = read_safetensors(_hf(tmp_path, run, "hf") / "model.safetensors")
    fp = read_safetensors(_hf(tmp_path, runs / "fp", "fp") / "model.safetensors") if method == "rtn" else None
    for i in range(2):
        for hf_name, g_name in GGUF_NAMES.items():
            t = tensors[f"blk.{i}.{g_name}"]
            assert t.tensor_type.name == PRESETS[preset], (t.name, t.tensor_type.name)
            w = ours[f"model.layers.{i}.{hf_name}"].numpy()
            if g_name in HEADS:
                w = _permute(w, HEADS[g_name])
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            assert np.array_equal(got.view(np.uint32), w.view(np.uint32)), f"{method} {preset} {t.name}"
            if method == "rtn":  # RTN of the float weights == what libggml's quantizer writes for them
                x = fp[f"model.layers.{i}.{hf_name}"].numpy()
                if g_name in HEADS:
                    x = _permute(x, HEADS[g_name])
                ref = np.frombuffer(ggml_quantize(PRESETS[preset], x), np.uint8)
                assert np.array_equal(np.asarray(t.data).reshape(-1), ref), f"rtn {preset} {t.name}: bytes differ"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_llama_cpp_runs_the_qat_gguf_like_qforge(tmp_path, runs, preset):
    run = runs / f"qat_{preset}/converted"
    # llama.cpp quantizes the activations to Q8_K inside each K-quant matmul, qforge does not.
    llama_vs_qforge(tmp_path, _gguf(tmp_path, run), _hf(tmp_path, run, "hf"), runs / "tok.model", 1e-2, f"qat {preset}")
