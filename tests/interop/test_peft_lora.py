"""qforge's LoRA and PEFT adapter directories against the real peers, both directions:
- an adapter qforge saves loads with peft.PeftModel.from_pretrained on the base as transformers
  loads it, and the logits equal qforge's (fp32, 1e-4), before and after merge_and_unload;
- an adapter trained/initialised by PEFT (random non-zero factors, other targets, rank, alpha)
  loads into qforge (peft/adapter.cpp) and gives PEFT's logits;
- a bad adapter (unsupported peft_type, shapes that do not fit) is refused with a clear message.
The base model is a tiny random Llama written by tests/interop/interop_lora.cpp in Hugging Face
layout, so this also checks qforge's Llama forward against transformers' LlamaForCausalLM."""
import json
import shutil
import subprocess

import peft  # a missing peer fails here, loudly
import pytest
import torch
import transformers

from st_io import interop_tool, read_safetensors

TOL = 1e-4


def _make(tmp_path, *extra):
    subprocess.run([interop_tool("interop_lora"), "make", str(tmp_path), *extra], check=True)
    return read_safetensors(tmp_path / "qforge.safetensors")


def _hf_base(tmp_path):
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32,
                                                      attn_implementation="eager")
    return m.eval()


def _close(a, b):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= TOL * max(1.0, scale), f"max abs diff {err} (logit scale {scale})"


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_qforge_adapter_loads_in_peft(tmp_path, variant):
    ours = _make(tmp_path, *(["rslora"] if variant == "rslora" else []))
    base = _hf_base(tmp_path)
    with torch.no_grad():
        _close(base(ours["ids"]).logits, ours["logits_base"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] == (variant == "rslora")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == 2 * 3  # q_proj, v_proj, down_proj in 2 layers
    with torch.no_grad():
        out = model(ours["ids"]).logits
        assert (out - ours["logits_base"]).abs().max() > 1e-2  # the adapter really changes the model
        _close(out, ours["logits_lora"])
        merged = model.merge_and_unload()
        _close(merged(ours["ids"]).logits, ours["logits_merged"])


def test_peft_adapter_loads_in_qforge(tmp_path):
    ours = _make(tmp_path)
    base = _hf_base(tmp_path)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=8, lora_alpha=24, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        want = model(ours["ids"]).logits
    subprocess.run([interop_tool("interop_lora"), "load", str(tmp_path), str(tmp_path / "peft_adapter"),
                    str(tmp_path / "loaded.safetensors")], check=True)
    got = read_safetensors(tmp_path / "loaded.safetensors")["logits"]
    assert (want - ours["logits_base"]).abs().max() > 1e-2
    _close(got, want)


def _load_fails(tmp_path, adapter):
    r = subprocess.run([interop_tool("interop_lora"), "load", str(tmp_path), str(adapter),
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    return r.stderr


def test_bad_adapters_are_refused(tmp_path):
    _make(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    assert "peft_type 'PREFIX_TUNING' is not supported" in _load_fails(tmp_path, bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    err = _load_fails(tmp_path, bad)
    assert "lora_A.weight' has shape [4, 64], expected [8, 64]" in err, err
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "DoRA" in _load_fails(tmp_path, bad)
