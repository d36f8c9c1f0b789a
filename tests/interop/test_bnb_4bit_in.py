"""bitsandbytes 4-bit Hugging Face dirs IN (issue 21): transformers + bitsandbytes (CPU backend) load a
tiny random Llama with BitsAndBytesConfig(load_in_4bit=True, nf4/fp4, double quant on/off, a compute
dtype) and save_pretrained it: per linear a uint8 `weight` [n/2, 1], `weight.absmax`, `weight.quant_map`,
with double quant `weight.nested_absmax` / `weight.nested_quant_map`, and the JSON quant_state in
`weight.quant_state.bitsandbytes__<type>`.

- qforge loads the dir dequantized: every linear equals bitsandbytes.functional.dequantize_4bit of the
  module's own packed weight and quant_state bit for bit (through `qforge export --format hf --dtype fp32`
  of the dir), for nf4 and fp4, with and without double quant, fp32 / bf16 / fp16 quant_state dtypes;
- the fp32 dirs' logits equal transformers' float Llama holding those dequantized weights within 1e-4
  of the logit scale with the same greedy tokens, and the bnb model's own (Linear4bit, whose CPU
  inference kernel repacks the weight and computes in lower precision: ~6e-3 from its own dequantized
  weights) within 2e-2; `qforge inspect` names the format;
- a QLoRA recipe from the nf4 double-quant dir (peft.base nf4: blocksize 64, nested 256, qforge's
  default) keeps the packed bytes as the frozen base (the log says so) and trains (the loss falls);
- a load_in_8bit config over these 4-bit tensors is refused naming the tensors (8-bit dirs: test_bnb_int8.py).
A missing peer fails at import, loudly."""
import json
import os
import subprocess

import numpy as np
import pytest

import bitsandbytes as bnb  # noqa: F401  - the peer
import torch
import transformers

from st_io import interop_tool, read_safetensors
from test_families import _checkpoint, _losses, _recipe
from tiny_runs import QFORGE, kjv_corpus, tool_logits

