"""`qforge export --format awq` (AutoAWQ's GEMM layout) loaded by transformers 4.57.1 itself, whose AWQ
integration builds autoawq's WQLinear_GEMM modules (autoawq 0.2.9, requirements.txt); a missing peer
fails at import, loudly.

Two readers of the same files:
- an independent decoder written here from AutoAWQ's documented unpack (awq/utils/packing_utils.py:
  unpack_awq + reverse_awq_order, AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7], w = (q - z) * s) must
  give qforge's converted weights bit for bit (float32);
- transformers.AutoModelForCausalLM.from_pretrained on CPU: every WQLinear_GEMM's weight by autoawq's
  own dequantize_gemm equals qforge's weight rounded to fp16 (the kernel's arithmetic), and the logits
  match qforge's own forward of the same converted model within fp16 activation rounding: a QAT
  run and an AWQ PTQ run of the tiny Llama, and an AWQ PTQ run of each nn.Linear family's tiny
  transformers checkpoint (GPT-2's Conv1D refused).

What this CPU machine needs around the peer (each one undone nowhere else, none touching the
layout or the arithmetic):
1. autoawq 0.2.9 (its last release; the project is archived) imports
   transformers.activations.PytorchGELUTanh, which transformers 4.57 renamed GELUTanh: aliased.
2. transformers' AwqQuantizer.validate_environment rewrites version "gemm" to "ipex" when there is no
   CUDA/XPU device; the IPEX path needs intel-extension-for-pytorch, whose last release (2.8.0)
   refuses torch 2.11 at import ("needs to work with PyTorch 2.8.*"). The rewrite is undone, so the
   checkpoint's own version ("gemm", WQLinear_GEMM) is what loads.
3. autoawq takes its Triton kernels whenever `import triton` works (torch's wheel installs triton);
   those need a GPU, so on CPU its own naive path (dequantize_gemm + matmul) is selected.
4. With dtype=float32 transformers casts WQLinear_GEMM's fp16 scales to fp32 and autoawq's matmul then
   mixes fp16 and fp32: the fp32 load puts the module's declared fp16 back (exact: they were fp16 in the
   file). The default load (dtype None -> fp16, as transformers picks for AWQ) needs nothing.

Integer zero points (the `intzp` tests, their own ctest entry interop_awq_export_zp): presets
int4-g<G>-zp quantize with AutoAWQ's asymmetric rule (quant/affine.cpp), so (a) a float model RTN'd
by `qforge export --quant int4-g32-zp` gives the very int32 words (qweight, qzeros) and fp16 scales
that AutoAWQ's own pseudo_quantize_tensor + WQLinear_GEMM.from_linear produce from the same float
weights, and (b) QAT and AWQ PTQ runs with those presets load in transformers with logits matching
qforge's forward.
vLLM is not installable beside the pinned torch 2.11 on this CPU machine; it reads the same
quantization_config keys (bits, group_size, zero_point, modules_to_not_convert) and tensors.
"""
import json
import os
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
import transformers  # noqa: E402
import transformers.activations as _act  # noqa: E402

if not hasattr(_act, "PytorchGELUTanh"):  # (1)
    _act.PytorchGELUTanh = _act.GELUTanh
import awq  # noqa: E402,F401  - the peer, loudly
import awq.modules.linear.gemm as awq_gemm  # noqa: E402
from awq.utils.packing_utils import dequantize_gemm  # noqa: E402
from transformers.quantizers.quantizer_awq import AwqQuantizer  # noqa: E402

from st_io import interop_tool, read_safetensors, write_safetensors  # noqa: E402
from tiny_runs import QFORGE, kjv_corpus, tiny_recipe, train  # noqa: E402

assert awq.__version__ == "0.2.9", awq.__version__
assert transformers.__version__ == "4.57.1", transformers.__version__

_validate = AwqQuantizer.validate_environment


def _keep_checkpoint_version(self, *args, **kwargs):  # (2)
    version = self.quantization_config.version
    _validate(self, *args, **kwargs)
    self.quantization_config.version = version


AwqQuantizer.validate_environment = _keep_checkpoint_version
if not torch.cuda.is_available():  # (3)
    awq_gemm.TRITON_AVAILABLE = False

