"""Quantized Hugging Face dirs IN (issue 21, first part): qforge loads GPTQ, AWQ GEMM and
compressed-tensors checkpoints dequantized to float, and every command takes them.

- GPTQ made by its own peer: GPTQModel 4.2.5 quantizes a tiny random Llama (transformers writes it) on
  the CPU, symmetric, asymmetric (saved as checkpoint_format gptq, v1: stored zero points z - 1, which
  gptqmodel converts by one int32 add per word) and with desc_act (a permuted g_idx). qforge's
  dequantized weights equal gptqmodel's own TorchQuantLinear.dequantize_weight() as transformers
  (optimum + gptqmodel) loads the dir, the logits equal transformers' within 1e-4 of the logit scale
  and greedy tokens match.
- qforge's own `export --format gptq` (int4-g32 symmetric v1 and int4-g32-zp gptq_v2) and
  compressed-tensors dirs read back to exactly the converted run's logits.
- AWQ: a dir qforge wrote with `export --format awq` (an int4-g32-zp run) reads back to the run's logits
  exactly, and one packed by autoawq's own WQLinear_GEMM.from_linear from the float model loads with
  transformers' AWQ loader's logits (the CPU shims of test_awq_export.py).
- End to end: `qforge quantize GPTQ_DIR --method rtn --quant q4_0` and LoRA / full fine-tunes with
  model.from = the GPTQ dir (the loss falls); `qforge inspect` names the format and says it was dequantized.
Runs in .venv-gptq (gptqmodel, optimum, compressed-tensors; autoawq from .venv). A missing peer fails
at import, loudly."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's CPU kernel would torch.compile itself
import gptqmodel  # noqa: E402  - the peers
import optimum  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402

from st_io import interop_tool, read_safetensors, write_safetensors  # noqa: E402
from test_families import _checkpoint, _losses, _recipe  # noqa: E402
from tiny_runs import kjv_corpus, tool_logits  # noqa: E402
from tiny_runs import qforge as _qf  # noqa: E402

IDS = [[1, 45, 7, 99, 3, 120, 18, 64, 5, 140, 12, 77], [2, 9, 33, 101, 7, 7, 60, 3, 88, 21, 130, 4]]
N_NEW = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama (ffn 192: group 32 divides every width) with a BPE tokenizer.json that has a pad id."""
    d = tmp_path_factory.mktemp("qin")
    corpus = kjv_corpus(d / "kjv.txt", 1500)
    ck = _checkpoint(d, "llama", corpus, ffn=192)
    tc = json.loads((ck / "tokenizer_config.json").read_text())
    tc["pad_token"] = "<|eos|>"  # GPTQModel.load insists on one
    (ck / "tokenizer_config.json").write_text(json.dumps(tc))
    return d, ck, corpus


def _gptq(d, ck, tag, sym, desc_act, bits=4):
    out = d / f"gptq_{tag}"
    if out.exists():
        return out
    torch.manual_seed(0)
    rows = [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in torch.randint(2, 150, (16, 24))]
    qc = gptqmodel.QuantizeConfig(bits=bits, group_size=32, sym=sym, desc_act=desc_act, damp_percent=0.01, device="cpu")
    m = gptqmodel.GPTQModel.load(str(ck), qc, torch_dtype=torch.float32)
    cwd = os.getcwd()
    os.chdir(d)  # gptqmodel writes its log files into the working directory
    try:
        m.quantize(rows, batch_size=1, calibration_data_min_length=0)
        m.save(str(out))
    finally:
        os.chdir(cwd)
    return out


def _qforge_logits(d, tag):
    """interop_hf (models/hf.h load_hf_model) on the dir: fp32 logits of IDS and greedy tokens of IDS[0]."""
    return tool_logits([interop_tool("interop_hf"), d], d.parent / f"{d.name}_{tag}_io", IDS, N_NEW)


