"""Quantized Hugging Face dirs IN, the rest of issue 21 item 1: compressed-tensors float-quantized FP8
and GPTQ 2- and 3-bit, each made by its own peer.

- FP8: the compressed-tensors package writes the dir (apply_quantization_config with fp8 e4m3 weights,
  strategy tensor / channel / block 32x32 (compressed-tensors 0.14's decompressor infers the block from
  the scale's shape, which is wrong for partial edge blocks: those are checked against hand-made codes
  in tests/models/hf_quantized_test.cpp, qforge taking block_structure from config.json as vLLM does);
  weight-only, FP8_DYNAMIC-style dynamic per-token input activations, FP8-style static input_scale;
  scales set to each tensor's / row's / block's amax / 448; ModelCompressor.compress_model quantizes
  with its own cast). qforge's dequantized weights equal compressed-tensors' decompress_module (the
  weight transformers' CompressedLinear holds after its first forward) bit for bit; weight-only dirs give transformers'
  logits within 1e-4 of the logit scale. qforge does not apply the checkpoint's activation
  quantization: those dirs' logits are compared with transformers' own, which quantizes each
  linear's input to fp8, and the difference is reported (and bounded by 5% of the logit scale).
- GPTQ 2/3-bit: GPTQModel 4.2.5 quantizes the tiny Llama (checkpoint_format gptq, v1; 3-bit codes
  straddle int32 words). qforge's weights equal gptqmodel's TorchQuantLinear.dequantize_weight(), the
  logits equal transformers' within 1e-4 of the logit scale, greedy tokens match. A 2-bit dir trains
  as a packed LoRA base (peft.base packed: the loss falls, the run rebuilds and evaluates to its last
  val_loss); a 3-bit one is refused there by name.
Runs in .venv-gptq (gptqmodel, optimum, compressed-tensors). A missing peer fails at import."""
import json

import numpy as np
import pytest
import safetensors
import torch

from test_families import _recipe
from test_packed_base import _train_packed
from test_quantized_in import _gptq, _hf, _qforge_logits, _qforge_weights, base  # noqa: F401  (base: the fixture)
from test_quantized_in import test_gptqmodel_dir_loads_like_transformers as _gptq_dir_check
from tiny_runs import qforge as _qf

import compressed_tensors  # noqa: E402,F401  - the peer
import transformers  # noqa: E402

FP8_MAX = 448.0


