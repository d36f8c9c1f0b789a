"""`qforge export --format gguf --quant MIX` on a float model against llama.cpp's own pipeline:
qforge's f32 GGUF requantized by llama_model_quantize (the llama-quantize tool) must be the file
qforge writes directly - every tensor's name, ggml type and bytes identical - for the mixtures
q4_k_m (Q6_K output, use_more_bits attn_v/ffn_down, shape fallbacks), q4_0, q5_0, q5_1 and q8_0.
The model has the demo's shape problem on purpose (ffn 704: no Q4_K/Q6_K for ffn_down, which falls
back to Q5_0 / Q8_0, as llama.cpp warns) and 8 layers so use_more_bits picks layers 0, 3, 6, 7."""
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest

from llama_ref import llama_quantize
from tiny_runs import QFORGE, tiny_recipe, train


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=2)
    train(cfg, "model.dim=256", "model.n_layers=8", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=704")
    base = d / "f32.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "f32", "--out", str(base)],
                   check=True, capture_output=True)
    return d, base


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("mix", ["q4_k_m", "q4_0", "q5_0", "q5_1", "q8_0"])
def test_export_equals_llama_quantize(tmp_path, fp_run, mix):
    d, base = fp_run
    ref = tmp_path / "ref.gguf"
    llama_quantize(base, ref, mix)
    ours = tmp_path / "ours.gguf"
    r = subprocess.run([QFORGE, "export", str(d / "fp"), "--format", "gguf", "--quant", mix, "--out", str(ours)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    types = {}
    for name in a:
        assert a[name][0] == b[name][0], f"{mix} {name}: qforge {a[name][0]}, llama-quantize {b[name][0]}"
        assert a[name][1] == b[name][1], f"{mix} {name}: {a[name][0]} bytes differ from llama-quantize's"
        types[name] = a[name][0]
    g = gguf.GGUFReader(str(ours))
    assert int(g.fields["general.file_type"].contents()) == int(gguf.GGUFReader(str(ref)).fields["general.file_type"].contents())
    if mix == "q4_k_m":
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
        more = [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
        assert more == [0, 3, 6, 7], more
        # ffn_down's width 704: Q4_K -> Q5_0 and Q6_K -> Q8_0, each announced like llama.cpp does
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q8_0", "Q5_0", "Q5_0", "Q8_0", "Q5_0",
                                                                          "Q5_0", "Q8_0", "Q8_0"]
        assert "blk.1.ffn_down.weight - ncols 704 not divisible by 256 (required for type q4_K) -> falling back to q5_0" \
            in r.stderr, r.stderr
        assert "8 of 75 tensor(s) required fallback quantization" in r.stderr, r.stderr


def test_export_from_a_hugging_face_dir(tmp_path, fp_run):
    """The same model as a Hugging Face checkpoint dir (safetensors + tokenizer.model, as transformers
    reads it) exports to the same GGUF bytes as the run it came from."""
    d, _ = fp_run
    hf = tmp_path / "hf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "hf", "--dtype", "fp32", "--out", str(hf)],
                   check=True, capture_output=True)
    for src, out in ((d / "fp", tmp_path / "run.gguf"), (hf, tmp_path / "hf.gguf")):
        r = subprocess.run([QFORGE, "-q", "export", str(src), "--format", "gguf", "--quant", "q4_k_m", "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a, b = _tensors(tmp_path / "run.gguf"), _tensors(tmp_path / "hf.gguf")
    assert a == b
