"""LoRA on a packed GPTQ / AWQ / compressed-tensors base (issue 21 item 2): `peft.base: packed` with
model.from = a quantized dir keeps every linear's qweight/qzeros/scales/g_idx packed (no float weight is
built), dequantizes per forward, and trains the adapter.

- GPTQ dirs made by GPTQModel 4.2.5 (symmetric, asymmetric v1 zero points, desc_act with a permuted
  g_idx; test_quantized_in's fixtures): the loss falls, the log says the linears were kept packed and
  reports the base's bytes per weight, and the PEFT adapter qforge saves loads with peft over
  transformers' own GPTQ model (optimum + gptqmodel's TorchQuantLinear) with qforge's logits (its merged
  fp32 export: dequantized base + s*BA) within 1e-4 of the logit scale;
- AWQ and compressed-tensors dirs (qforge's own exports of an int4-g32-zp RTN run): the loss falls and
  `qforge eval` of the run (its checkpoint rebuilt, packed bases from the checkpoint) gives the loss the
  training ended with.
Runs in .venv-gptq (gptqmodel, optimum, compressed-tensors; peft from .venv). A missing peer fails at import.
peft 0.21's GPTQ dispatch refuses gptqmodel < 7 by version alone; _peft_gptq_gate lifts that gate only."""
import json
import os
import subprocess

import numpy as np
import peft  # noqa: F401  - the peers; a missing one fails here, loudly
import pytest
import torch

from test_families import _losses, _recipe
from test_quantized_in import IDS, _gptq, _hf, _qf, base, runs  # noqa: F401  - fixtures
from tiny_runs import QFORGE

def _peft_gptq_gate(monkeypatch):
    """peft 0.21 gates its GPTQ LoRA dispatch (tuners/lora/gptq.py dispatch_gptq: wrap any gptqmodel
    BaseQuantLinear) on gptqmodel >= 7, and raises ImportError for the overlay's pinned 4.2.5. The dispatch
    itself needs only BaseQuantLinear, which 4.2.5 has: this lifts the version gate where the LoRA path
    checks it (the GPTQ dispatch and forward-only backend detection: yes; the AWQ dispatch: no) and
    nothing else."""
    import peft.tuners.lora.awq
    import peft.tuners.lora.gptq
    import peft.utils.other
    import peft.utils.quantization_utils
    monkeypatch.setattr(peft.tuners.lora.gptq, "is_gptqmodel_available", lambda: True)
    monkeypatch.setattr(peft.tuners.lora.awq, "is_gptqmodel_available", lambda: False)
    monkeypatch.setattr(peft.utils.other, "is_gptqmodel_available", lambda: True)
    monkeypatch.setattr(peft.utils.quantization_utils, "is_gptqmodel_available", lambda: True)


STEPS = """trainer: {max_steps: 16, batch_size: 4, eval_every: 0, eval_batches: 2, log_every: 1, optim: {lr: 0.01},
          schedule: {warmup_steps: 1}}"""


def _train_packed(tmp_path, name, src, corpus):
    cfg = _recipe(tmp_path, name, src, corpus, "peft: {r: 4, alpha: 8, base: packed}\n" + STEPS)
    r = subprocess.run([QFORGE, "train", str(cfg)], capture_output=True, text=True,  # not -q: the log is checked
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    losses = _losses(tmp_path / name)
    assert len(losses) >= 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    return tmp_path / name, losses, log


@pytest.mark.parametrize("tag,sym,desc_act", [("sym", True, False), ("asym", False, False), ("sym_desc_act", True, True)])
def test_lora_on_packed_gptq_loads_in_peft_over_transformers_gptq(tmp_path, monkeypatch, base, tag, sym,  # noqa: F811
                                                                   desc_act):
    import peft as peft_mod
    _peft_gptq_gate(monkeypatch)
    d, ck, corpus = base
    g = _gptq(d, ck, tag, sym, desc_act)
    run, losses, log = _train_packed(tmp_path, f"packed_{tag}", g, corpus)
    assert "14 kept packed as int frozen bases" in log, log[-3000:]
    assert "frozen base:" in log, log[-3000:]
    bits = float(log.split("frozen base:")[1].split("(")[1].split(" bits/weight")[0])
    # qforge's trained model: its merged fp32 export (the packed base dequantized + s*BA)
    merged = tmp_path / "merged"
    _qf("export", run, "--format", "hf", "--dtype", "fp32", "--out", merged)
    _, want, _ = _hf(merged)
    # peft over transformers' GPTQ model of the same dir, with the adapter qforge saved
    m, base_logits, _ = _hf(g)
    pm = peft_mod.PeftModel.from_pretrained(m, str(run / "adapter")).eval()
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "TorchQuantLinear"
    with torch.no_grad():
        got = pm(torch.tensor(IDS)).logits.float().numpy()
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    moved = float(np.abs(want - base_logits).max())
    print(f"\nPACKED_BASE gptq {tag}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; base {bits:.2f} bits/weight; "
          f"peft over transformers' GPTQ model vs qforge: max|logit diff| {err:.2e} (scale {scale:.2f}; the adapter "
          f"moved the logits by {moved:.2e})")
    assert moved > 100 * err  # the adapter is really applied on both sides
    assert err <= 1e-4 * scale, err


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_lora_on_packed_awq_and_compressed_tensors_trains_and_rebuilds(tmp_path, base, runs, fmt):  # noqa: F811
    d, _, corpus = base
    src = tmp_path / fmt
    _qf("export", runs / "rtn_int4-g32-zp", "--format", fmt, "--out", src)
    run, losses, log = _train_packed(tmp_path, f"packed_{fmt.replace('-', '_')}", src, corpus)
    assert "14 kept packed as int frozen bases" in log, log[-3000:]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    r = _qf("eval", run, "--max-batches", "2")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nPACKED_BASE {fmt}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; val {val[0]:.4f} -> {val[-1]:.4f}; "
          f"qforge eval of the rebuilt run {got['loss']:.4f} ({got['format']})")
    assert abs(got["loss"] - val[-1]) < 1e-5
