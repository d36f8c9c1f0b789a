"""`qforge export --format gguf --quant MIX` on a float model against llama.cpp's own pipeline:
qforge's f32 GGUF requantized by llama_model_quantize (the llama-quantize tool) must be the file
qforge writes directly - every tensor's name, ggml type and bytes identical - for the mixtures
q4_k_m (Q6_K output, use_more_bits attn_v/ffn_down, shape fallbacks), q4_0, q5_0, q5_1, q8_0 and the
K mixtures q2_k, q3_k_s/m/l, q4_k_s, q5_k_s/m (qforge's plain q3_k / q5_k against Q3_K_S / Q5_K_S).
The model has the demo's shape problem on purpose (ffn 704: no 256-block type for ffn_down, which
falls back to Q4_0 / Q5_0 / Q5_1 / Q8_0, as llama.cpp warns) and 8 layers so use_more_bits picks
layers 0, 3, 6, 7. A second model with 4 query heads per KV head takes q2_k's GQA rule (attn_v
Q4_K), and a Phi-3 checkpoint's fused attn_qkv follows the attn_v rules (llama.cpp counts it as one).
With `--imatrix` (qforge imatrix of the same run), q2_k_s, q2_k, q3_k_m, q4_k_m and q5_k_m equal
llama-quantize --imatrix too; q2_k_s without one is refused by both."""
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest

from llama_ref import llama_quantize
from test_gguf_lowbit import imatrix_values
from tiny_runs import QFORGE, tiny_recipe, train


def _fp_model(d, tie, *shape):
    """A 2-step float run d/fp of that shape and its f32 GGUF (llama-quantize's input): (d, path)."""
    train(tiny_recipe(d, "fp", tie=tie, max_steps=2), *shape)
    base = d / "f32.gguf"
    subprocess.run([QFORGE, "-q", "export", str(d / "fp"), "--format", "gguf", "--quant", "f32", "--out", str(base)],
                   check=True, capture_output=True)
    return d, base


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    return _fp_model(tmp_path_factory.mktemp("mix"), False, "model.dim=256", "model.n_layers=8", "model.n_heads=4",
                     "model.n_kv_heads=2", "model.ffn_dim=704")


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _compare(tmp_path, src, base, mix, ref_mix=None):
    """qforge's `export --quant mix` of src vs llama_model_quantize(base f32 GGUF, ref_mix or mix):
    returns ({tensor: ggml type}, qforge's stderr)."""
    ref = tmp_path / "ref.gguf"
    llama_quantize(base, ref, ref_mix or mix)
    ours = tmp_path / "ours.gguf"
    r = subprocess.run([QFORGE, "export", str(src), "--format", "gguf", "--quant", mix, "--out", str(ours)],
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
    return types, r.stderr


# qforge's plain q3_k / q5_k choose what llama-quantize's Q3_K_S / Q5_K_S do for a dense model.
PLAIN = {"q3_k": "q3_k_s", "q5_k": "q5_k_s"}


@pytest.mark.parametrize("mix", ["q4_k_m", "q4_0", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                                 "q4_k_s", "q5_k_s", "q5_k_m", "q3_k", "q5_k"])
def test_export_equals_llama_quantize(tmp_path, fp_run, mix):
    d, base = fp_run
    types, stderr = _compare(tmp_path, d / "fp", base, mix, PLAIN.get(mix))
    layers = lambda t: [types[f"blk.{i}.{t}.weight"] for i in range(8)]
    if mix == "q2_k":  # n_gqa 2: attn_v Q3_K; attn_output and ffn_down Q3_K (ffn_down's 704 -> Q4_0)
        assert layers("attn_v") == ["Q3_K"] * 8 and layers("attn_output") == ["Q3_K"] * 8
        assert layers("ffn_down") == ["Q4_0"] * 8 and layers("attn_q") == ["Q2_K"] * 8
    if mix == "q3_k_m":  # attn_v Q5_K in the first two layers, then Q4_K; attn_output Q4_K
        assert layers("attn_v") == ["Q5_K"] * 2 + ["Q4_K"] * 6 and layers("attn_output") == ["Q4_K"] * 8
    if mix == "q5_k_m":
        assert layers("attn_v") == ["Q6_K", "Q5_K", "Q5_K", "Q6_K", "Q5_K", "Q5_K", "Q6_K", "Q6_K"]
        assert layers("ffn_down") == ["Q8_0", "Q5_1", "Q5_1", "Q8_0", "Q5_1", "Q5_1", "Q8_0", "Q8_0"]
    if mix == "q4_k_m":
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
        more = [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
        assert more == [0, 3, 6, 7], more
        # ffn_down's width 704: Q4_K -> Q5_0 and Q6_K -> Q8_0, each announced like llama.cpp does
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q8_0", "Q5_0", "Q5_0", "Q8_0", "Q5_0",
                                                                          "Q5_0", "Q8_0", "Q8_0"]
        assert "blk.1.ffn_down.weight - ncols 704 not divisible by 256 (required for type q4_K) -> falling back to q5_0" \
            in stderr, stderr
        assert "8 of 75 tensor(s) required fallback quantization" in stderr, stderr


def test_q2_k_with_four_query_heads_per_kv_head(tmp_path_factory):
    """llama-quantize's Q2_K gives attn_v Q4_K when n_gqa >= 4."""
    d, base = _fp_model(tmp_path_factory.mktemp("mix_gqa4"), True, "model.dim=256", "model.n_layers=2",
                        "model.n_heads=4", "model.n_kv_heads=1", "model.ffn_dim=512")
    types, _ = _compare(d, d / "fp", base, "q2_k")
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(2)] == ["Q4_K"] * 2
    assert types["token_embd.weight"] == "Q6_K"  # tied: the output's type


