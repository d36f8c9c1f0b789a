"""`qforge export --format gptq | compressed-tensors` loaded by transformers itself (GPTQ through
optimum + gptqmodel's CPU kernel, compressed-tensors through the compressed-tensors package), both
installed by scripts/setup.sh; a missing peer fails at import, loudly.

A QAT run with int4 per-group weights (int4-g32, converted) is written with its trained codes and
scales, so transformers' logits must equal qforge's own forward of the same model (1e-4 of the
logit scale, fp32) and greedy generation must give the same tokens. A float run exported with an
RTN spec loads and stays close to the float model. torchao's asymmetric float-zero-point spec is
refused with the reason (naming the -zp presets), leaving nothing behind.

Integer zero points (the `intzp` tests, ctest entry interop_int_export_zp): a QAT run with
int4-g32-zp (AutoAWQ's / GPTQ's asymmetric rule) goes out as GPTQ sym=false (checkpoint_format
gptq_v2, gptqmodel) and compressed-tensors pack-quantized symmetric=false (weight_zero_point), and
transformers' logits equal qforge's forward of the same converted model."""
import os
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's CPU kernel would torch.compile itself (~25 s)
import compressed_tensors  # noqa: E402,F401  - the peers, loudly
import gptqmodel  # noqa: E402,F401
import optimum  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402

from st_io import interop_tool, read_safetensors, write_safetensors  # noqa: E402
from tiny_runs import QFORGE, tiny_recipe, train  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("intx")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg)
    for name, preset in (("qat_g32", "int4-g32"), ("qat_asym", "int4-g128-asym")):
        rules = "[{pattern: 'model.layers.*', weight: {preset: %s}}]" % preset
        if preset.endswith("asym"):
            rules = "[{pattern: 'model.layers.*.mlp.up_proj', weight: {preset: int4-g32}}, " \
                    "{pattern: 'model.layers.*.self_attn.*', weight: {bits: 4, symmetric: false, granularity: per-group, group_size: 32}}]"
        train(cfg, f"run.out_dir={d}/{name}", f"run.init_from={d}/fp", f"quant.rules={rules}", "trainer.max_steps=4")
    return d


def _export(src, fmt, out, *extra):
    return subprocess.run([QFORGE, "-q", "export", str(src), "--format", fmt, "--out", str(out), *extra],
                          capture_output=True, text=True)


