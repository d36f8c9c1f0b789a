"""`qforge export RUN --format gguf --quant MIX --float-tensors mixture` of a model that holds packed
llama.cpp blocks, against llama.cpp 0c1e570's own pipeline (llama_model_quantize, the llama-quantize
tool's library call, with the same importance weights):
  * a QAT run whose decoder linears are packed in the types llama-quantize's MIX picks for them
    (rules from llama_model_quantize of the float model's f32 GGUF), one linear (blk.1.ffn_up) left
    in float, exported with --float-tensors mixture: every tensor's type equals llama_model_quantize's
    on the QAT model's own f32 GGUF (qforge's HF fp32 export of the run, exported --quant f32), and the
    bytes of the tensors the model holds in float (token_embd, output, blk.1.ffn_up, norms) equal it;
  * the packed linears' bytes equal the exact export's (--float-tensors exact, the default: those
    float tensors F32), and the whole file equals llama_model_quantize of that exact export, which
    copies the packed linears (the workaround bench/quality_table.py's finish_mixture used);
  * general.file_type is the mixture's; with --imatrix the quantize.imatrix.* keys are written;
  * llama.cpp (llama-cpp-python) runs the file with qforge's logits for its weights (qforge loading
    the GGUF, every tensor dequantized as gguf-py does) within llama.cpp's activation quantization
    (max diff <= 1% of the logit scale, KLD <= 1e-5, same argmax), as it runs the exact export;
  * --float-tensors on another format or with another value, and --imatrix on a packed model
    without it, are refused naming the flag and its choices; packed linears of another type than
    the mixture picks are written as they are, with a warning.
Mixtures: q4_k_m (Q6_K attn_v/ffn_down in use_more_bits layers), q3_k_m and q2_k with an imatrix
(n_gqa 4: q2_k's attn_v Q4_K), q4_0 at width 64 (output Q6_K -> Q8_0 fallback).
A missing peer fails, never skips."""
import json
import re
import subprocess

import gguf
import numpy as np
import pytest

from llama_ref import LLAMA_FTYPE, llama_quantize
from st_io import interop_tool
from test_gguf_lowbit import _llama_logits, imatrix_values
from tiny_runs import QFORGE, tiny_recipe, tool_logits, train

SHAPES = {"big": ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=1", "model.ffn_dim=512"],
          "small": []}  # small: tiny_recipe's dim 64, 2 layers, 4/2 heads, ffn 160
GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
LEFT = "blk.1.ffn_up.weight"  # no rule: stays float in the QAT run
FLOAT_HELD = ("token_embd.weight", "output.weight", LEFT)
TYPE_NAME = {0: "F32", 2: "Q4_0", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
CASES = [("q4_k_m", "big", False), ("q3_k_m", "big", True), ("q2_k", "big", True), ("q4_0", "small", False)]


def read_tensors(path):
    """{name: (ggml type id, bytes)} of a GGUF (gguf-py)."""
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _kld(p_logits, q_logits):
    """Mean over positions of KL(softmax(p) || softmax(q)), in float64."""
    lsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    a, b = lsm(p_logits.astype(np.float64)), lsm(q_logits.astype(np.float64))
    return float((np.exp(a) * (a - b)).sum(-1).mean())


def q(*args, check=True):
    r = subprocess.run([QFORGE, *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per shape, lazily: a float run, its f32 GGUF and an imatrix of it."""
    cache = {}

    def get(shape):
        if shape not in cache:
            d = tmp_path_factory.mktemp(f"ft_{shape}")
            cfg = tiny_recipe(d, "fp", tie=False, max_steps=4)
            train(cfg, *SHAPES[shape])
            q("-q", "export", d / "fp", "--format", "gguf", "--quant", "f32", "--out", d / "f32.gguf")
            q("-q", "imatrix", d / "fp", "--chunks", "8", "--out", d / "im.gguf")
            cache[shape] = (d, cfg)
        return cache[shape]

    return get


def qat_run(d, cfg, shape, mix, imv):
    """A 2-step QAT run from the float run, each decoder linear but LEFT in the type llama-quantize's mix
    gives it: d/qat_<mix>/converted and its own f32 GGUF (its weights as a float model holds them)."""
    ref = d / f"types_{mix}.gguf"
    llama_quantize(d / "f32.gguf", ref, mix, imatrix=imv)
    rules = []
    for name, (ty, _) in sorted(read_tensors(ref).items()):
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m and m.group(2) in GGUF_TO_HF and name != LEFT:
            rules.append({"pattern": f"model.layers.{m.group(1)}.{GGUF_TO_HF[m.group(2)]}",
                          "weight": {"preset": TYPE_NAME[ty].lower()}})
    out = d / f"qat_{mix}"
    train(cfg, *SHAPES[shape], f"run.out_dir={out}", f"run.init_from={d}/fp", "trainer.max_steps=2",
          f"quant.rules={json.dumps(rules)}")
    run = out / "converted"
    q("-q", "export", run, "--format", "hf", "--dtype", "fp32", "--out", out / "hf")
    q("-q", "export", out / "hf", "--format", "gguf", "--quant", "f32", "--out", out / "f32.gguf")
    return run, out / "f32.gguf"


@pytest.mark.parametrize("mix,shape,with_imatrix", CASES)
def test_float_tensors_mixture_is_llama_quantizes_file(tmp_path, bases, mix, shape, with_imatrix):
    d, cfg = bases(shape)
    im = d / "im.gguf"
    imv = imatrix_values(im) if with_imatrix else None
    run, qat_f32 = qat_run(d, cfg, shape, mix, imv)
    ours, exact = tmp_path / "ours.gguf", tmp_path / "exact.gguf"
    r = q("export", run, "--format", "gguf", "--quant", mix, "--float-tensors", "mixture", "--out", ours,
          *(["--imatrix", im] if with_imatrix else []))
    assert "packed blocks exact, float tensors as the mixture" in r.stdout, r.stdout
    assert "another type" not in r.stderr, r.stderr
    q("-q", "export", run, "--format", "gguf", "--quant", mix, "--out", exact)
    ref = tmp_path / "ref.gguf"  # llama-quantize of the QAT model as a float model
    llama_quantize(qat_f32, ref, mix, imatrix=imv)
    a, b, e = read_tensors(ours), read_tensors(ref), read_tensors(exact)
    assert sorted(a) == sorted(b) == sorted(e)
    packed = [n for n in a if re.fullmatch(r"blk\.\d+\.\w+\.weight", n) and n.split(".")[2] in GGUF_TO_HF
              and n != LEFT]
    for n in a:
        assert a[n][0] == b[n][0], f"{mix} {n}: qforge {TYPE_NAME.get(a[n][0])}, llama-quantize {TYPE_NAME.get(b[n][0])}"
        if n in packed:
            assert a[n][1] == e[n][1], f"{mix} {n}: packed bytes differ from the exact export's"
        else:  # float-held: token_embd, output, LEFT, norms
            assert a[n][1] == b[n][1], f"{mix} {n}: {TYPE_NAME.get(a[n][0])} bytes differ from llama-quantize's"
    for n in FLOAT_HELD:
        assert e[n][0] == 0 and a[n][0] != 0, (n, e[n][0], a[n][0])  # exact keeps them F32
    # llama-quantize of the exact export (copies the packed linears) writes the same file
    ref2 = tmp_path / "ref2.gguf"
    llama_quantize(exact, ref2, mix, imatrix=imv)
    assert read_tensors(ref2) == a
    g, gr = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(ref))
    ft = int(g.fields["general.file_type"].contents())
    assert ft == int(gr.fields["general.file_type"].contents()) == LLAMA_FTYPE[mix]
    if with_imatrix:
        assert g.fields["quantize.imatrix.file"].contents() == str(im)
        assert g.fields["quantize.imatrix.entries_count"].contents() == len(imv)
        assert " 1 with importance weights" in r.stdout, r.stdout  # LEFT (llama-imatrix has no token_embd/output)
    else:
        assert "quantize.imatrix.file" not in g.fields
    types = {n: TYPE_NAME[v[0]] for n, v in a.items()}
    if mix == "q4_k_m":  # use_more_bits(i, 4): layers 2, 3
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_K", "Q6_K")
    if mix == "q2_k":  # n_gqa 4
        assert types["blk.0.attn_v.weight"] == "Q4_K" and types[LEFT] == "Q2_K"
    if mix == "q4_0":  # width 64: Q6_K -> Q8_0
        assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_0", "Q8_0")
    print(f"\nFLOAT_TENSORS {mix}: file {ours.stat().st_size} B (exact {exact.stat().st_size} B); "
          + ", ".join(f"{n} {types[n]} {len(a[n][1])} B" for n in FLOAT_HELD))
    # llama.cpp runs it with qforge's logits for the file's weights, as closely as the exact export
    ids = [1] + [int(v) for v in (np.arange(30) * 37 + 11) % 390 + 4]
    for path in (ours, exact):
        ql, _ = tool_logits([interop_tool("interop_gguf_in"), "logits", path], tmp_path / f"io_{path.stem}", [ids], 1)
        ql, ll = ql[0], _llama_logits(path, ids)
        scale = max(1.0, float(np.abs(ql).max()))
        err = float(np.abs(ll - ql).max())
        kld = _kld(ql, ll)
        print(f"FLOAT_TENSORS {mix} {path.stem}: max|llama.cpp - qforge| {err:.3g} (logit scale {scale:.3g}), "
              f"KLD {kld:.2e}")
        assert err <= 1e-2 * scale and kld <= 1e-5, (mix, path.stem, err, scale, kld)
        assert np.array_equal(ll.argmax(-1), ql.argmax(-1)), (mix, path.stem)


def test_float_tensors_refusals_and_warning(tmp_path, bases):
    d, cfg = bases("big")
    run = d / "qat_q4_k_m" / "converted"
    if not run.exists():
        run, _ = qat_run(d, cfg, "big", "q4_k_m", None)
    r = q("export", run, "--format", "hf", "--float-tensors", "mixture", "--out", tmp_path / "hf", check=False)
    assert r.returncode != 0 and "--float-tensors (exact|mixture) applies to --format gguf" in r.stderr, r.stderr
    r = q("export", run, "--format", "gguf", "--float-tensors", "all", "--out", tmp_path / "x.gguf", check=False)
    assert r.returncode != 0 and "--float-tensors 'all' is not one of exact, mixture" in r.stderr, r.stderr
    r = q("export", run, "--format", "gguf", "--quant", "q4_k_m", "--imatrix", d / "im.gguf", "--out",
          tmp_path / "x.gguf", check=False)
    assert r.returncode != 0 and "add --float-tensors mixture" in r.stderr, r.stderr
    assert not (tmp_path / "x.gguf").exists()
    # packed linears of other types than q3_k_m picks: written as they are, with a warning
    r = q("export", run, "--format", "gguf", "--quant", "q3_k_m", "--float-tensors", "mixture", "--out",
          tmp_path / "off.gguf")
    assert "packed tensor(s) hold another type than llama-quantize's q3_k_m" in r.stderr, r.stderr
    t = read_tensors(tmp_path / "off.gguf")
    assert TYPE_NAME[t["blk.0.attn_q.weight"][0]] == "Q4_K" and TYPE_NAME[t["token_embd.weight"][0]] == "Q3_K"