@pytest.fixture(scope="module")
def fp_imatrix(fp_run):
    d, _ = fp_run
    im = d / "im.gguf"
    subprocess.run([QFORGE, "-q", "imatrix", str(d / "fp"), "--chunks", "8", "--out", str(im)], check=True,
                   capture_output=True)
    return im


@pytest.mark.parametrize("mix", ["q2_k_s", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m"])
def test_k_mixture_with_imatrix_equals_llama_quantize(tmp_path, fp_run, fp_imatrix, mix):
    """`export --quant MIX --imatrix F`: the importance-weighted K-quant blocks in llama-quantize
    --imatrix's mixture (q2_k_s's Q4_K first-eighth ffn_down), type and bytes."""
    d, base = fp_run
    ref = tmp_path / "ref.gguf"
    llama_quantize(base, ref, mix, imatrix=imatrix_values(fp_imatrix))
    ours = tmp_path / "ours.gguf"
    r = subprocess.run([QFORGE, "export", str(d / "fp"), "--format", "gguf", "--quant", mix, "--imatrix",
                        str(fp_imatrix), "--out", str(ours)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{mix} {name}: qforge {a[name][0]}, llama-quantize {b[name][0]} (or bytes differ)"
    if mix == "q2_k_s":  # ffn_down Q4_K in layer 0 (-> Q5_0 at width 704), Q2_K (-> Q4_0) after
        assert [a[f"blk.{i}.ffn_down.weight"][0] for i in range(3)] == ["Q5_0", "Q4_0", "Q4_0"]
        assert a["blk.0.attn_v.weight"][0] == "Q2_K"


def test_q2_k_s_needs_an_imatrix(tmp_path, fp_run):
    d, base = fp_run
    with pytest.raises(RuntimeError):
        llama_quantize(base, tmp_path / "ref.gguf", "q2_k_s")
    r = subprocess.run([QFORGE, "export", str(d / "fp"), "--format", "gguf", "--quant", "q2_k_s", "--out",
                        str(tmp_path / "ours.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and "q2_k_s needs an importance matrix" in r.stderr, r.stderr
    assert not (tmp_path / "ours.gguf").exists()


def test_fused_qkv_follows_the_attn_v_rules(tmp_path):
    """Phi-3's fused attn_qkv under q4_k_m (Q4_K, Q6_K in the use_more_bits layer 1) and q3_k_l (Q5_K),
    which this model's width 64 turns into Q5_0 / Q8_0 and Q5_1, as llama-quantize chooses."""
    import test_gguf_families as fam
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning God created the heaven and the earth. " * 200)
    d, _ = fam._checkpoint(tmp_path, "phimini_nowin", corpus)
    base = tmp_path / "f32.gguf"
    fam._export(d, base, "f32")
    for mix, want in (("q4_k_m", ["Q5_0", "Q8_0"]), ("q3_k_l", ["Q5_1", "Q5_1"])):
        out = tmp_path / mix
        out.mkdir()
        types, _ = _compare(out, d, base, mix)
        assert [types[f"blk.{i}.attn_qkv.weight"] for i in range(2)] == want, (mix, types)


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