F16_RULE = "{bits: 4, symmetric: true, granularity: per-group, group_size: 32, scale_dtype: fp16}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("awqx")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg)
    for name, weight in (("qat_f16", F16_RULE), ("qat_g32", "{preset: int4-g32}"),
                         ("qat_asym", "{bits: 4, symmetric: false, granularity: per-group, group_size: 32}")):
        rules = "[{pattern: 'model.layers.*', weight: %s}]" % weight
        train(cfg, f"run.out_dir={d}/{name}", f"run.init_from={d}/fp", f"quant.rules={rules}", "trainer.max_steps=4")
    # AWQ PTQ (scaling pairs folded, clipping searched) to int4 groups of 16 with fp16 scales
    r = subprocess.run([QFORGE, "-q", "quantize", str(d / "fp"), "--method", "awq", "--quant", "int4-g16", "--samples", "16",
                        "--no-eval", "--out", str(d / "awq_ptq")], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    return d


def _export(src, fmt, out, *extra):
    return subprocess.run([QFORGE, "-q", "export", str(src), "--format", fmt, "--out", str(out), *extra],
                          capture_output=True, text=True)


IDS = [1, 45, 7, 99, 3, 250, 18, 64, 5, 300, 12, 77]


def _qforge_ref(tmp_path, run):
    """qforge's own forward of `run` (build/interop/interop_hf on its fp32 HF export) and the HF dir."""
    hf = tmp_path / "hf_ref"
    r = _export(run, "hf", hf, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    write_safetensors(tmp_path / "ids.safetensors", {"ids": np.array([IDS], dtype=np.int64)})
    subprocess.run([interop_tool("interop_hf"), str(hf), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors"),
                    "1"], check=True, capture_output=True)
    return read_safetensors(tmp_path / "o.safetensors")["logits"][0].numpy(), read_safetensors(hf / "model.safetensors")


def _load(path, dtype, ids=None):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=dtype,
                                                         attn_implementation="eager").eval()
    if dtype == torch.float32:  # (4)
        for mod in m.modules():
            if isinstance(mod, awq_gemm.WQLinear_GEMM):
                mod.scales = mod.scales.half()
                if mod.bias is not None:
                    mod.bias = mod.bias.half()
    with torch.no_grad():
        logits = m(torch.tensor([IDS]) if ids is None else ids).logits.float().numpy()
    if ids is None:
        logits = logits[0]
    return m, logits


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _decode(qweight, qzeros, scales):
    """AutoAWQ's unpack written independently in numpy: 8 nibbles per int32, low first, reordered by
    AWQ_REVERSE_ORDER; (q - z) * s per group, in float32. Returns the [out, in] weight."""
    def unpack(w):
        u = w.numpy().astype(np.int64) & 0xFFFFFFFF
        nib = (u[:, :, None] >> (4 * np.arange(8))) & 15  # [rows, words, 8] by nibble
        return nib[:, :, AWQ_REVERSE_ORDER].reshape(w.shape[0], -1)
    q, z = unpack(qweight), unpack(qzeros)
    s = scales.float().numpy()
    group = q.shape[0] // s.shape[0]
    return ((q - np.repeat(z, group, 0)).astype(np.float32) * np.repeat(s, group, 0)).T


def _check_file_and_peer(out, ref_tensors, group):
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
                   "backend": "autoawq", "modules_to_not_convert": cfg["modules_to_not_convert"]}, cfg
    st = read_safetensors(out / "model.safetensors")
    packed = sorted(k[:-len(".qweight")] for k in st if k.endswith(".qweight"))
    assert len(packed) == 14, packed  # 2 layers x (q, k, v, o, gate, up, down)
    for name in packed:
        qw, qz, s = st[name + ".qweight"], st[name + ".qzeros"], st[name + ".scales"]
        want = ref_tensors[name + ".weight"].numpy()
        out_f, in_f = want.shape
        assert qw.dtype == torch.int32 and tuple(qw.shape) == (in_f, out_f // 8), (name, qw.shape)
        assert qz.dtype == torch.int32 and tuple(qz.shape) == (in_f // group, out_f // 8), (name, qz.shape)
        assert s.dtype == torch.float16 and tuple(s.shape) == (in_f // group, out_f), (name, s.shape)
        np.testing.assert_array_equal(_decode(qw, qz, s), want, err_msg=name)
    return packed


@pytest.mark.parametrize("run,group", [("qat_f16/converted", 32), ("awq_ptq", 16)])
def test_converted_int4_codes_load_in_transformers(tmp_path, runs, run, group):
    out = tmp_path / "awq"
    r = _export(runs / run, "awq", out)
    assert r.returncode == 0, r.stderr
    assert f"group {group}), 14 quantized linears (14 with their trained codes" in r.stdout, r.stdout
    ours, ref = _qforge_ref(tmp_path, runs / run)
    packed = _check_file_and_peer(out, ref, group)
    scale = max(1.0, float(np.abs(ours).max()))
    for dtype, tol in ((torch.float32, 4e-3), (None, 8e-3)):
        m, logits = _load(out, dtype)
        mods = dict(m.named_modules())
        for name in packed:
            mod = mods[name]
            assert type(mod) is awq_gemm.WQLinear_GEMM and mod.group_size == group, (name, type(mod))
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4, mod.group_size)  # the peer's own, [in, out] fp16
            assert w.dtype == torch.float16
            assert torch.equal(w.t(), ref[name + ".weight"].half()), name
        assert type(m.lm_head) is torch.nn.Linear
        err = float(np.abs(logits - ours).max())
        print(f"\nAWQ_EXPORT {run} dtype {dtype}: max|transformers - qforge| {err:.3g} (logit scale {scale:.3g})")
        assert err <= tol * scale, err


def test_float_model_rtn_export_loads(tmp_path, runs):
    out = tmp_path / "awq"
    r = _export(runs / "fp", "awq", out, "--quant", "int4-g32")  # the preset's fp32 scales become fp16 here
    assert r.returncode == 0, r.stderr
    assert "14 quantized linears (0 with their trained codes" in r.stdout, r.stdout
    _, logits = _load(out, torch.float32)
    ours, _ = _qforge_ref(tmp_path, runs / "fp")
    rel = float(np.abs(logits - ours).max()) / float(np.abs(ours).max())
    print(f"\nAWQ_EXPORT RTN int4-g32: max rel diff to the float model {rel:.3g}")
    assert 0 < rel < 0.25, rel


def test_width_fallback_keeps_float_layers(tmp_path, runs):
    """ffn 160: int4-g64 fits every linear but down_proj. Without --fallback the error names it and
    what fits; with --fallback f16 those stay nn.Linear (modules_to_not_convert) and the rest load as AWQ."""
    out = tmp_path / "awq"
    r = _export(runs / "fp", "awq", out, "--quant", "int4-g64")
    assert r.returncode == 2 and "model.layers.0.mlp.down_proj (160 inputs: int4-g32, int4-g16, int4-g8 fit)" in r.stderr, r.stderr
    assert not out.exists()
    r = _export(runs / "fp", "awq", out, "--quant", "int4-g64", "--fallback", "f16")
    assert r.returncode == 0, r.stderr
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert skip == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], skip
    m, logits = _load(out, torch.float32)
    assert type(m.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert type(m.model.layers[1].mlp.up_proj) is awq_gemm.WQLinear_GEMM and m.model.layers[1].mlp.up_proj.group_size == 64
    ours, _ = _qforge_ref(tmp_path, runs / "fp")
    rel = float(np.abs(logits - ours).max()) / float(np.abs(ours).max())
    print(f"\nAWQ_EXPORT fallback f16: max rel diff to the float model {rel:.3g}")
    assert 0 < rel < 0.25, rel


@pytest.mark.parametrize("src,extra,needles", [
    ("qat_asym/converted", [], ["model.layers.0.self_attn.q_proj is int4 asym", "float-domain zero point",
                                "--format gguf", "int4-g128", "int4-g128-zp"]),
    ("qat_g32/converted", [], ["model.layers.0.self_attn.q_proj has scales fp16 cannot hold exactly", "scale_dtype: fp16",
                               "--format gptq"]),
    ("fp", ["--quant", "int8-per-channel"], ["--quant int8-per-channel is int8", "4-bit codes only"]),
    ("fp", ["--quant", "q4_0"], ["--quant q4_0", "not llama.cpp blocks"]),
    ("fp", ["--quant", "int4-g32", "--fallback", "int4-g16"], ["--fallback f16"]),
])
def test_unrepresentable_layers_are_refused(tmp_path, runs, src, extra, needles):
    out = tmp_path / "x"
    r = _export(runs / src, "awq", out, *extra)
    assert r.returncode == 1, (r.returncode, r.stderr)
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists() and not any(p.name.startswith("x.tmp") for p in tmp_path.iterdir())


FAMILY_KINDS = ["llama3_tied", "qwen2_sw", "qwen3", "mistral_sw", "gemma2", "gemma3", "phi4_longrope", "opt"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return kjv_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", 1500)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_awq_ptq_of_every_family_loads(tmp_path, kind, corpus):
    """An AWQ PTQ run (int4 groups of 16, the family's scaling pairs) of each nn.Linear family's tiny
    transformers checkpoint (Qwen2's qkv biases go out in fp16, as AutoAWQ stores them) loads in
    transformers as WQLinear_GEMM with autoawq's weights == qforge's in fp16 and the logits within
    the kernel's fp16 rounding; GPT-2's Conv1D layers are refused."""
    from test_families import _checkpoint, _recipe
    d = _checkpoint(tmp_path, kind, corpus, ffn=192)
    calib = _recipe(tmp_path, "calib", d, corpus, "")
    r = subprocess.run([QFORGE, "-q", "quantize", str(d), "--method", "awq", "--quant", "int4-g16", "--calib", str(calib),
                        "--samples", "16", "--no-eval", "--out", str(tmp_path / "q")], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "awq"
    r = _export(tmp_path / "q", "awq", out)
    assert r.returncode == 0, f"{kind}: {r.stderr[-3000:]}"
    hf = tmp_path / "hf_ref"
    assert _export(tmp_path / "q", "hf", hf, "--dtype", "fp32").returncode == 0
    ref = read_safetensors(hf / "model.safetensors")
    ids = (torch.arange(2 * 12).reshape(2, 12) * 29 + 3) % 150
    write_safetensors(tmp_path / "ids.safetensors", {"ids": ids.numpy()})
    subprocess.run([interop_tool("interop_hf"), str(hf), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors"),
                    "1"], check=True, capture_output=True)
    want = read_safetensors(tmp_path / "o.safetensors")["logits"].numpy()
    m, logits = _load(out, torch.float32, ids)
    n = 0
    for name, mod in m.named_modules():
        if isinstance(mod, awq_gemm.WQLinear_GEMM):
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4, mod.group_size)
            assert torch.equal(w.t(), ref[name + ".weight"].half()), f"{kind}: {name}"
            n += 1
    assert n > 0 and n == sum(1 for k in read_safetensors(out / "model.safetensors") if k.endswith(".qweight")), (kind, n)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(logits - want).max())
    print(f"\nAWQ_EXPORT family {kind}: {n} WQLinear_GEMM, max|transformers - qforge| {err:.3g} (logit scale {scale:.3g})")
    assert err <= 4e-3 * scale, f"{kind}: max |diff| {err}"


def test_conv1d_families_are_refused(tmp_path, corpus):
    from test_families import _checkpoint
    d = _checkpoint(tmp_path, "gpt2", corpus)
    r = _export(d, "awq", tmp_path / "g")
    assert r.returncode == 1 and "Conv1D" in r.stderr and "--format awq" in r.stderr, r.stderr
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------------------------
# Integer zero points (int4-g<G>-zp): AutoAWQ's own asymmetric rule.

ZP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def zp_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("awqzp")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg)
    rules = "[{pattern: 'model.layers.*', weight: {preset: int4-g32-zp}}]"
    train(cfg, f"run.out_dir={d}/qat_zp", f"run.init_from={d}/fp", f"quant.rules={rules}", "trainer.max_steps=4")
    for method in ("awq", "gptq"):
        r = subprocess.run([QFORGE, "-q", "quantize", str(d / "fp"), "--method", method, "--quant", "int4-g16-zp",
                            "--samples", "16", "--no-eval", "--out", str(d / f"{method}_zp")], capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert r.returncode == 0, r.stderr
    return d


def _autoawq_gemm(w, group):
    """AutoAWQ's own quantization of a float32 weight [out, in] (its quantizer with zero_point=True, run
    in the weight's dtype, then WQLinear_GEMM.from_linear as _apply_quant calls it): (qweight, qzeros, scales)."""
    from types import SimpleNamespace
    from awq.quantize.quantizer import AwqQuantizer
    q = SimpleNamespace(w_bit=4, group_size=group, zero_point=True)
    _, scales, zeros = AwqQuantizer.pseudo_quantize_tensor(q, w.clone())
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    m = awq_gemm.WQLinear_GEMM.from_linear(lin, 4, group, False, scales.t().contiguous(), zeros.t().contiguous())
    return m.qweight, m.qzeros, m.scales


def _snap_groups(w, group):
    """The float weight with each group's extremes moved onto AutoAWQ's grid: s = fp16((max - min) / 15),
    min = -k s, max = (15 - k) s (k = the zero point), the rest clamped inside. Then (max - min) / 15 is
    an fp16 value, and AutoAWQ (which takes z from the float32 scale and re-rounds the codes against the
    fp16 one) and qforge (both from the fp16 scale) must agree on every code, zero point and scale."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group).clone()
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    k = (-torch.round(mn / s)).clamp(0, 15)
    lo, hi = -k * s, (15 - k) * s
    g = torch.maximum(torch.minimum(g, hi), lo)
    g[..., :1] = lo  # the first element of each group is its minimum, the second its maximum
    g[..., 1:2] = hi
    return g.reshape(out_f, in_f)


def test_intzp_rtn_words_equal_autoawq(tmp_path, zp_runs):
    """(a) A float model RTN'd to int4-g32-zp by the exporter: qweight, qzeros (packed int32 words) and
    fp16 scales equal AutoAWQ's own from the same float32 weights. On the trained weights as they are,
    the two differ only where AutoAWQ takes the zero point from the float32 scale and the codes from
    the fp16 one (reported); with each group's extremes on AutoAWQ's grid, not at all."""
    hf = tmp_path / "hf"
    assert _export(zp_runs / "fp", "hf", hf, "--dtype", "fp32").returncode == 0
    st = read_safetensors(hf / "model.safetensors")
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ZP_LINEARS]
    # as trained: how often AutoAWQ's float32 quantizer picks other codes / zero points than the rule
    out = tmp_path / "awq_raw"
    r = _export(hf, "awq", out, "--quant", "int4-g32-zp")
    assert r.returncode == 0, r.stderr
    got = read_safetensors(out / "model.safetensors")
    n_s = n_z = n_q = n_zt = n_qt = 0
    for name in names:
        qw, qz, s = _autoawq_gemm(st[name + ".weight"].float(), 32)
        n_s += int((s != got[name + ".scales"]).sum())
        dz = _decode_nibbles(qz) != _decode_nibbles(got[name + ".qzeros"])
        dq = _decode_nibbles(qw) != _decode_nibbles(got[name + ".qweight"])
        n_z, n_q, n_zt, n_qt = n_z + int(dz.sum()), n_q + int(dq.sum()), n_zt + dz.size, n_qt + dq.size
    print(f"\nAWQ_EXPORT zp RTN vs AutoAWQ (fp32 weights as trained): scales differ {n_s}, zero points {n_z}/{n_zt}, "
          f"codes {n_q}/{n_qt}")
    assert n_s == 0  # the same float32 arithmetic, rounded to fp16
    assert n_z <= 0.02 * n_zt and n_q <= 0.01 * n_qt, (n_z, n_q)
    # AutoAWQ's own pipeline runs in fp16 (_apply_quant casts the linear with .half()): reported only
    n16 = [0, 0, 0]
    for name in names:
        qw, qz, s = _autoawq_gemm(st[name + ".weight"].half(), 32)
        n16[0] += int((s != got[name + ".scales"]).sum())
        n16[1] += int((_decode_nibbles(qz) != _decode_nibbles(got[name + ".qzeros"])).sum())
        n16[2] += int((_decode_nibbles(qw) != _decode_nibbles(got[name + ".qweight"])).sum())
    print(f"AWQ_EXPORT zp RTN vs AutoAWQ in fp16 (its _apply_quant): scales differ {n16[0]}/{n_zt}, zero points "
          f"{n16[1]}/{n_zt}, codes {n16[2]}/{n_qt}")
    # extremes on the grid: bit for bit
    snapped = dict(st)
    for name in names:
        snapped[name + ".weight"] = _snap_groups(st[name + ".weight"].float(), 32)
    hf2 = tmp_path / "hf_snapped"
    hf2.mkdir()
    for f in hf.iterdir():
        if f.name != "model.safetensors":
            (hf2 / f.name).write_bytes(f.read_bytes())
    write_safetensors(hf2 / "model.safetensors", {k: v.numpy() for k, v in snapped.items()})
    out = tmp_path / "awq"
    r = _export(hf2, "awq", out, "--quant", "int4-g32-zp")
    assert r.returncode == 0, r.stderr
    assert "14 quantized linears (0 with their trained codes" in r.stdout, r.stdout
    got = read_safetensors(out / "model.safetensors")
    for name in names:
        qw, qz, s = _autoawq_gemm(snapped[name + ".weight"], 32)
        assert torch.equal(got[name + ".scales"], s), name
        assert torch.equal(got[name + ".qzeros"], qz), name
        assert torch.equal(got[name + ".qweight"], qw), name
        zs = _decode_nibbles(qz)
        assert zs.min() >= 0 and zs.max() <= 15 and len(np.unique(zs)) > 1, name  # real, varied zero points
    print("AWQ_EXPORT zp RTN (group extremes on the grid): qweight, qzeros, scales == AutoAWQ's, all 14 linears")


def _decode_nibbles(w):
    u = w.numpy().astype(np.int64) & 0xFFFFFFFF
    return ((u[:, :, None] >> (4 * np.arange(8))) & 15).reshape(w.shape[0], -1)


@pytest.mark.parametrize("run,group", [("qat_zp/converted", 32), ("awq_zp", 16), ("gptq_zp", 16)])
def test_intzp_runs_load_in_transformers(tmp_path, zp_runs, run, group):
    """(b) A QAT run (int4-g32-zp), an AWQ and a GPTQ PTQ run (int4-g16-zp): the file decodes to qforge's
    converted weights bit for bit with varied zero points, autoawq's dequantize_gemm gives them in
    fp16, and transformers' logits match qforge's forward of the same converted model."""
    out = tmp_path / "awq"
    r = _export(zp_runs / run, "awq", out)
    assert r.returncode == 0, r.stderr
    assert f"group {group}), 14 quantized linears (14 with their trained codes" in r.stdout, r.stdout
    ours, ref = _qforge_ref(tmp_path, zp_runs / run)
    packed = _check_file_and_peer(out, ref, group)
    st = read_safetensors(out / "model.safetensors")
    zs = np.concatenate([_decode_nibbles(st[n + ".qzeros"]).ravel() for n in packed])
    assert len(np.unique(zs)) > 3, np.unique(zs)  # AutoAWQ's per-group zero points, not the symmetric 8
    scale = max(1.0, float(np.abs(ours).max()))
    for dtype, tol in ((torch.float32, 4e-3), (None, 8e-3)):
        m, logits = _load(out, dtype)
        mods = dict(m.named_modules())
        for name in packed:
            mod = mods[name]
            assert type(mod) is awq_gemm.WQLinear_GEMM and mod.group_size == group, (name, type(mod))
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4, mod.group_size)
            assert torch.equal(w.t(), ref[name + ".weight"].half()), name
        err = float(np.abs(logits - ours).max())
        print(f"\nAWQ_EXPORT zero_point {run} dtype {dtype}: max|transformers - qforge| {err:.3g} (logit scale {scale:.3g})")
        assert err <= tol * scale, err