def _qforge_logits(tmp_path, run, ids):
    hf = tmp_path / "hf_ref"
    r = _export(run, "hf", hf, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    write_safetensors(tmp_path / "ids.safetensors", {"ids": np.array([ids], dtype=np.int64)})
    subprocess.run([interop_tool("interop_hf"), str(hf), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors"),
                    "8"], check=True, capture_output=True)
    o = read_safetensors(tmp_path / "o.safetensors")
    return o["logits"][0].numpy(), o["generated"].tolist()


def _hf_logits(path, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0].numpy()
        gen = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    return m, logits, gen


IDS = [1, 45, 7, 99, 3, 250, 18, 64, 5, 300, 12, 77]


@pytest.mark.parametrize("fmt,module", [("gptq", "TorchQuantLinear"), ("compressed-tensors", "CompressedLinear")])
def test_trained_int4_codes_load_in_transformers_exactly(tmp_path, runs, fmt, module):
    out = tmp_path / fmt
    r = _export(runs / "qat_g32/converted", fmt, out)
    assert r.returncode == 0, r.stderr
    m, logits, gen = _hf_logits(out, IDS)
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == module
    ours, our_gen = _qforge_logits(tmp_path, runs / "qat_g32/converted", IDS)
    scale = max(1.0, float(np.abs(ours).max()))
    err = float(np.abs(logits - ours).max())
    print(f"\nINT_EXPORT {fmt}: max|transformers - qforge| {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-4 * scale, err
    assert gen == our_gen


@pytest.mark.parametrize("fmt,quant", [("gptq", "int4-g32"), ("compressed-tensors", "int4-g32"),
                                       ("compressed-tensors", "int8-per-channel"), ("gptq", "int8-per-channel")])
def test_float_model_rtn_export_loads(tmp_path, runs, fmt, quant):
    out = tmp_path / fmt
    r = _export(runs / "fp", fmt, out, "--quant", quant)
    assert r.returncode == 0, r.stderr
    _, logits, _ = _hf_logits(out, IDS)
    ours, _ = _qforge_logits(tmp_path, runs / "fp", IDS)
    rel = float(np.abs(logits - ours).max()) / float(np.abs(ours).max())
    print(f"\nINT_EXPORT RTN {fmt} {quant}: max rel diff to the float model {rel:.3g}")
    assert rel < (0.02 if quant.startswith("int8") else 0.25), rel


def test_asymmetric_float_zero_point_is_refused(tmp_path, runs):
    out = tmp_path / "x"
    r = _export(runs / "qat_asym/converted", "gptq", out)
    assert r.returncode == 1 and "float-domain zero point" in r.stderr and "int4-g128-zp" in r.stderr, r.stderr
    assert not out.exists() and not any(p.name.startswith("x.tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt,fallback,down", [("compressed-tensors", "int4-g32", "CompressedLinear"),
                                               ("compressed-tensors", "f16", "Linear"), ("gptq", "f16", "Linear")])
def test_fallback_for_a_width_the_group_does_not_divide_loads(tmp_path, runs, fmt, fallback, down):
    """ffn 160: int4-g64 fits every linear but down_proj. Without --fallback the error names it and
    what fits; with it, transformers loads the mixture (a second config group, or float layers)."""
    out = tmp_path / fmt
    r = _export(runs / "fp", fmt, out, "--quant", "int4-g64")
    assert r.returncode == 2 and "model.layers.0.mlp.down_proj (160 inputs: int4-g32, int4-g16, int4-g8 fit)" in r.stderr, r.stderr
    assert "--fallback FORMAT" in r.stderr and not out.exists()
    r = _export(runs / "fp", fmt, out, "--quant", "int4-g64", "--fallback", fallback)
    assert r.returncode == 0, r.stderr
    m, logits, _ = _hf_logits(out, IDS)
    assert type(m.model.layers[0].mlp.down_proj).__name__ == down
    assert type(m.model.layers[0].self_attn.q_proj).__name__ in ("TorchQuantLinear", "CompressedLinear")
    if down == "CompressedLinear":
        assert m.model.layers[1].mlp.down_proj.quantization_scheme.weights.group_size == 32
        assert m.model.layers[1].mlp.up_proj.quantization_scheme.weights.group_size == 64
    ours, _ = _qforge_logits(tmp_path, runs / "fp", IDS)
    rel = float(np.abs(logits - ours).max()) / float(np.abs(ours).max())
    print(f"\nINT_EXPORT fallback {fmt} {fallback}: max rel diff to the float model {rel:.3g}")
    assert rel < 0.25, rel


@pytest.fixture(scope="module")
def zp_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("intzp")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg)
    rules = "[{pattern: 'model.layers.*', weight: {preset: int4-g32-zp}}]"
    train(cfg, f"run.out_dir={d}/qat_zp", f"run.init_from={d}/fp", f"quant.rules={rules}", "trainer.max_steps=4")
    return d


@pytest.mark.parametrize("fmt,module", [("gptq", "TorchQuantLinear"), ("compressed-tensors", "CompressedLinear")])
def test_intzp_codes_load_in_transformers_exactly(tmp_path, zp_runs, fmt, module):
    import json
    out = tmp_path / fmt
    r = _export(zp_runs / "qat_zp/converted", fmt, out)
    assert r.returncode == 0, r.stderr
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert q["sym"] is False and q["checkpoint_format"] == "gptq_v2", q
    else:
        assert q["config_groups"]["group_0"]["weights"]["symmetric"] is False, q
    m, logits, gen = _hf_logits(out, IDS)
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == module
    ours, our_gen = _qforge_logits(tmp_path, zp_runs / "qat_zp/converted", IDS)
    scale = max(1.0, float(np.abs(ours).max()))
    err = float(np.abs(logits - ours).max())
    print(f"\nINT_EXPORT zero_point {fmt}: max|transformers - qforge| {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-4 * scale, err
    assert gen == our_gen


def test_intzp_rtn_export_loads(tmp_path, zp_runs):
    out = tmp_path / "gptq"
    r = _export(zp_runs / "fp", "gptq", out, "--quant", "int4-g32-zp")
    assert r.returncode == 0, r.stderr
    _, logits, _ = _hf_logits(out, IDS)
    ours, _ = _qforge_logits(tmp_path, zp_runs / "fp", IDS)
    rel = float(np.abs(logits - ours).max()) / float(np.abs(ours).max())
    print(f"\nINT_EXPORT RTN gptq int4-g32-zp: max rel diff to the float model {rel:.3g}")
    assert rel < 0.25, rel
