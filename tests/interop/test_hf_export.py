"""`qforge export --format hf` against transformers: a run trained by qforge (and a QLoRA run on top
of it, whose NF4 base + adapters are merged and dequantized on export) is written as a Hugging
Face checkpoint; transformers.AutoModelForCausalLM loads it unchanged and its fp32 logits equal
qforge's on the same directory (models/hf, 1e-4) and greedy generation agrees; bf16 and sharded
output, the tokenizer files (AutoTokenizer loads them) and the refusal to overwrite are checked."""
import json
import subprocess

import pytest
import torch
import transformers  # a missing peer fails here, loudly

from st_io import interop_tool, read_safetensors, write_safetensors
from tiny_runs import QFORGE, tiny_recipe, train



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    cfg = tiny_recipe(d, "base", tie=True, max_steps=12)
    train(cfg)
    train(cfg, f"run.out_dir={d}/qlora", f"run.init_from={d}/base", "peft.r=4", "peft.base=nf4", "trainer.max_steps=6")
    train(cfg, f"run.out_dir={d}/gpt2", "model.family=gpt2", "model.n_kv_heads=0", "model.ffn_dim=0")
    train(cfg, f"run.out_dir={d}/qwen2", "model.qkv_bias=true")
    # Families and sliding windows (window 8 < the 32-token training sequences and the test's 16 + 8 tokens).
    train(cfg, f"run.out_dir={d}/qwen3", "model.family=qwen3", "model.head_dim=32")
    train(cfg, f"run.out_dir={d}/mistral_sw", "model.sliding_window=8")
    train(cfg, f"run.out_dir={d}/qwen2_sw", "model.qkv_bias=true", "model.sliding_window=8", "model.sliding_layers=[1]")
    return d


def _export(run, out, *extra):
    return subprocess.run([QFORGE, "-q", "export", str(run), "--format", "hf", "--out", str(out), *extra],
                          capture_output=True, text=True)


def _qforge_logits(tmp_path, d, ids):
    write_safetensors(tmp_path / "ids.safetensors", {"ids": ids})
    subprocess.run([interop_tool("interop_hf"), str(d), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors"),
                    "8"], check=True)
    return read_safetensors(tmp_path / "o.safetensors")


@pytest.mark.parametrize("run,arch", [("base", "LlamaForCausalLM"), ("qlora", "LlamaForCausalLM"),
                                      ("gpt2", "GPT2LMHeadModel"), ("qwen2", "Qwen2ForCausalLM"),
                                      ("qwen3", "Qwen3ForCausalLM"), ("mistral_sw", "MistralForCausalLM"),
                                      ("qwen2_sw", "Qwen2ForCausalLM")])
def test_exported_checkpoint_loads_in_transformers_with_qforge_logits(tmp_path, runs, run, arch):
    out = tmp_path / "hf"
    r = _export(runs / run, out, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "re-read and verified" in r.stdout
    m = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(m).__name__ == arch
    ids = (torch.arange(2 * 16).reshape(2, 16) * 31 + 7) % 400
    ours = _qforge_logits(tmp_path, out, ids)
    with torch.no_grad():
        theirs = m(ids).logits
        gen = m.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=8)[0, 16:]
    assert (ours["logits"] - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())
    assert ours["generated"].tolist() == gen.tolist()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == cfg["bos_token"] == "<s>"
    assert tok.decode(tok("In the beginning", add_special_tokens=False).input_ids) == "In the beginning"


def test_bf16_sharded_export_and_overwrite_refusal(tmp_path, runs):
    out = tmp_path / "hf16"
    r = _export(runs / "base", out, "--dtype", "bf16", "--shard-size-mb", "0.02")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert m.dtype == torch.bfloat16 and m.config.torch_dtype == torch.bfloat16
    r = _export(runs / "base", out)
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    assert not any(p.name.startswith("hf16.tmp") for p in tmp_path.iterdir())


def test_peft_format_export_loads_in_peft(tmp_path, runs):
    """`export --format peft`: a QLoRA run's adapters alone, as PEFT loads them onto the base model;
    the result matches the merged export's logits. A run without adapters is refused."""
    import peft  # a missing peer fails here, loudly
    base, merged = tmp_path / "base", tmp_path / "merged"
    assert _export(runs / "base", base, "--dtype", "fp32").returncode == 0
    assert _export(runs / "qlora", merged, "--dtype", "fp32").returncode == 0
    r = subprocess.run([QFORGE, "-q", "export", str(runs / "qlora"), "--format", "peft", "--out", str(tmp_path / "ad")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ad/adapter_model.safetensors").exists() and (tmp_path / "ad/adapter_config.json").exists()
    ids = (torch.arange(16).reshape(1, 16) * 17 + 3) % 400
    with torch.no_grad():
        # the adapters act on the NF4-dequantized base: compare against the merged export, which
        # holds dequant(NF4) + BA, rather than the fp32 pre-training base
        want = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        m = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad").eval()
        got = m(ids).logits
    # the base here is the fp32 pre-training model, not its NF4 rounding, so only closeness is expected
    assert (got - want).abs().max().item() <= 0.05 * max(1.0, want.abs().max().item())
    r = subprocess.run([QFORGE, "-q", "export", str(runs / "base"), "--format", "peft", "--out", str(tmp_path / "no")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "needs a LoRA/QLoRA run" in r.stderr, r.stderr
