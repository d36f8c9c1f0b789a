"""qforge's llama.cpp block formats (quant/ggml_blocks.cpp) against the real peer, gguf-py.

Runs $QFORGE_BUILD_DIR/interop/interop_ggml on seeded random float32 matrices (several shapes and
distributions) and checks, per matrix:
  * q8_0 / q4_0 / q4_1 / q5_0 / q5_1: qforge's block bytes are identical to gguf.quants.quantize(), whose
    quantizers for these types are bit-exact ports of ggml-quants.c's reference quantizers; and
    qforge's fake-quant values equal gguf.quants.dequantize() of those bytes bit for bit.
  * q4_K / q6_K: gguf-py has no quantizer for the K-quants (only dequantization), so here only
    gguf.quants.dequantize(qforge's bytes) == qforge's fake-quant values bit for bit (plus a loose
    accuracy bound so bytes that merely decode consistently but wrongly still fail). The K-quant
    bytes themselves are checked against llama.cpp itself later (a GGUF only counts once llama.cpp
    loads and runs it).

Needs gguf and numpy (in .venv); a missing peer is a failure, not a skip.
"""
import subprocess

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from st_io import interop_tool, read_safetensors_numpy as read_safetensors, write_safetensors  # noqa: E402

RULES = {
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1,
    "q5_0": QT.Q5_0,
    "q5_1": QT.Q5_1,
    "q4_k": QT.Q4_K,
    "q6_k": QT.Q6_K,
}
GGUF_QUANTIZES = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}  # gguf-py implements quantize_blocks for these only
SHAPES = [(1, 256), (7, 512), (33, 768), (64, 1024)]


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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tool = tool_path()
    d = tmp_path_factory.mktemp("gguf_blocks")
    mats = make_inputs()
    tensors = {f"{rule}/{name}": m for rule in RULES for name, m in mats.items()}
    src, dst = str(d / "in.safetensors"), str(d / "out.safetensors")
    write_safetensors(src, tensors)
    proc = subprocess.run([tool, src, dst], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interop_ggml failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return mats, read_safetensors(dst)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def describe_mismatch(a, b):
    bad = np.argwhere(a != b)
    i = tuple(bad[0])
    return f"{len(bad)} mismatches, first at {i}: {a[i]!r} vs {b[i]!r}"


@pytest.mark.parametrize("rule", list(RULES))
def test_blocks_and_dequant_match_gguf(run, rule):
    mats, out = run
    qtype = RULES[rule]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for name, x in mats.items():
        key = f"{rule}/{name}"
        blocks, deq = out[f"{key}/blocks"], out[f"{key}/dequant"]
        assert blocks.shape == (x.shape[0], x.shape[1] // block * type_size), key
        assert deq.shape == x.shape and deq.dtype == np.float32, key

        if rule in GGUF_QUANTIZES:
            ref = gguf.quants.quantize(x, qtype)
            assert ref.shape == blocks.shape
            assert np.array_equal(blocks, ref), f"{key}: block bytes differ from gguf-py: " + describe_mismatch(blocks, ref)

        ref_deq = gguf.quants.dequantize(blocks, qtype)
        assert np.array_equal(bits(deq), bits(ref_deq)), (
            f"{key}: fake_quant differs from gguf-py dequantize: " + describe_mismatch(bits(deq), bits(ref_deq)))

        # Loose accuracy bound per block where fp16 scales are in their normal range.
        xb = x.reshape(-1, block).astype(np.float64)
        err = np.abs(deq.reshape(-1, block) - xb).max(axis=1)
        rng_ = xb.max(axis=1) - np.minimum(xb.min(axis=1), 0)
        spread = np.maximum(np.abs(xb).max(axis=1), rng_)
        ok = spread > 1e-3
        assert np.all(err[ok] <= spread[ok] / 7), f"{key}: error {err[ok].max()} too large for {rule}"


def test_bad_width_is_reported(tmp_path):
    tool = tool_path()
    src, dst = str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")
    write_safetensors(src, {"q4_k/narrow": np.ones((2, 48), np.float32)})
    proc = subprocess.run([tool, src, dst], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "48" in proc.stderr and "256" in proc.stderr, proc.stderr
