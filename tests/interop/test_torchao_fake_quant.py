"""Live parity of qforge's affine / FP8 fake quantizers (quant/affine.cpp) with torchao 0.18.

Seeded random tensors (weights: normal, uniform, heavy outliers, all-positive, rows of zeros;
activations [B, T, D]: shifted normal, uniform, outlier channels) are written to a safetensors
file, run through build/interop/interop_affine (QFORGE_BUILD_DIR), and compared with torchao's
IntxFakeQuantizer / Float8FakeQuantizer on the same tensors:
  * fake-quant outputs and scales: bit-identical (compared as raw bits, so -0.0 != +0.0);
  * zero points: identical (after the dtype/offset mapping documented in TORCHAO below);
  * integer codes: identical to torchao's quantize step on torchao's qparams;
  * dequantize(quantize(x)) == fake_quant(x) bit for bit (qforge's own invariant);
  * the STE mask equals the pre-clamp test recomputed from torchao's qparams (torchao 0.18's
    _fake_quantize_affine_cachemask tests the value after clamping, so it is always true and is
    not a usable reference; the per-channel/group fake quantizer computes no mask at all).
Per-token activations of shape [B, T, D] are passed unflattened: qforge flattens the leading dims
(B*T tokens, scale [B*T, 1]); torchao returns scales [B, T], compared after reshape(-1, 1).
Deviations that are checked explicitly: int8-per-token uses torch.uint8 (QuantSpec's [0, 255]);
torchao's usual torch.int8 config gives the same outputs and scales with zero points 128 lower.
FP8 blocks whose amax is 0 give 0 in qforge and NaN in torchao (0/0).

Run: QFORGE_BUILD_DIR=build .venv/bin/python -m pytest -q tests/interop/test_torchao_fake_quant.py
"""
import subprocess

import pytest
import torch
import torchao  # noqa: F401  (the real peer; required, never skipped)
from torchao.quantization.granularity import PerRow, PerTensor
from torchao.quantization.qat import (
    Float8FakeQuantizeConfig,
    Float8FakeQuantizer,
    IntxFakeQuantizeConfig,
    IntxFakeQuantizer,
)
from torchao.quantization.quant_primitives import ZeroPointDomain
from st_io import interop_tool, read_safetensors, write_safetensors  # noqa: E402


