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
from test_gguf_lowbit import imatrix_values, read_tensors
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


@pytest.mark.parametrize("preset", ["iq4_xs", "iq4_nl", "q4_k", "q4_0"])
def test_quantize_rtn_with_imatrix_equals_llama_quantize(run, tmp_path, preset):
    """qforge quantize --method rtn --imatrix F (a converted run, exported exactly) holds the decoder
    linears llama_model_quantize --pure writes from qforge's f32 GGUF with F's importance weights."""
    d, im = run
    base = tmp_path / "f32.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "f32", "--out", str(base)],
                   check=True, capture_output=True)
    ref = tmp_path / "ref.gguf"
    llama_quantize(base, ref, preset if preset != "q4_k" else "q4_k_s", imatrix=imatrix_values(im), pure=True)
    q = tmp_path / "q"
    r = subprocess.run([QFORGE, "quantize", str(d / "fp"), "--method", "rtn", "--quant", preset, "--imatrix", str(im),
                        "--out", str(q), "--no-eval"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = tmp_path / "ours.gguf"
    subprocess.run([QFORGE, "-q", "export", str(q), "--format", "gguf", "--out", str(ours)], check=True,
                   capture_output=True)
    a, b = read_tensors(ours), read_tensors(ref)
    linears = [n for n in b if n.startswith("blk.") and "norm" not in n]
    assert len(linears) == 28
    for n in linears:
        assert a[n][0] == b[n][0], (n, a[n][0], b[n][0])
        assert a[n][1] == b[n][1], f"{preset} {n}: bytes differ from llama-quantize --imatrix"
    plain = tmp_path / "plain"
    subprocess.run([QFORGE, "-q", "quantize", str(d / "fp"), "--method", "rtn", "--quant", preset, "--out", str(plain),
                    "--no-eval"], check=True, capture_output=True)
    subprocess.run([QFORGE, "-q", "export", str(plain), "--format", "gguf", "--out", str(tmp_path / "plain.gguf")],
                   check=True, capture_output=True)
    c = read_tensors(tmp_path / "plain.gguf")
    assert any(c[n][1] != a[n][1] for n in linears), "the importance weights changed nothing"


def test_imatrix_refusals_in_quantize_and_export(run, tmp_path):
    d, im = run
    r = subprocess.run([QFORGE, "quantize", str(d / "fp"), "--method", "gptq", "--quant", "q4_0", "--imatrix", str(im),
                        "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode != 0 and "--method rtn" in r.stderr, r.stderr
    r = subprocess.run([QFORGE, "quantize", str(d / "fp"), "--method", "rtn", "--quant", "int4-g32", "--imatrix", str(im),
                        "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode != 0 and "llama.cpp block types" in r.stderr, r.stderr
    bad = tmp_path / "bad.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "f32", "--out", str(bad)],
                   check=True, capture_output=True)
    r = subprocess.run([QFORGE, "export", str(d / "fp"), "--format", "gguf", "--quant", "q4_0", "--imatrix", str(bad),
                        "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert r.returncode != 0 and "missing imatrix metadata" in r.stderr, r.stderr


def test_legacy_dat_imatrix_is_read_as_llama_quantize_reads_it(run, tmp_path):
    """The pre-GGUF .dat layout (llama-imatrix --output-format dat): per entry (sum / count) * ncall and
    ncall; tools/quantize divides by ncall. Export with it == llama_model_quantize with those values."""
    import struct
    d, im = run
    g = gguf.GGUFReader(str(im))
    t = {x.name: np.asarray(x.data, dtype=np.float32).ravel() for x in g.tensors}
    names = sorted(n[: -len(".in_sum2")] for n in t if n.endswith(".in_sum2"))
    ncall = 3
    dat = tmp_path / "im.dat"
    with open(dat, "wb") as f:
        f.write(struct.pack("<i", len(names)))
        for n in names:
            v = (t[n + ".in_sum2"] / t[n + ".counts"][0] * np.float32(ncall)).astype(np.float32)
            f.write(struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", ncall, v.size) + v.tobytes())
        f.write(struct.pack("<i", CHUNKS) + struct.pack("<i", 4) + b"x.tx")
    values = {}
    with open(dat, "rb") as f:  # what tools/quantize's legacy loader hands llama_model_quantize
        f.read(4)
        for _ in names:
            (ln,) = struct.unpack("<i", f.read(4))
            n = f.read(ln).decode()
            nc, nv = struct.unpack("<ii", f.read(8))
            values[n] = np.frombuffer(f.read(4 * nv), np.float32) / np.float32(nc)
    base = tmp_path / "f32.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "f32", "--out", str(base)],
                   check=True, capture_output=True)
    ref = tmp_path / "ref.gguf"
    llama_quantize(base, ref, "iq4_xs", imatrix=values)
    ours = tmp_path / "ours.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "iq4_xs", "--imatrix", str(dat),
                    "--out", str(ours)], check=True, capture_output=True)
    a, b = read_tensors(ours), read_tensors(ref)
    assert a == b
