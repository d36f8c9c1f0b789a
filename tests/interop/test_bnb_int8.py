"""LLM.int8 (issue 21): qforge's int8 frozen base (quant/int8_lt.h, `peft.base: int8`) against bitsandbytes
0.50 (CPU backend) and transformers' load_in_8bit, both directions.

- Int8Params: CB / SCB bytes equal bitsandbytes' (Int8Params(...).to("cpu")) for several shapes and
  distributions (normal, uniform, heavy-tailed with outlier columns, zero rows; fp32/bf16/fp16 inputs),
  and the dequantized weight equals int8_vectorwise_dequant bit for bit;
- forward: Linear8bitLt(has_fp16_weights=False) in eval (MatMul8bitLt) at thresholds 6.0 / 2.5 / 0,
  fp32/bf16/fp16 inputs with outlier columns, 1-row, 2-D and 3-D inputs, with and without bias: qforge's
  output and input gradient equal bitsandbytes' (the max difference is printed; expected 0);
- a bnb 8-bit dir saved by transformers reads in qforge: dequantized (export --format hf == transformers'
  int8_vectorwise_dequant bit for bit; logits == transformers' float model on those weights) and kept
  as int8 bases (logits vs transformers' own 8-bit model);
- `qforge export --format bnb-int8` of the float dir writes the bytes transformers' own load_in_8bit
  makes of it, and transformers loads it as Linear8bitLt with the same logits;
- LoRA on an int8 base trains (loss falls), its PEFT adapter loads in peft over transformers' 8-bit
  model with matching logits, and the run exports as a bnb-int8 dir transformers loads;
- LoRA from a load_in_8bit dir keeps the file's CB / SCB as the bases and trains; an int8-base run resumes
  on the identical loss curve;
- bad 8-bit dirs (weight_format, SCB shape) are refused naming the file, tensor and rule; `peft.base: packed` on
  an 8-bit dir is a config error pointing to `peft.base: int8`.
A missing peer fails at import, loudly."""
import json
import os
import subprocess

import numpy as np
import pytest

import bitsandbytes as bnb  # noqa: F401  - the peer
import peft
import torch
import transformers

from st_io import interop_tool, read_safetensors, write_safetensors
from test_bnb_4bit_in import IDS, _qf, _qforge_logits
from test_families import _checkpoint, _losses, _recipe
from tiny_runs import kjv_corpus

