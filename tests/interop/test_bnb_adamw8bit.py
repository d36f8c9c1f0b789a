"""qforge's AdamW8bit (trainer/adamw8bit.cpp) against bitsandbytes.optim.AdamW8bit itself, on the CPU:
the same parameters (below min_8bit_size, exactly 4096, not a multiple of the 256 block, large, one
with always-zero gradient rows), the same 20 gradients, per-parameter weight decay and a changing
learning rate. After every step the parameters, the uint8 state1/state2 codes and the fp32 absmax
must be identical to bitsandbytes', bit for bit (the fp32 state of small parameters too); qforge's
run also passes its state through the checkpoint form halfway, and runs again with small update
chunks.

bitsandbytes 0.50.2's CPU quantize_blockwise finds codes with a lookup search that is not the
nearest-code rounding it documents (0 becomes code 131 = 2.1e-5 of the signed map, and up to 4 codes
off near zero). qforge reproduces it as a 65536-point grid; test_quantizer_matches_at_every_threshold
checks that this is the same function at all of bitsandbytes' decision points: every float32 at
which its code changes (found by bisection over float32 bit patterns) and its predecessor."""
import subprocess

import bitsandbytes as bnb  # a missing peer fails here, loudly
import bitsandbytes.functional as F
import pytest
import torch

from st_io import interop_tool, read_safetensors, write_safetensors

SHAPES = {"small": (64,), "below_min": (33, 100), "at_min": (4096,), "odd": (77, 131), "zero_rows": (300, 64),
          "large": (512, 1024)}
STEPS = 20
HP = dict(lr=2e-3, betas=(0.9, 0.995), eps=1e-8)