def bits(t):
    """Raw bit pattern, so that equality is bit-for-bit (NaN payloads and -0.0 included)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ---------------------------------------------------------------- test tensors
def _weights(gen, shape, kind):
    r, c = shape
    if kind == "normal":
        return torch.randn(shape, generator=gen) * 0.02
    if kind == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    if kind == "outliers":
        w = torch.randn(shape, generator=gen) * 0.05
        idx = torch.randint(0, r * c, (max(1, r * c // 200),), generator=gen)
        w.view(-1)[idx] *= 60.0
        return w
    if kind == "positive":  # no negative values: asymmetric min/max and min(., 0) paths differ
        return torch.rand(shape, generator=gen) * 0.5 + 0.25
    if kind == "zero_rows":  # all-zero and constant rows: eps clamps
        w = torch.randn(shape, generator=gen)
        w[0].zero_()
        w[-1].fill_(0.37)
        return w
    if kind == "tiny_rows":  # rows far below 1e-4: fp16 scales become subnormal / their reciprocal inf
        w = torch.randn(shape, generator=gen) * 0.02
        w[0] *= 1e-3
        w[-1] *= 1e-6
        return w
    raise ValueError(kind)


def _acts(gen, shape, kind):
    if kind == "normal":
        return torch.randn(shape, generator=gen) * 3 + 0.5
    if kind == "uniform":
        return torch.rand(shape, generator=gen) * 8 - 2
    if kind == "outliers":  # a few outlier channels, as in LLM activations
        a = torch.randn(shape, generator=gen)
        ch = torch.randint(0, shape[-1], (3,), generator=gen)
        a[..., ch] *= 40.0
        return a
    if kind == "zero_tokens":
        a = torch.randn(shape, generator=gen)
        a[0, 0].zero_()
        return a
    if kind == "tiny_tokens":
        a = torch.randn(shape, generator=gen)
        a[0, 0] *= 1e-6
        a[-1, -1] *= 1e-9
        return a
    raise ValueError(kind)


W_KINDS = ["normal", "uniform", "outliers", "positive", "zero_rows", "tiny_rows"]
A_KINDS = ["normal", "uniform", "outliers", "zero_tokens", "tiny_tokens"]

# spec -> (shapes, kinds, generator, dtypes)
SPECS = {
    # the presets and hand-built specs named by the brief
    "int4-g32": ([(8, 256), (16, 64), (3, 96)], W_KINDS, _weights, [torch.float32, torch.bfloat16]),
    "int4-g128-asym": ([(8, 256), (16, 128), (5, 384)], W_KINDS, _weights, [torch.float32, torch.bfloat16]),
    "int8-per-channel": ([(8, 256), (32, 48), (1, 100)], W_KINDS, _weights, [torch.float32]),
    "int4-per-channel": ([(8, 256), (32, 48), (7, 33)], W_KINDS, _weights, [torch.float32]),
    "int8-g64": ([(8, 256), (6, 192)], W_KINDS, _weights, [torch.float32]),
    "int8-per-token": ([(2, 5, 64), (3, 7, 128), (1, 1, 40)], A_KINDS, _acts, [torch.float32, torch.bfloat16]),
    # more coverage: other bit widths, scale dtypes, per-tensor, asymmetric per-channel
    "int4-g32-bf16": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "int4-g32-f16": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "int2-g32": ([(8, 128)], W_KINDS, _weights, [torch.float32]),
    "int3-g32-asym": ([(8, 128)], W_KINDS, _weights, [torch.float32]),
    "int8-g32-asym-bf16": ([(8, 128)], W_KINDS, _weights, [torch.float32]),
    "int4-per-channel-asym": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "int8-per-token-asym-f16": ([(2, 5, 64)], A_KINDS, _acts, [torch.float32]),
    "int8-per-token-sym": ([(2, 5, 64)], A_KINDS, _acts, [torch.float32]),
    "int4-per-tensor": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "int8-per-tensor-asym": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "fp8-e4m3": ([(8, 256), (16, 64)], W_KINDS, _weights, [torch.float32, torch.bfloat16]),
    "fp8-e5m2": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
    "fp8-e4m3-per-tensor": ([(8, 256)], W_KINDS, _weights, [torch.float32]),
}


def _cases():
    cases, seed = {}, 1234
    for spec, (shapes, kinds, make, dtypes) in SPECS.items():
        for shape in shapes:
            for kind in kinds:
                for dt in dtypes:
                    seed += 1
                    x = make(torch.Generator().manual_seed(seed), shape, kind).to(dt)
                    name = f"{kind}_{'x'.join(map(str, shape))}_{str(dt).split('.')[-1]}"
                    cases[f"{spec}/{name}"] = (spec, x)
    return cases


CASES = _cases()


# ---------------------------------------------------------------- torchao reference
_SCALE = {"": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_INT = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}
_UINT = {2: torch.uint2, 3: torch.uint3, 4: torch.uint4, 8: torch.uint8}


def parse(spec):
    """Mirror of interop_affine's spec grammar; presets expanded to their QuantSpec fields."""
    presets = {
        "int4-g32": "int4-g32",
        "int4-g128-asym": "int4-g128-asym-f16",  # QuantSpec preset: fp16 scales
        "int8-per-channel": "int8-per-channel",
        "int8-per-token": "int8-per-token-asym",  # activations: asymmetric
        "fp8-e4m3": "fp8-e4m3-per-channel",
        "fp8-e5m2": "fp8-e5m2-per-channel",
    }
    tok = presets.get(spec, spec).split("-")
    p = {"asym": "asym" in tok, "sdt": ""}
    for t in ("bf16", "f16"):
        if t in tok:
            p["sdt"] = t
    if tok[0] == "fp8":
        p["fp8"] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[tok[1]]
        rest = tok[2:]
    else:
        p["bits"] = int(tok[0][3:])
        rest = tok[1:]
    if rest[0] == "per":
        p["gran"] = rest[1]
    else:
        p["gran"], p["group"] = "group", int(rest[0][1:])
    return p