def _hf(path, dtype=torch.float32):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=dtype,
                                                         attn_implementation="eager").eval()
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits.float().numpy()
        gen = m.generate(torch.tensor(IDS[:1]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=N_NEW)[0, len(IDS[0]):].tolist()
    return m, logits, gen


def _qforge_weights(tmp, src):
    """qforge's dequantized weights, through `qforge export --format hf --dtype fp32` of the quantized dir."""
    out = tmp / "as_float"
    _qf("export", src, "--format", "hf", "--dtype", "fp32", "--out", out)
    return read_safetensors(out / "model.safetensors")


@pytest.mark.parametrize("tag,sym,desc_act,bits", [("sym", True, False, 4), ("asym", False, False, 4),
                                                   ("sym_desc_act", True, True, 4), ("asym_8bit", False, False, 8)])
def test_gptqmodel_dir_loads_like_transformers(tmp_path, base, tag, sym, desc_act, bits):
    d, ck, _ = base
    g = _gptq(d, ck, tag, sym, desc_act, bits)
    q = json.loads((g / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["sym"] == sym and q["desc_act"] == desc_act and q["checkpoint_format"] == "gptq"
    assert q["bits"] == bits
    st = read_safetensors(g / "model.safetensors")
    if desc_act:  # a real act-order permutation, not i // 32
        g_idx = st["model.layers.0.mlp.down_proj.g_idx"]
        assert not torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 32)
    m, logits, gen = _hf(g)
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "TorchQuantLinear"
    ours = _qforge_weights(tmp_path, g)
    n = 0
    for name, mod in m.named_modules():
        if type(mod).__name__ == "TorchQuantLinear":
            want = mod.dequantize_weight().t().float()  # gptqmodel's own dequantization, [out, in]
            assert torch.equal(ours[name + ".weight"], want), name
            n += 1
    assert n == 14
    got, our_gen = _qforge_logits(g, tag)
    scale = max(1.0, float(np.abs(logits).max()))
    err = float(np.abs(logits - got).max())
    print(f"\nQUANTIZED_IN gptqmodel {tag}: 14 linears == gptqmodel's dequantize_weight; "
          f"max|transformers - qforge| logits {err:.3g} (scale {scale:.3g}); greedy {our_gen == gen}")
    assert err <= 1e-4 * scale, err
    assert gen == our_gen
    r = _qf("inspect", g)
    info = json.loads(r.stdout.strip().splitlines()[-1])["quantization"]
    assert info["dequantized"] is True and info["packed_linears"] == 14, info
    assert info["format"].startswith(f"gptq int{bits} group 32 " + ("sym" if sym else "asym")), info
    assert info["linears"]["model.layers.1.mlp.down_proj"].startswith(f"gptq int{bits}"), info


def test_v1_zero_point_overflow_reads_like_gptqmodel(tmp_path, base):
    """An asymmetric v1 file holding z = 0 stores z - 1 = -1, i.e. nibble 15: gptqmodel's v1 -> v2
    conversion (one int32 add of 0x11111111 per word) carries it into the next code. qforge reads the
    words the same way: its weights equal gptqmodel's dequantize_weight() where nibbles are 15."""
    d, ck, _ = base
    g = _gptq(d, ck, "asym", False, False)
    out = tmp_path / "overflow"
    out.mkdir()
    for f in os.listdir(g):
        if f != "model.safetensors":
            (out / f).write_bytes((g / f).read_bytes())
    st = {k: v.numpy() for k, v in read_safetensors(g / "model.safetensors").items()}
    qz = st["model.layers.0.mlp.up_proj.qzeros"].copy()
    qz.view(np.uint32)[:, ::3] |= np.uint32(0xF)  # code 0 of every third word: nibble 15
    qz.view(np.uint32)[1, 1] = np.uint32(0xFFFFFFFF)  # a whole word of 15s: carries ripple out of the word
    st["model.layers.0.mlp.up_proj.qzeros"] = qz
    write_safetensors(out / "model.safetensors", st)
    m, _, _ = _hf(out)
    want = m.model.layers[0].mlp.up_proj.dequantize_weight().t().float()
    ours = _qforge_weights(tmp_path, out)["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(ours, want)
    print("\nQUANTIZED_IN v1 zero points with nibble 15 (carrying): qforge == gptqmodel's dequantize_weight")


@pytest.fixture(scope="module")
def runs(base):
    """qforge RTN runs of the float checkpoint: int4-g32 (symmetric), int4-g32-zp (integer zero points), int8."""
    d, ck, corpus = base
    calib = _recipe(d, "calib", ck, corpus, "")
    for quant in ("int4-g32", "int4-g32-zp", "int8-per-channel"):
        _qf("quantize", ck, "--method", "rtn", "--quant", quant, "--calib", calib, "--samples", "8", "--no-eval",
            "--out", d / f"rtn_{quant}")
    return d


def _converted_logits(d, run):
    """qforge's own forward of a converted run (its fp32 HF export through interop_hf)."""
    hf = d / f"{run.name}_hf32"
    if not hf.exists():
        _qf("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    return _qforge_logits(hf, "ref")


@pytest.mark.parametrize("fmt,quant", [("gptq", "int4-g32"), ("gptq", "int4-g32-zp"), ("compressed-tensors", "int4-g32"),
                                       ("compressed-tensors", "int4-g32-zp"), ("awq", "int4-g32-zp"),
                                       ("gptq", "int8-per-channel"), ("compressed-tensors", "int8-per-channel")])
def test_qforge_exports_read_back_exactly(tmp_path, runs, fmt, quant):
    """What qforge writes it reads back: the packed dir's logits equal the converted run's own."""
    run = runs / f"rtn_{quant}"
    out = tmp_path / fmt
    _qf("export", run, "--format", fmt, "--out", out)
    want, want_gen = _converted_logits(runs, run)
    got, gen = _qforge_logits(out, fmt)
    err = float(np.abs(got - want).max())
    print(f"\nQUANTIZED_IN round trip {fmt} {quant}: max|read back - converted run| {err:.3g}")
    assert err <= 1e-5 * max(1.0, float(np.abs(want).max())), err
    assert gen == want_gen


def test_autoawq_packed_dir_loads_like_transformers(tmp_path, base):
    """An AWQ GEMM dir packed by autoawq's own WQLinear_GEMM.from_linear (its quantizer, zero_point true,
    group 32) from the float model: qforge's logits == transformers' AWQ loading of the dir (autoawq's
    dequantize_gemm + matmul; fp16 arithmetic inside the kernel)."""
    from test_awq_export import _autoawq_gemm, awq_gemm  # its CPU shims apply on import
    d, ck, _ = base
    out = tmp_path / "awq"
    out.mkdir()
    st = read_safetensors(ck / "model.safetensors")
    tensors = {}
    for k, v in st.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            qw, qz, s = _autoawq_gemm(v.float(), 32)
            name = k[: -len(".weight")]
            tensors.update({name + ".qweight": qw.numpy(), name + ".qzeros": qz.numpy(), name + ".scales": s.numpy()})
        else:
            tensors[k] = v.half().numpy()
    write_safetensors(out / "model.safetensors", tensors)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32,
                                  "zero_point": True, "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((ck / f).read_bytes())
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    for mod in m.modules():  # test_awq_export's shim (4): the fp32 load puts the module's fp16 scales back
        if isinstance(mod, awq_gemm.WQLinear_GEMM):
            mod.scales = mod.scales.half()
    assert type(m.model.layers[0].mlp.down_proj) is awq_gemm.WQLinear_GEMM
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits.float().numpy()
    got, _ = _qforge_logits(out, "awq")
    scale = max(1.0, float(np.abs(logits).max()))
    err = float(np.abs(logits - got).max())
    print(f"\nQUANTIZED_IN autoawq-packed AWQ: max|transformers - qforge| {err:.3g} (scale {scale:.3g})")
    assert err <= 4e-3 * scale, err  # autoawq's kernel rounds activations and weights to fp16


@pytest.mark.parametrize("fmt,bits,sym,strategy", [("pack-quantized", 4, False, "group"), ("pack-quantized", 4, True, "group"),
                                                     ("int-quantized", 8, True, "channel")])
def test_compressed_tensors_dir_loads_like_transformers(tmp_path, base, fmt, bits, sym, strategy):
    """A dir the compressed-tensors package itself writes (apply_quantization_config; scales and zero
    points from its own calculate_qparams on each group's min/max; ModelCompressor.compress_model packs;
    save_pretrained + update_config): qforge's logits == transformers' (CompressedLinear) within 1e-4."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    _, ck, _ = base
    m = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                                    ignore=["lm_head"], format=fmt))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "weight_scale"):
                w = mod.weight.reshape(mod.weight.shape[0], -1, 32) if strategy == "group" else mod.weight[:, None, :]
                s, z = calculate_qparams(w.amin(-1), w.amax(-1), args)
                mod.weight_scale.copy_(s.reshape(mod.weight_scale.shape))
                if hasattr(mod, "weight_zero_point"):
                    mod.weight_zero_point.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(m, quantization_format=fmt)
    comp.compress_model(m)
    out = tmp_path / "ct"
    m.save_pretrained(str(out))
    comp.update_config(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((ck / f).read_bytes())
    names = read_safetensors(out / "model.safetensors")
    packed = "model.layers.0.mlp.up_proj." + ("weight_packed" if fmt == "pack-quantized" else "weight")
    assert packed in names and (sym or "model.layers.0.mlp.up_proj.weight_zero_point" in names), sorted(names)[:12]
    hf, logits, gen = _hf(out)
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "CompressedLinear"
    got, our_gen = _qforge_logits(out, "ct")
    scale = max(1.0, float(np.abs(logits).max()))
    err = float(np.abs(logits - got).max())
    print(f"\nQUANTIZED_IN compressed-tensors {fmt} int{bits} {'sym' if sym else 'asym'} {strategy}: "
          f"max|transformers - qforge| {err:.3g} (scale {scale:.3g}); greedy {gen == our_gen}")
    assert err <= 1e-4 * scale, err
    assert gen == our_gen


def test_gptq_dir_quantizes_and_trains_end_to_end(tmp_path, base):
    """model.from = a GPTQ dir: LoRA, QLoRA and a full fine-tune train (the loss falls),
    `qforge quantize GPTQ_DIR --method rtn --quant q4_0` writes a run that evaluates, and the dir exports
    to GGUF q4_0, AWQ and a bf16 HF dir."""
    d, ck, corpus = base
    g = _gptq(d, ck, "sym", True, False)
    steps = """trainer: {max_steps: 12, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1, optim: {lr: 0.01},
          schedule: {warmup_steps: 1}}"""
    for name, body in (("lora", "peft: {r: 4, alpha: 8, base: fp32}\n" + steps), ("full", steps),
                       ("qlora", "peft: {r: 4, alpha: 8, base: nf4}\n" + steps)):
        _qf("train", _recipe(tmp_path, name, g, corpus, body))
        losses = _losses(tmp_path / name)
        print(f"\nQUANTIZED_IN train {name} from the GPTQ dir: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3]), (name, losses)
    calib = _recipe(tmp_path, "calib", g, corpus, "")
    r = _qf("quantize", g, "--method", "rtn", "--quant", "q4_0", "--calib", calib, "--samples", "8",
            "--out", tmp_path / "q4_0")
    print("\n" + r.stdout.strip())
    assert "held-out perplexity" in r.stdout
    r = _qf("eval", tmp_path / "q4_0", "--max-batches", "2")
    assert json.loads(r.stdout.strip().splitlines()[-1])["ppl"] > 1
    # export to other formats straight from the GPTQ dir (dequantized, then RTN'd by the exporter)
    for fmt, extra in (("gguf", ["--quant", "q4_0"]), ("awq", ["--quant", "int4-g32-zp"]), ("hf", ["--dtype", "bf16"])):
        out = tmp_path / f"re_{fmt}"
        r = _qf("export", g, "--format", fmt, "--out", out, *extra)
        assert "re-read" in r.stdout or "decoded" in r.stdout or out.exists(), r.stdout