LORA8 = """peft: {{r: 4, alpha: 8, base: int8}}
trainer: {{max_steps: {steps}, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1, optim: {{lr: 0.01}},
          schedule: {{warmup_steps: 1}}}}"""
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tool(*args):
    r = subprocess.run([interop_tool("interop_int8"), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def _weights(gen):
    out = {}
    for rows, cols in [(64, 32), (96, 200), (3, 1000), (1, 16), (257, 64)]:
        out[f"normal_{rows}x{cols}"] = torch.randn(rows, cols, generator=gen) * 0.05
        out[f"uniform_{rows}x{cols}"] = torch.rand(rows, cols, generator=gen) * 2 - 1
    t = torch.distributions.StudentT(torch.tensor(2.0)).sample((128, 96)) * 0.02
    t[:, 7] *= 40  # an outlier input column, as LLM.int8's paper describes
    out["student_t_outliers"] = t
    z = torch.randn(40, 24, generator=gen)
    z[[0, 5, 39]] = 0  # zero rows: SCB 0, CB 0
    z[3, :] = 1e-6
    out["zero_rows"] = z
    out["big"] = torch.randn(32, 48, generator=gen) * 3000  # fp16 range, coarse steps
    return out


def test_int8params_bytes_equal_bitsandbytes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    src = {}
    for name, w in _weights(gen).items():
        for dt in ("fp32", "bf16", "fp16"):
            src[f"{name}.{dt}/w"] = w.to(DT[dt])
    write_safetensors(tmp_path / "in.safetensors", {k: v for k, v in src.items()})
    _tool("codec", tmp_path / "in.safetensors", tmp_path / "out.safetensors", 6.0)
    got = read_safetensors(tmp_path / "out.safetensors")
    n = 0
    for key, w in src.items():
        name = key[:-2]
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert p.data.dtype == torch.int8
        assert torch.equal(got[name + "/CB"], p.data), (name, int((got[name + "/CB"] != p.data).sum()))
        assert torch.equal(got[name + "/SCB"], p.SCB), name
        assert torch.equal(got[name + "/dq"], bnb.functional.int8_vectorwise_dequant(p.data, p.SCB)), name
        n += 1
    print(f"\nINT8_CODEC {n} tensors (5 shapes x normal/uniform, heavy-tailed with an outlier column, zero rows, "
          f"+-3000; fp32/bf16/fp16): CB, SCB and the dequantized weight == bitsandbytes Int8Params bit for bit")


def _inputs(gen, lead, cols, dt):
    x = torch.randn(*lead, cols, generator=gen)
    flat = x.view(-1, cols)
    flat[0, 3] = 8.5  # outlier columns (|x| >= 6 in some row)
    flat[-1, cols // 2] = -20.0
    flat[:, 5] = torch.linspace(-7, 7, flat.shape[0])
    return x.to(DT[dt])


@pytest.mark.parametrize("threshold", [6.0, 2.5, 0.0])
def test_forward_and_input_gradient_equal_linear8bitlt(tmp_path, threshold):
    gen = torch.Generator().manual_seed(1)
    cases = {}
    for i, (out_f, in_f, lead, bias) in enumerate([(48, 64, (5,), True), (40, 96, (2, 7), False), (24, 32, (1,), True),
                                                  (130, 72, (3, 9), True)]):
        w = torch.randn(out_f, in_f, generator=gen) * 0.1
        b = torch.randn(out_f, generator=gen) if bias else None
        for dt in ("fp32", "bf16", "fp16"):
            x = _inputs(gen, lead, in_f, dt)
            g = torch.randn(*lead, out_f, generator=gen).to(DT[dt])
            cases[f"c{i}.{dt}"] = (w, b, x, g)
    src = {}
    for k, (w, b, x, g) in cases.items():
        src[k + "/w"], src[k + "/x"], src[k + "/g"] = w, x, g
        if b is not None:
            src[k + "/b"] = b
    write_safetensors(tmp_path / "in.safetensors", src)
    _tool("codec", tmp_path / "in.safetensors", tmp_path / "out.safetensors", threshold)
    got = read_safetensors(tmp_path / "out.safetensors")
    worst_y = worst_g = 0.0
    for k, (w, b, x, g) in cases.items():
        lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=b is not None, has_fp16_weights=False, threshold=threshold)
        lin.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
        lin = lin.to("cpu").eval()
        xr = x.clone().requires_grad_(True)
        y = lin(xr)
        (y * g).sum().backward()
        dy = float((got[k + "/y"].float() - y.detach().float()).abs().max())
        dg = float((got[k + "/gx"].float() - xr.grad.float()).abs().max())
        worst_y, worst_g = max(worst_y, dy), max(worst_g, dg)
        assert got[k + "/y"].dtype == y.dtype and torch.equal(got[k + "/y"], y.detach()), (k, dy)
        assert torch.equal(got[k + "/gx"], xr.grad), (k, dg)
    print(f"\nINT8_FORWARD threshold {threshold}: {len(cases)} cases (fp32/bf16/fp16, outlier columns, 1/2/3-D, bias): "
          f"max|qforge - bnb Linear8bitLt| output {worst_y:.3g}, input gradient {worst_g:.3g}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    corpus = kjv_corpus(d / "kjv.txt", 1500)
    return d, _checkpoint(d, "llama", corpus, ffn=192), corpus


def _bnb8_dir(d, ck):
    """transformers' own save of the float dir loaded with load_in_8bit (fp32 non-linear weights)."""
    out = d / "bnb8"
    if not out.exists():
        m = transformers.AutoModelForCausalLM.from_pretrained(
            str(ck), quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
            dtype=torch.float32)
        m.save_pretrained(str(out))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((ck / f).read_bytes())
    return out


def _hf_logits(path, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32,
                                                         attn_implementation="eager", **kw).eval()
    with torch.no_grad():
        return m, m(torch.tensor(IDS)).logits.float()


def _qforge_int8_logits(d, work, threshold=6.0, adapter=None):
    work.mkdir(exist_ok=True)
    write_safetensors(work / "ids.safetensors", {"ids": np.array(IDS, dtype=np.int64)})
    _tool("logits", d, work / "ids.safetensors", work / "o.safetensors", threshold, *([adapter] if adapter else []))
    o = read_safetensors(work / "o.safetensors")
    return o["logits"], int(o["kept"][0]), int(o["int8_linears"][0])


def test_bnb8_dir_from_transformers_reads_dequantized_and_as_int8_bases(tmp_path, base):
    d, ck, _ = base
    src = _bnb8_dir(d, ck)
    q = json.loads((src / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_8bit"] and q["llm_int8_threshold"] == 6.0
    names = read_safetensors(src / "model.safetensors")
    assert names["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8 and "model.layers.0.mlp.up_proj.SCB" in names
    m8, want8 = _hf_logits(src)
    assert type(m8.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"

    # Dequantized: every linear == int8_vectorwise_dequant of the module's own CB / SCB, bit for bit.
    out = tmp_path / "as_float"
    _qf("export", src, "--format", "hf", "--dtype", "fp32", "--out", out)
    ours = read_safetensors(out / "model.safetensors")
    n = 0
    for name, mod in m8.named_modules():
        if isinstance(mod, bnb.nn.Linear8bitLt):
            want = bnb.functional.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB if mod.weight.SCB is not None
                                                          else mod.state.SCB)
            assert torch.equal(ours[name + ".weight"], want.float()), name
            n += 1
    assert n == 14
    _, ref = _hf_logits(out)  # transformers' float Llama on the dequantized weights
    got = torch.from_numpy(_qforge_logits(src, "deq")[0])
    scale = max(1.0, float(ref.abs().max()))
    err_deq = float((got - ref).abs().max())
    assert err_deq <= 1e-4 * scale, err_deq

    # Kept as int8 bases (the dir's own CB / SCB) with LLM.int8's mixed-precision matmul: vs transformers' 8-bit model.
    got8, kept, n8 = _qforge_int8_logits(src, tmp_path / "k")
    assert kept == 14 and n8 == 14, (kept, n8)
    err8 = float((got8 - want8).abs().max())
    print(f"\nINT8_IN transformers' load_in_8bit dir: dequantized read == int8_vectorwise_dequant bit for bit (14 linears), "
          f"logits vs transformers float on them {err_deq:.3g}; kept as 14 int8 bases: max|transformers Linear8bitLt - "
          f"qforge| logits {err8:.3g} (scale {scale:.3g}), argmax equal {bool((got8.argmax(-1) == want8.argmax(-1)).all())}")
    assert err8 <= 1e-3 * scale, err8
    r = _qf("inspect", src)
    info = json.loads(r.stdout.strip().splitlines()[-1])["quantization"]
    assert info["format"].startswith("bitsandbytes 8-bit LLM.int8") and info["packed_linears"] == 14, info


def test_export_bnb_int8_of_a_float_dir_equals_transformers_load_in_8bit(tmp_path, base):
    d, ck, _ = base
    src = _bnb8_dir(d, ck)
    out = tmp_path / "ours"
    r = _qf("export", ck, "--format", "bnb-int8", "--dtype", "fp32", "--out", out, quiet=False)
    assert "14 int8 linears" in r.stdout, r.stdout
    theirs, ours = read_safetensors(src / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert sorted(theirs) == sorted(ours), set(theirs) ^ set(ours)
    for k in theirs:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == json.loads((src / "config.json").read_text())["quantization_config"], q
    m, got = _hf_logits(out)
    assert type(m.model.layers[1].self_attn.o_proj).__name__ == "Linear8bitLt"
    _, want = _hf_logits(src)
    assert torch.equal(got, want)
    # a load_in_8bit dir itself (read dequantized) re-exports to the same bytes, its llm_int8_threshold kept
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["llm_int8_threshold"] = 4.0
    src4 = tmp_path / "src4"
    src4.mkdir()
    for f in os.listdir(src):
        (src4 / f).write_bytes((src / f).read_bytes())
    (src4 / "config.json").write_text(json.dumps(cfg))
    _qf("export", src4, "--format", "bnb-int8", "--dtype", "fp32", "--out", tmp_path / "again")
    again = read_safetensors(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(theirs[k], again[k]) for k in theirs) and sorted(again) == sorted(theirs)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == 4.0
    mb = (out / "model.safetensors").stat().st_size / 1e6
    print(f"\nINT8_OUT qforge export --format bnb-int8 of the float dir: {len(ours)} tensors byte-identical to "
          f"transformers' load_in_8bit save ({mb:.2f} MB), same quantization_config, transformers loads it as "
          f"Linear8bitLt with identical logits; the load_in_8bit dir re-exports to the same bytes")


def test_lora_on_int8_base_trains_loads_in_peft_and_exports(tmp_path, base):
    d, ck, corpus = base
    r = _qf("train", _recipe(tmp_path, "lora8", ck, corpus, LORA8.format(steps=12)), quiet=False)
    log = r.stdout + r.stderr
    losses = _losses(tmp_path / "lora8")
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    line = next(l for l in log.splitlines() if "weight bytes as stored" in l)
    _qf("export", tmp_path / "lora8", "--format", "peft", "--out", tmp_path / "adapter")
    # peft over transformers' 8-bit model of the same float dir (the same Int8Params bytes) vs qforge's int8 bases.
    m8 = transformers.AutoModelForCausalLM.from_pretrained(
        str(ck), quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(m8, str(tmp_path / "adapter")).eval()
    assert type(pm.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    with torch.no_grad():
        want = pm(torch.tensor(IDS)).logits.float()
    got, kept, n8 = _qforge_int8_logits(ck, tmp_path / "k", adapter=tmp_path / "adapter")
    assert kept == 0 and n8 == 14
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    # the merged run as a bitsandbytes 8-bit dir: transformers loads it; logits == qforge's on the same dir
    out = tmp_path / "merged8"
    _qf("export", tmp_path / "lora8", "--format", "bnb-int8", "--out", out)
    mm, got_m = _hf_logits(out)
    assert type(mm.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    ours_m, kept_m, _ = _qforge_int8_logits(out, tmp_path / "m")
    err_m = float((ours_m - got_m).abs().max())
    print(f"\nINT8_LORA LoRA r4 on int8 bases: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {line.split('] ')[-1].strip()}; "
          f"peft over transformers' 8-bit model vs qforge: max|logits diff| {err:.3g} (scale {scale:.3g}); "
          f"merged bnb-int8 export (fp16) in transformers vs qforge on it: {err_m:.3g}")
    assert err <= 1e-3 * scale, err
    assert kept_m == 14 and err_m <= 2e-2 * max(1.0, float(got_m.abs().max())), err_m


def test_bad_bnb8_dirs_are_refused(tmp_path, base):
    d, ck, _ = base
    src = _bnb8_dir(d, ck)
    t = read_safetensors(src / "model.safetensors")
    for what, edit, needle in [
            ("fmt", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight_format", torch.tensor(1, dtype=torch.uint8)),
             "model.layers.0.mlp.up_proj.weight_format' is 1"),
            ("scb", lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.SCB", torch.ones(7)),
             "model.layers.1.self_attn.q_proj.SCB' has shape [7]"),
            ("nocb", lambda t: t.pop("model.layers.0.self_attn.k_proj.SCB"), "model.layers.0.self_attn.k_proj.SCB' is missing")]:
        bad = tmp_path / what
        bad.mkdir()
        for f in os.listdir(src):
            if f != "model.safetensors":
                (bad / f).write_bytes((src / f).read_bytes())
        tt = dict(t)
        edit(tt)
        write_safetensors(bad / "model.safetensors", {k: v for k, v in tt.items()})
        r = _qf("export", bad, "--format", "hf", "--out", tmp_path / f"{what}_out", check=False)
        assert r.returncode != 0 and needle in r.stderr, (what, r.stderr[-2000:])


def test_lora_from_a_bnb8_dir_keeps_its_int8_bytes_and_trains(tmp_path, base):
    d, ck, corpus = base
    src = _bnb8_dir(d, ck)
    r = _qf("train", _recipe(tmp_path, "lora8in", src, corpus, LORA8.format(steps=10)), quiet=False)
    log = r.stdout + r.stderr
    assert "14 kept packed as LLM.int8 frozen bases" in log, log[-3000:]
    losses = _losses(tmp_path / "lora8in")
    print(f"\nINT8_IN_LORA LoRA from the load_in_8bit dir (its CB / SCB kept): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_packed_base_on_a_bnb8_dir_points_to_int8(tmp_path, base):
    """peft.base packed keeps GPTQ / AWQ / compressed-tensors codes; an LLM.int8 layer is a config error naming
    the layer and the base that keeps it (exit code 2), not an internal error."""
    d, ck, corpus = base
    src = _bnb8_dir(d, ck)
    r = _qf("train", _recipe(tmp_path, "packed8", src, corpus, LORA8.format(steps=2).replace("base: int8", "base: packed")),
            check=False)
    assert r.returncode == 2 and "bitsandbytes 8-bit (LLM.int8) linear" in r.stderr and "peft.base: int8" in r.stderr, \
        r.stderr[-2000:]


def test_int8_base_run_resumes_on_the_same_loss_curve(tmp_path, base):
    d, ck, corpus = base
    body = LORA8.format(steps=12).replace("log_every: 1,", "log_every: 1, save_every: 6,").replace(
        "{warmup_steps: 1}", "{warmup_steps: 1, total_steps: 12}")
    _qf("train", _recipe(tmp_path, "whole", ck, corpus, body))
    cfg = _recipe(tmp_path, "split", ck, corpus, body)
    _qf("train", cfg, "trainer.max_steps=6")
    r = _qf("train", cfg, quiet=False)  # resume: auto, from step 6 (the int8 bases' CB / SCB and the adapters come back)
    assert "at step 6" in r.stderr + r.stdout, (r.stdout + r.stderr)[-2000:]
    whole, split = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert len(whole) == 12 and whole == split[-12:], (whole, split)