def torchao_config(p):
    """The IntxFakeQuantizeConfig that QuantSpec p means (see quant/affine.cpp's header comment)."""
    sdt = _SCALE[p["sdt"]]
    gran = {"group": None, "channel": "per_channel", "tensor": "per_channel", "token": "per_token"}[p["gran"]]
    if p["gran"] == "token" and not p["asym"]:
        gran = "per_channel"  # torchao: NotImplementedError; qforge: per-channel arithmetic per token
    kw = {"group_size": p["group"]} if p["gran"] == "group" else {}
    if not p["asym"]:
        return IntxFakeQuantizeConfig(_INT[p["bits"]], gran, scale_precision=sdt, **kw)
    if p["gran"] == "token":
        return IntxFakeQuantizeConfig(_UINT[p["bits"]], gran, is_symmetric=False, scale_precision=sdt)
    # torchao's own asymmetric per-group QAT config (qat/linear.py _get_4w_weight_config): the
    # tinygemm float zero point, kept in float (the defaults would truncate it to int32).
    return IntxFakeQuantizeConfig(_UINT[p["bits"]], gran, is_symmetric=False, scale_precision=sdt,
                                  zero_point_precision=sdt, zero_point_domain=ZeroPointDomain.FLOAT, **kw)


def torchao_reference(spec, x):
    """(fq, scale [rows, n_blocks] f32, zero_point f32, pre-clamp values, qmin, qmax, deviating
    elements) from torchao, with qforge's one documented deviation applied (see below)."""
    p = parse(spec)
    cfg = torchao_config(p)
    fqz = IntxFakeQuantizer(cfg)
    xin = x.reshape(1, -1) if p["gran"] == "tensor" else x  # per-tensor == PerAxis(0) on one row
    if p["gran"] == "token" and not p["asym"]:
        xin = x.reshape(-1, x.shape[-1])  # symmetric per-token == PerAxis(0) on [tokens, D]
    with torch.no_grad():
        fq = fqz(xin).reshape(x.shape)
    rows = 1 if p["gran"] == "tensor" else x.numel() // x.shape[-1]
    scale = fqz.scale.reshape(rows, -1)
    zp = fqz.zero_point.reshape(rows, -1)
    nb = scale.shape[1]
    xv = x.reshape(rows, nb, -1)
    s3, z3 = scale.unsqueeze(-1), zp.unsqueeze(-1)
    qmin, qmax = (0, 2 ** p["bits"] - 1) if p["asym"] else (-(2 ** (p["bits"] - 1)), 2 ** (p["bits"] - 1) - 1)
    # the torchao quantize step before its clamp (quant_primitives._quantize_affine_no_dtype_cast /
    # _quantize_affine_tinygemm_no_dtype_cast)
    if cfg.zero_point_domain == ZeroPointDomain.FLOAT:
        mid = (qmax + qmin + 1) / 2
        pre = torch.round((xv - (z3 - s3 * mid)) / s3)
        dev = torch.zeros_like(xv, dtype=torch.bool)
    else:
        inv = 1.0 / s3
        prod = xv * inv
        # DEVIATION (INT domain, fp16 scales): torchao's fp16 1/scale is inf for scales below ~2^-16
        # (and the scale itself underflows to 0 for all-zero groups), giving NaN / +-qmax*scale.
        # qforge uses the float32 reciprocal of the fp16 scale there (0 for a zero scale). These
        # elements are compared with that formula instead of torchao's output; the rest bit for bit.
        dev = torch.isinf(inv).expand_as(xv)
        if dev.any():
            s32 = s3.float()
            inv32 = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
            prod = torch.where(dev, (xv.float() * inv32).to(prod.dtype), prod)
            fixed = ((prod.round() + z3).clamp(qmin, qmax).to(x.dtype) - z3.to(x.dtype)) * s3
            fq = torch.where(dev.reshape(x.shape), fixed.reshape(x.shape).to(x.dtype), fq)
        pre = torch.round(prod) + z3
    return fq, scale.float(), zp.float(), pre.reshape(x.shape), qmin, qmax, dev.reshape(x.shape)


# ---------------------------------------------------------------- run qforge once
def _tool():
    return interop_tool("interop_affine")