def _fp8_scale(w, strategy, block):
    """amax / 448 per tensor ([1]), per output row ([out, 1]) or per block tile (edge tiles partial)."""
    a = w.abs().float()
    if strategy == "tensor":
        return (a.max() / FP8_MAX).reshape(1)
    if strategy == "channel":
        return a.amax(1, keepdim=True) / FP8_MAX
    r, c = w.shape
    br, bc = block
    s = torch.empty((r + br - 1) // br, (c + bc - 1) // bc)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = a[i * br:(i + 1) * br, j * bc:(j + 1) * bc].max() / FP8_MAX
    return s


def _ct_fp8_dir(out, ck, strategy, acts):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    block = [32, 32]
    m = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    w = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                         block_structure=block if strategy == "block" else None)
    a = None
    if acts == "dynamic":
        a = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    elif acts == "static":
        a = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=w, input_activations=a)}, ignore=["lm_head"], format="float-quantized"))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "weight_scale"):
                mod.weight_scale.copy_(_fp8_scale(mod.weight, strategy, block).reshape(mod.weight_scale.shape))
            if hasattr(mod, "input_scale"):
                mod.input_scale.fill_(0.02)
    comp = ModelCompressor.from_pretrained_model(m, quantization_format="float-quantized")
    comp.compress_model(m)
    m.save_pretrained(str(out))
    comp.update_config(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((ck / f).read_bytes())
    return out


@pytest.mark.parametrize("strategy,acts", [("tensor", "none"), ("channel", "none"), ("block", "none"),
                                           ("channel", "dynamic"), ("tensor", "static"), ("block", "dynamic")])
def test_compressed_tensors_fp8_dir_loads_like_transformers(tmp_path, base, strategy, acts):
    _, ck, _ = base
    out = _ct_fp8_dir(tmp_path / "fp8", ck, strategy, acts)
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "float-quantized" and q["config_groups"]["group_0"]["weights"]["strategy"] == strategy
    hf, logits, gen = _hf(out)
    ours = _qforge_weights(tmp_path, out)
    n = 0
    for name, mod in hf.named_modules():
        if type(mod).__name__ == "CompressedLinear":
            assert str(mod.quantization_status) == "QuantizationStatus.FROZEN"  # decompressed by the forward
            want = mod.weight.float()  # compressed-tensors' decompress_module: what CompressedLinear multiplies with
            assert torch.equal(ours[name + ".weight"], want), name
            n += 1
    assert n == 14
    got, our_gen = _qforge_logits(out, "fp8")
    scale = max(1.0, float(np.abs(logits).max()))
    err = float(np.abs(logits - got).max())
    print(f"\nQUANTIZED_IN compressed-tensors fp8 {strategy} activations {acts}: 14 linears == decompress_module; "
          f"max|transformers - qforge| logits {err:.3g} (scale {scale:.3g}); greedy {gen == our_gen}")
    if acts == "none":
        assert err <= 1e-4 * scale, err
        assert gen == our_gen
    else:  # transformers quantizes each linear's input to fp8; qforge runs the dequantized weights in fp32
        assert err <= 5e-2 * scale, err
    r = _qf("inspect", out)
    info = json.loads(r.stdout.strip().splitlines()[-1])["quantization"]
    assert info["dequantized"] is True and info["packed_linears"] == 14, info
    lin = info["linears"]["model.layers.1.mlp.down_proj"]
    assert lin.startswith("compressed-tensors float-quantized fp8-e4m3 per " + ("block 32x32" if strategy == "block"
                                                                                  else strategy)), lin
    assert ("not applied" in lin) == (acts != "none"), lin


@pytest.mark.parametrize("tag,bits,sym,desc_act", [("b2_asym", 2, False, False), ("b3_sym", 3, True, False),
                                                   ("b3_asym_desc_act", 3, False, True)])
def test_gptqmodel_low_bit_dir_loads_like_transformers(tmp_path, base, tag, bits, sym, desc_act):
    """test_quantized_in's GPTQ check (weights == dequantize_weight, logits, greedy, inspect) at 2 and 3 bits."""
    _gptq_dir_check(tmp_path, base, tag, sym, desc_act, bits)


def test_low_bit_gptq_as_packed_lora_base(tmp_path, base):
    """peft.base packed keeps a 2-bit GPTQ dir's codes (the log says all 14 kept packed; the loss falls;
    the run rebuilds its 2-bit bases and evaluates to its last val_loss); a 3-bit dir is refused by
    name (exit 2, ConfigError)."""
    d, ck, corpus = base
    g2 = _gptq(d, ck, "b2_asym", False, False, 2)
    run, losses, log = _train_packed(tmp_path, "lora2", g2, corpus)
    assert "14 kept packed as int frozen bases" in log, log[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    got = json.loads(_qf("eval", run, "--max-batches", "2").stdout.strip().splitlines()[-1])
    print(f"\nQUANTIZED_IN LoRA on a packed GPTQ int2 base: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"eval of the rebuilt run {got['loss']:.4f} (last val_loss {val[-1]:.4f})")
    assert abs(got["loss"] - val[-1]) < 1e-5
    g3 = _gptq(d, ck, "b3_sym", True, False, 3)
    body = "peft: {r: 4, alpha: 8, base: packed}\ntrainer: {max_steps: 2, batch_size: 4}"
    r = _qf("train", _recipe(tmp_path, "lora3", g3, corpus, body), check=False)
    assert r.returncode == 2 and "is stored as GPTQ int3, which packed does not keep" in r.stderr, r.stderr