def _problem():
    g = torch.Generator().manual_seed(0)
    params, grads, wd = {}, {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        params[name] = torch.randn(shape, generator=g) * 0.02
        gs = torch.randn((STEPS, *shape), generator=g) * (10.0 ** -(i % 4))
        gs[5] *= 30  # a spike: absmax and codes move
        if name == "zero_rows":
            gs[:, :100] = 0  # whole blocks that never see a gradient (absmax 0)
        grads[name] = gs
        wd[name] = 0.1 if len(shape) >= 2 else 0.0
    lrs = [HP["lr"] * min(1.0, (t + 1) / 5) * (0.5 if t >= 15 else 1.0) for t in range(STEPS)]
    return params, grads, wd, lrs


def _run_bnb(params, grads, wd, lrs):
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = bnb.optim.AdamW8bit([{"params": [ps[n]], "weight_decay": wd[n]} for n in ps], **HP)
    out = []
    for t in range(STEPS):
        for gr in opt.param_groups:
            gr["lr"] = lrs[t]
        for n, p in ps.items():
            p.grad = grads[n][t].clone()
        opt.step()
        snap = {}
        for n, p in ps.items():
            st = opt.state[p]
            snap[f"param/{n}"] = p.detach().clone()
            for k in ("state1", "state2", "absmax1", "absmax2"):
                if k in st:
                    snap[f"{k}/{n}"] = st[k].clone()
        out.append(snap)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adamw8bit")
    params, grads, wd, lrs = _problem()
    inp = {f"param/{n}": p for n, p in params.items()}
    inp.update({f"grad/{n}": g for n, g in grads.items()})
    inp.update({f"wd/{n}": torch.tensor([w], dtype=torch.float64) for n, w in wd.items()})
    inp["hp"] = torch.tensor([HP["lr"], *HP["betas"], HP["eps"]], dtype=torch.float64)
    inp["lr"] = torch.tensor(lrs, dtype=torch.float64)
    write_safetensors(tmp / "in.safetensors", inp)
    ours = {}
    for label, chunk in (("default", []), ("chunk512", ["512"])):
        subprocess.run([interop_tool("interop_adamw8bit"), str(tmp / "in.safetensors"), str(tmp / f"{label}.safetensors"),
                        *chunk], check=True)
        ours[label] = read_safetensors(tmp / f"{label}.safetensors")
    return _run_bnb(params, grads, wd, lrs), ours


@pytest.mark.parametrize("label", ["default", "chunk512"])
def test_every_step_matches_bitsandbytes_bit_for_bit(runs, label):
    ref, ours = runs[0], runs[1][label]
    for n, shape in SHAPES.items():
        eight = torch.Size(shape).numel() >= 4096
        keys = ["param", "state1", "state2"] + (["absmax1", "absmax2"] if eight else [])
        for t in range(STEPS):
            for k in keys:
                want = ref[t][f"{k}/{n}"]
                got = ours[f"step{t + 1}/{k}/{n}"]
                assert got.dtype == want.dtype, (n, k, t + 1, got.dtype, want.dtype)
                if not torch.equal(got.reshape(want.shape), want):
                    diff = (got.reshape(want.shape).float() - want.float()).abs()
                    pytest.fail(f"{label}: {k}/{n} differs from bitsandbytes after step {t + 1}: "
                                f"{int((diff > 0).sum())} of {want.numel()} elements, max |diff| {float(diff.max()):.3g}")
        if eight:
            assert ours[f"step{STEPS}/state1/{n}"].dtype == torch.uint8


def test_dynamic_maps_are_bitsandbytes(runs):
    ours = runs[1]["default"]
    assert torch.equal(ours["map/signed"], F.create_dynamic_map(signed=True))
    assert torch.equal(ours["map/unsigned"], F.create_dynamic_map(signed=False))


def _f2key(f):
    b = f.view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def _key2f(k):
    bits = torch.where(k < 0, (-k) | (1 << 31), k)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def _codes(z, code):
    """bitsandbytes' code for each normalized value z (blocks of 255 values plus a 1.0: absmax 1)."""
    n = z.numel()
    zz = torch.cat([z, torch.zeros((-n) % 255)]).view(-1, 255)
    zz = torch.cat([zz, torch.ones(zz.shape[0], 1)], 1).reshape(-1)
    q, absmax = torch.ops.bitsandbytes.quantize_blockwise(zz, code, 256)
    assert bool((absmax == 1).all())
    return q.view(-1, 256)[:, :255].reshape(-1)[:n].long(), zz


def _thresholds(code, lo):
    """For k = 1..255 the smallest float32 z in [lo, 1] whose bitsandbytes code is >= k (its codes
    rise with z), by bisection over the ordered float32 bit patterns."""
    ks = torch.arange(1, 256)
    a = torch.full((255,), int(_f2key(torch.tensor([lo]))[0]))
    b = torch.full((255,), int(_f2key(torch.tensor([1.0]))[0]))
    while bool((a < b).any()):
        mid = (a + b) // 2
        ok = _codes(_key2f(mid), code)[0] >= ks
        b = torch.where(ok, mid, b)
        a = torch.where(ok, a, mid + 1)
    return _key2f(b)


def test_quantizer_matches_at_every_threshold(tmp_path):
    cases, expect = {}, {}
    g = torch.Generator().manual_seed(1)
    for signed, lo in ((True, -1.0), (False, 0.0)):
        code = F.create_dynamic_map(signed=signed)
        t = _thresholds(code, lo)
        below = torch.nextafter(t, torch.tensor(-2.0))
        z = torch.cat([t, below[below >= lo], torch.tensor([lo, 0.0, -0.0, 1.0])])
        if signed:
            z = torch.cat([z, torch.rand(20000, generator=g) * 2 - 1, torch.randn(5000, generator=g) * 1e-5])
        else:
            z = torch.cat([z, torch.rand(20000, generator=g), torch.rand(5000, generator=g) * 1e-5])
        z = z.clamp(lo, 1.0)
        want, zz = _codes(z, code)
        name = "signed" if signed else "unsigned"
        cases[name] = zz
        expect[name] = (want, z.numel())
    # Unnormalized tensors too: scaled blocks, an all-zero block, a partial last block.
    # (2^20 values: x / absmax and x * (1 / absmax) differ in the last bit about once in 10^5 values,
    # and bitsandbytes' compiled loop computes the latter.)
    n = 4096 * 256 + 77
    x = torch.randn(n, generator=g) * torch.logspace(-6, 2, n)
    x[256:512] = 0
    cases["random"] = x
    cases["positive"] = x.abs() ** 2
    write_safetensors(tmp_path / "in.safetensors", {f"quant/{k}": v for k, v in cases.items()}
                      | {"hp": torch.tensor([1e-3, 0.9, 0.999, 1e-8], dtype=torch.float64),
                         "lr": torch.zeros(0, dtype=torch.float64)})
    subprocess.run([interop_tool("interop_adamw8bit"), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                   check=True)
    ours = read_safetensors(tmp_path / "out.safetensors")
    for name, (want, n) in expect.items():
        p = "s" if name == "signed" else "u"
        got = ours[f"quant/{name}/{p}_codes"].view(-1, 256)[:, :255].reshape(-1)[:n].long()
        bad = (got != want).nonzero().flatten()
        assert bad.numel() == 0, f"{name}: {bad.numel()} codes differ from bitsandbytes, e.g. at z = {cases[name][bad[:5]]}"
    for name in ("random", "positive"):
        for signed, p in ((True, "s"), (False, "u")):
            if name == "random" and not signed:
                continue  # the unsigned map holds v >= 0 only
            code = F.create_dynamic_map(signed=signed)
            q, absmax = torch.ops.bitsandbytes.quantize_blockwise(cases[name], code, 256)
            assert torch.equal(ours[f"quant/{name}/{p}_codes"], q), (name, p)
            assert torch.equal(ours[f"quant/{name}/{p}_absmax"], absmax), (name, p)
            dq = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, torch.float32)
            assert torch.equal(ours[f"quant/{name}/{p}_dq"], dq), (name, p)
