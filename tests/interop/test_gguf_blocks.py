"""qforge's llama.cpp block formats (quant/ggml_blocks.cpp) against the real peers: libggml (the
llama-cpp-python wheel's ggml_quantize_chunk, i.e. what llama-quantize writes) and gguf-py.

Runs $QFORGE_BUILD_DIR/interop/interop_ggml on seeded random float32 matrices (several shapes and
distributions), each with an importance matrix, and checks per type and matrix:
  * qforge's block bytes == libggml's ggml_quantize_chunk(type, x, imatrix = NULL) (the reference
    quantizers quantize_row_<type>_ref), and, for the types gguf-py can quantize (q8_0, q4_0, q4_1,
    q5_0, q5_1), == gguf.quants.quantize() too;
  * qforge's importance-weighted bytes (quantize(w, rule, imatrix)) == ggml_quantize_chunk(type, x,
    imatrix) (quantize_row_<type>_impl; q8_0 ignores the weights), for several imatrix shapes;
  * gguf.quants.dequantize(those bytes) == qforge's fake quant (resp. dequantize of the weighted
    bytes) bit for bit, plus (unweighted) a loose accuracy bound so bytes that merely decode
    consistently but wrongly still fail.

Needs gguf, numpy and llama_cpp (in .venv); a missing peer is a failure, not a skip.
"""
import subprocess

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llama_ref import quantize as ggml_quantize
from st_io import interop_tool, read_safetensors_numpy as read_safetensors, write_safetensors  # noqa: E402

RULES = {
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1,
    "q5_0": QT.Q5_0,
    "q5_1": QT.Q5_1,
    "q2_k": QT.Q2_K,
    "q3_k": QT.Q3_K,
    "q4_k": QT.Q4_K,
    "q5_k": QT.Q5_K,
    "q6_k": QT.Q6_K,
}
GGUF_QUANTIZES = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}  # gguf-py implements quantize_blocks for these only
SHAPES = [(1, 256), (7, 512), (33, 768), (64, 1024)]
# Worst |error| per block as a fraction of its spread, generous for each grid (catches wrong decodes).
BOUND = {"q2_k": 1.0, "q3_k": 1.0}


def tool_path():
    return interop_tool("interop_ggml")


# ------------------------------------------------------------------ minimal safetensors I/O


# ------------------------------------------------------------------ inputs

def make_inputs():
    rng = np.random.default_rng(20240607)
    mats = {}
    for rows, cols in SHAPES:
        tag = f"{rows}x{cols}"
        mats[f"normal_{tag}"] = rng.standard_normal((rows, cols))
        mats[f"uniform_{tag}"] = rng.uniform(-1.0, 3.0, (rows, cols))
        out = rng.standard_normal((rows, cols)) * 0.02
        hit = rng.random((rows, cols)) < 0.01
        out[hit] = rng.choice([-60.0, -8.0, 25.0, 90.0], size=int(hit.sum()))
        mats[f"outliers_{tag}"] = out
        zr = rng.standard_normal((rows, cols))
        zr[::3] = 0.0
        if cols >= 512:
            zr[1, 32:288] = 0.0  # zero blocks inside a non-zero row
        mats[f"zero_rows_{tag}"] = zr
        mats[f"tiny_{tag}"] = rng.standard_normal((rows, cols)) * 1e-6  # fp16 scales go subnormal
        mats[f"tinier_{tag}"] = rng.standard_normal((rows, cols)) * 1e-9  # fp16 scales underflow to 0
        mats[f"ties_{tag}"] = rng.integers(-8, 9, (rows, cols)) * 0.5  # exact .5 steps, repeated |max|
        mats[f"positive_{tag}"] = np.exp(rng.standard_normal((rows, cols)))
        halves = rng.integers(-127, 127, (rows, cols)) + 0.5  # amax 127 -> q8_0 d = 1: roundf of exact halves
        halves[:, ::32] = rng.choice([-127.0, 127.0], size=(rows, cols // 32))
        mats[f"halves_{tag}"] = halves
        mats[f"wide_{tag}"] = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-6, 6, (rows, 1)))
    # +0.0 only: gguf-py picks the signed max by argmax and would see a leading -0.0 where ggml keeps +0.
    return {k: (v.astype(np.float32) + np.float32(0.0)) for k, v in mats.items()}