IDS = [[1, 45, 7, 99, 3, 120, 18, 64, 5, 140, 12, 77], [2, 9, 33, 101, 7, 7, 60, 3, 88, 21, 130, 4]]
N_NEW = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _qf(*args, check=True, quiet=True):
    r = subprocess.run([QFORGE, *(["-q"] if quiet else []), *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    if check:
        assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("bnb4")
    corpus = kjv_corpus(d / "kjv.txt", 1500)
    return d, _checkpoint(d, "llama", corpus, ffn=192), corpus


def _bnb_dir(d, ck, qtype, dq, dtype):
    """transformers' own save of the model loaded in 4 bits, with the float dir's tokenizer."""
    out = d / f"bnb_{qtype}_{int(dq)}_{dtype}"
    if out.exists():
        return out
    bc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qtype, bnb_4bit_use_double_quant=dq,
                                         bnb_4bit_compute_dtype=DTYPES[dtype])
    m = transformers.AutoModelForCausalLM.from_pretrained(str(ck), quantization_config=bc, device_map="cpu",
                                                         dtype=DTYPES[dtype])
    m.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((ck / f).read_bytes())
    return out


def _hf(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits.float().numpy()
        gen = m.generate(torch.tensor(IDS[:1]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=N_NEW)[0, len(IDS[0]):].tolist()
    return m, logits, gen


def _qforge_logits(d, tag):
    return tool_logits([interop_tool("interop_hf"), d], d.parent / f"{d.name}_{tag}_io", IDS, N_NEW)


@pytest.mark.parametrize("qtype,dq,dtype", [("nf4", True, "float32"), ("nf4", False, "float32"), ("fp4", True, "float32"),
                                            ("fp4", False, "float32"), ("nf4", True, "bfloat16"), ("fp4", True, "float16")])
def test_bnb_4bit_dir_loads_like_bitsandbytes(tmp_path, base, qtype, dq, dtype):
    d, ck, _ = base
    src = _bnb_dir(d, ck, qtype, dq, dtype)
    q = json.loads((src / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] and q["bnb_4bit_quant_type"] == qtype
    names = read_safetensors(src / "model.safetensors")
    key = f"model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__{qtype}"
    assert key in names and ("model.layers.0.mlp.up_proj.weight.nested_absmax" in names) == dq
    qs = json.loads(bytes(names[key].numpy()).decode())
    assert qs["dtype"] == dtype, qs

    m = transformers.AutoModelForCausalLM.from_pretrained(str(src), device_map="cpu").eval()
    out = tmp_path / "as_float"
    _qf("export", src, "--format", "hf", "--dtype", "fp32", "--out", out)
    ours = read_safetensors(out / "model.safetensors")
    n = 0
    for name, mod in m.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            want = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            got = ours[name + ".weight"]
            assert got.shape == want.shape and torch.equal(got, want), \
                (name, float((got - want).abs().max()), int((got != want).sum()))
            n += 1
    assert n == 14
    msg = f"\nBNB4_IN {qtype} double_quant={dq} dtype={dtype}: 14 linears == bitsandbytes dequantize_4bit bit for bit"
    if dtype == "float32":
        # Exact reference: transformers' float Llama holding bitsandbytes' dequantized weights (qforge's
        # fp32 export, equal to them bit for bit as checked above).
        _, ref, ref_gen = _hf(out)
        _, logits, gen = _hf(src)  # the bnb model itself (Linear4bit's CPU inference kernel)
        got, our_gen = _qforge_logits(src, f"{qtype}{int(dq)}")
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(ref - got).max())
        err_bnb, bnb_own = float(np.abs(logits - got).max()), float(np.abs(logits - ref).max())
        msg += (f"; max|transformers(float, dequantized weights) - qforge| logits {err:.3g} (scale {scale:.3g}), "
                f"greedy {ref_gen == our_gen}; max|transformers(bnb Linear4bit) - qforge| {err_bnb:.3g} "
                f"(bnb's CPU kernel vs its own dequantized weights: {bnb_own:.3g}), greedy {gen == our_gen}")
        assert err <= 1e-4 * scale, err
        assert ref_gen == our_gen
        assert err_bnb <= 2e-2 * scale, err_bnb  # bitsandbytes' CPU 4-bit gemm computes in lower precision
    print(msg)
    r = _qf("inspect", src)
    info = json.loads(r.stdout.strip().splitlines()[-1])["quantization"]
    assert info["format"].startswith(f"bitsandbytes 4-bit {qtype}") and info["packed_linears"] == 14, info
    assert info["linears"]["model.layers.1.mlp.down_proj"] == f"bitsandbytes 4-bit {qtype}" + (" double quant" if dq else "")


def test_qlora_from_bnb_nf4_dir_keeps_the_packed_base_and_trains(tmp_path, base):
    d, ck, corpus = base
    src = _bnb_dir(d, ck, "nf4", True, "float32")
    steps = """trainer: {max_steps: 12, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1, optim: {lr: 0.01},
          schedule: {warmup_steps: 1}}"""
    r = _qf("train", _recipe(tmp_path, "qlora", src, corpus, "peft: {r: 4, alpha: 8, base: nf4}\n" + steps), quiet=False)
    log = r.stdout + r.stderr
    assert "14 kept packed as NF4 frozen bases" in log, log[-3000:]
    losses = _losses(tmp_path / "qlora")
    print(f"\nBNB4_IN QLoRA from the bnb nf4 dir (packed base kept): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    # a full fine-tune from the same dir (dequantized) trains too
    _qf("train", _recipe(tmp_path, "full", src, corpus, steps))
    full = _losses(tmp_path / "full")
    assert sum(full[-3:]) < sum(full[:3]), full


def test_load_in_8bit_config_over_4bit_tensors_is_refused(tmp_path, base):
    d, ck, _ = base
    src = _bnb_dir(d, ck, "nf4", True, "float32")
    bad = tmp_path / "int8"
    bad.mkdir()
    for f in os.listdir(src):
        (bad / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update({"load_in_4bit": False, "load_in_8bit": True, "_load_in_4bit": False,
                                       "_load_in_8bit": True})
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _qf("inspect", bad, check=False)
    assert r.returncode != 0 and "model.layers.0.mlp.down_proj.weight." in r.stderr and \
        "is a bitsandbytes 4-bit part (load_in_4bit), but config.json's quantization_config says load_in_8bit" in r.stderr, \
        r.stderr