@pytest.fixture(scope="module")
def qforge(tmp_path_factory):
    tool = _tool()
    d = tmp_path_factory.mktemp("affine")
    inp, out = str(d / "in.safetensors"), str(d / "out.safetensors")
    write_safetensors(inp, {k: x for k, (_, x) in CASES.items()})
    r = subprocess.run([tool, inp, out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"interop_affine failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return read_safetensors(out)


INT_KEYS = [k for k, (s, _) in CASES.items() if not s.startswith("fp8")]
FP8_KEYS = [k for k, (s, _) in CASES.items() if s.startswith("fp8")]


@pytest.mark.parametrize("key", INT_KEYS)
def test_intx_fake_quant_matches_torchao(qforge, key):
    spec, x = CASES[key]
    fq, scale, zp, pre, qmin, qmax, dev = torchao_reference(spec, x)
    ours = {f: qforge[f"{key}/{f}"] for f in ("fq", "scale", "zero_point", "mask", "q", "dq")}
    assert ours["fq"].dtype == x.dtype and ours["fq"].shape == x.shape
    assert torch.equal(bits(ours["scale"]), bits(scale)), f"{key}: scales differ"
    assert torch.equal(ours["zero_point"], zp), f"{key}: zero points differ"
    diff = (bits(ours["fq"]) != bits(fq)).sum().item()
    assert diff == 0, f"{key}: {diff} of {x.numel()} fake-quant values differ from torchao"
    # integer codes == torchao's clamped quantize step; dequantize(quantize(x)) == fake_quant(x)
    assert torch.equal(ours["q"], pre.clamp(qmin, qmax).to(torch.int32)), f"{key}: codes differ"
    assert torch.equal(bits(ours["dq"]), bits(ours["fq"])), f"{key}: dequantize(quantize(x)) != fake_quant(x)"
    # STE mask == "pre-clamp value inside [qmin, qmax]"
    assert torch.equal(ours["mask"].bool(), (pre >= qmin) & (pre <= qmax)), f"{key}: mask differs"


@pytest.mark.parametrize("key", [k for k in INT_KEYS if k.startswith("int8-per-token/")])
def test_per_token_int8_dtype_only_shifts_zero_point(qforge, key):
    """torchao's usual activation config is torch.int8 ([-128, 127]); qforge uses QuantSpec's
    [0, 255] (== torch.uint8). Same fake-quant values and scales; zero points differ by 128."""
    _, x = CASES[key]
    fqz = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    with torch.no_grad():
        fq = fqz(x)
    assert torch.equal(bits(qforge[f"{key}/fq"]), bits(fq))
    assert torch.equal(bits(qforge[f"{key}/scale"]), bits(fqz.scale.float().reshape(-1, 1)))
    assert torch.equal(qforge[f"{key}/zero_point"], fqz.zero_point.float().reshape(-1, 1) + 128)


@pytest.mark.parametrize("key", FP8_KEYS)
def test_fp8_fake_quant_matches_torchao(qforge, key):
    spec, x = CASES[key]
    p = parse(spec)
    gran = PerTensor() if p["gran"] == "tensor" else PerRow()
    with torch.no_grad():
        ref = Float8FakeQuantizer(Float8FakeQuantizeConfig(dtype=p["fp8"], granularity=gran))(x)
    ours = qforge[f"{key}/fq"]
    assert ours.dtype == x.dtype and ours.shape == x.shape
    # Deviation: a block whose amax is 0 is 0 in qforge; torchao computes 0/0 and returns NaN.
    if p["gran"] == "tensor":
        zero_block = torch.full_like(x, bool(x.abs().max() == 0), dtype=torch.bool)
    else:
        zero_block = (x.abs().amax(-1, keepdim=True) == 0).expand_as(x)
    assert torch.isnan(ref[zero_block]).all()
    assert (ours[zero_block] == 0).all()
    keep = ~zero_block
    diff = (bits(ours[keep]) != bits(ref[keep])).sum().item()
    assert diff == 0, f"{key}: {diff} of {keep.sum().item()} fp8 fake-quant values differ from torchao"


def test_cases_cover_the_brief():
    specs = {s for s, _ in CASES.values()}
    for s in ("int4-g32", "int4-g128-asym", "int8-per-channel", "int4-per-channel", "int8-g64", "int8-per-token"):
        assert s in specs
    # the zero-row / zero-token cases exist, so the eps clamps and the fp8 deviation are exercised
    assert any(k.startswith("fp8-e4m3/zero_rows") for k in CASES)


def test_fp16_scale_deviation_is_exercised():
    """The fp16-reciprocal deviation really occurs in the cases (and only for fp16 INT-domain specs)."""
    hit = set()
    for spec, x in CASES.values():
        if not spec.startswith("fp8") and torchao_reference(spec, x)[-1].any():
            hit.add(spec)
    assert hit == {"int4-g32-f16", "int8-per-token-asym-f16"}, hit