def make_imatrices(mats):
    """Per matrix one importance matrix (llama.cpp's: mean squared input per column), cycling
    through shapes: skewed to a few columns, flat, with dead (zero) columns, and huge values."""
    rng = np.random.default_rng(7)
    out = {}
    for i, (name, x) in enumerate(sorted(mats.items())):
        cols = x.shape[1]
        kind = i % 4
        if kind == 0:
            im = rng.random(cols) ** 6 * 50
        elif kind == 1:
            im = np.ones(cols)
        elif kind == 2:
            im = rng.exponential(1.0, cols)
            im[rng.random(cols) < 0.3] = 0.0
        else:
            im = rng.exponential(1e6, cols)
        out[name] = im.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tool = tool_path()
    d = tmp_path_factory.mktemp("gguf_blocks")
    mats = make_inputs()
    ims = make_imatrices(mats)
    tensors = {f"{rule}/{name}": m for rule in RULES for name, m in mats.items()}
    tensors.update({f"{rule}/{name}/imatrix": ims[name] for rule in RULES for name in mats})
    src, dst = str(d / "in.safetensors"), str(d / "out.safetensors")
    write_safetensors(src, tensors)
    proc = subprocess.run([tool, src, dst], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interop_ggml failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return mats, ims, read_safetensors(dst)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def describe_mismatch(a, b):
    bad = np.argwhere(a != b)
    i = tuple(bad[0])
    return f"{len(bad)} mismatches, first at {i}: {a[i]!r} vs {b[i]!r}"


def check_accuracy(key, rule, x, deq, block):
    """Loose accuracy bound per block where fp16 scales are in their normal range."""
    xb = x.reshape(-1, block).astype(np.float64)
    err = np.abs(deq.reshape(-1, block) - xb).max(axis=1)
    rng_ = xb.max(axis=1) - np.minimum(xb.min(axis=1), 0)
    spread = np.maximum(np.abs(xb).max(axis=1), rng_)
    ok = spread > 1e-3
    bound = spread[ok] * BOUND.get(rule, 1 / 7)
    assert np.all(err[ok] <= bound), f"{key}: error {err[ok].max()} too large for {rule}"


@pytest.mark.parametrize("rule", list(RULES))
def test_blocks_and_dequant_match_libggml_and_gguf(run, rule):
    mats, _, out = run
    qtype = RULES[rule]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for name, x in mats.items():
        key = f"{rule}/{name}"
        blocks, deq = out[f"{key}/blocks"], out[f"{key}/dequant"]
        assert blocks.shape == (x.shape[0], x.shape[1] // block * type_size), key
        assert deq.shape == x.shape and deq.dtype == np.float32, key

        ref = np.frombuffer(ggml_quantize(qtype.name, x), np.uint8).reshape(blocks.shape)
        assert np.array_equal(blocks, ref), f"{key}: block bytes differ from libggml's: " + describe_mismatch(blocks, ref)
        if rule in GGUF_QUANTIZES:
            ref = gguf.quants.quantize(x, qtype)
            assert ref.shape == blocks.shape
            assert np.array_equal(blocks, ref), f"{key}: block bytes differ from gguf-py: " + describe_mismatch(blocks, ref)

        ref_deq = gguf.quants.dequantize(blocks, qtype)
        assert np.array_equal(bits(deq), bits(ref_deq)), (
            f"{key}: fake_quant differs from gguf-py dequantize: " + describe_mismatch(bits(deq), bits(ref_deq)))
        check_accuracy(key, rule, x, deq, block)


@pytest.mark.parametrize("rule", list(RULES))
def test_imatrix_blocks_match_libggml(run, rule):
    mats, ims, out = run
    qtype = RULES[rule]
    differs = 0
    for name, x in mats.items():
        key = f"{rule}/{name}"
        blocks, deq = out[f"{key}/blocks_imatrix"], out[f"{key}/dequant_imatrix"]
        ref = np.frombuffer(ggml_quantize(qtype.name, x, ims[name]), np.uint8).reshape(blocks.shape)
        assert np.array_equal(blocks, ref), (
            f"{key}: importance-weighted bytes differ from libggml's: " + describe_mismatch(blocks, ref))
        ref_deq = gguf.quants.dequantize(blocks, qtype)
        assert np.array_equal(bits(deq), bits(ref_deq)), (
            f"{key}: dequantize differs from gguf-py: " + describe_mismatch(bits(deq), bits(ref_deq)))
        # (no accuracy bound here: a weighted fit may trade an unimportant column's error away)
        differs += not np.array_equal(blocks, out[f"{key}/blocks"])
    # The weighted path is a different quantizer (all but q8_0, which ignores the weights).
    assert (differs == 0) if rule == "q8_0" else (differs > len(mats) // 2), (rule, differs)


def test_bad_width_is_reported(tmp_path):
    tool = tool_path()
    src, dst = str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")
    write_safetensors(src, {"q4_k/narrow": np.ones((2, 48), np.float32)})
    proc = subprocess.run([tool, src, dst], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "48" in proc.stderr and "256" in proc.stderr, proc.stderr
