"""Hugging Face checkpoints into qforge (models/hf.cpp), checked against transformers itself: for
each supported architecture, transformers builds a tiny random model and saves it (single file or
sharded, fp32 or bf16, tied or untied, llama3 rope scaling); qforge loads the directory, and its
fp32 logits on fixed ids match transformers' within 1e-4 and greedy generation gives the same
tokens. Bad checkpoints (missing shard, shape mismatch, unsupported architecture, truncated file)
are refused with one clear error."""
import json
import os
import subprocess

import pytest
import torch
import transformers  # a missing peer fails here, loudly

from st_io import interop_tool, read_safetensors, write_safetensors

TOL = 1e-4
N_NEW = 12


def _tiny(kind, ffn=176):
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=10000.0))
    if kind == "llama3_tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
    if kind == "qwen3_sw":  # layer 1 windowed (layers from max_window_layers on), window shorter than the ids
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    if kind == "qwen2_sw":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=5, max_window_layers=0))
    if kind == "mistral_sw":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=6))
    if kind == "gemma2":  # alternating windows (6 < the ids), both soft-caps, query_pre_attn_scalar != head_dim
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=32, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=0.2,
            final_logit_softcapping=3.0))
    if kind == "gemma3":  # local layers with their own RoPE base, global layer with linear rope scaling
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=5, sliding_window_pattern=2, rope_theta=100000.0,
            rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    if kind == "phi3":  # fused projections, window 6
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, sliding_window=6, pad_token_id=0))
    if kind.startswith("phi4_longrope"):  # partial rotary 0.75, longrope; the _long ids exceed the original 16 positions
        rd = 12  # 16 * 0.75
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **{**common, "max_position_embeddings": 128}, partial_rotary_factor=0.75, tie_word_embeddings=True,
            original_max_position_embeddings=16 if kind.endswith("_long") else 64, pad_token_id=0,
            rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(rd // 2)],
                          "long_factor": [2.0 + 0.5 * i for i in range(rd // 2)]}))
    if kind == "opt":  # the facebook/opt-125m layout (pre-LN)
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=320, hidden_size=64, ffn_dim=ffn, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64))
    if kind == "opt_350m":  # opt-350m's layout: post-LN, 32-wide embeddings projected in and out
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=320, hidden_size=64, ffn_dim=176, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False))
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4,
                                                                    n_positions=128))
    raise ValueError(kind)


def _save(tmp_path, kind, dtype=torch.float32, shard=None, ffn=176):
    torch.manual_seed(0)
    m = _tiny(kind, ffn).eval()
    with torch.no_grad():  # larger-than-init weights so differences would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / kind
    m.to(dtype).save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return d


def _reference(d, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = m(ids).logits
        gen = m.generate(ids[:1], max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=N_NEW)[0, ids.shape[1]:]
    return logits, gen


def _run(tmp_path, d, ids):
    write_safetensors(tmp_path / "ids.safetensors", {"ids": ids})
    out = tmp_path / "out.safetensors"
    r = subprocess.run([interop_tool("interop_hf"), str(d), str(tmp_path / "ids.safetensors"), str(out), str(N_NEW)],
                       capture_output=True, text=True)
    return r, (read_safetensors(out) if r.returncode == 0 else None)


@pytest.mark.parametrize("kind,dtype,shard", [
    ("llama", torch.float32, None), ("llama", torch.bfloat16, "60KB"), ("llama3_tied", torch.float32, None),
    ("qwen2", torch.float16, None), ("mistral", torch.float32, "60KB"), ("gpt2", torch.float32, None),
    ("qwen3", torch.bfloat16, None), ("qwen3_sw", torch.float32, None), ("qwen2_sw", torch.float32, None),
    ("mistral_sw", torch.float32, None), ("gemma2", torch.float32, None), ("gemma2", torch.bfloat16, None),
    ("gemma3", torch.float32, "60KB"), ("phi3", torch.float32, None), ("phi4_longrope", torch.float32, None),
    ("phi4_longrope_long", torch.bfloat16, None), ("opt", torch.float16, None), ("opt_350m", torch.float32, None)])
def test_hf_checkpoint_logits_and_greedy_tokens_match_transformers(tmp_path, kind, dtype, shard):
    d = _save(tmp_path, kind, dtype, shard)
    if shard:
        assert (d / "model.safetensors.index.json").exists()
    ids = (torch.arange(2 * 14).reshape(2, 14) * 37 + 5) % 160
    want_logits, want_gen = _reference(d, ids)
    r, got = _run(tmp_path, d, ids)
    assert r.returncode == 0, r.stderr
    err = (got["logits"] - want_logits).abs().max().item()
    assert err <= TOL * max(1.0, want_logits.abs().max().item()), f"{kind}: max |diff| {err}"
    assert got["generated"].tolist() == want_gen.tolist()


def test_bad_checkpoints_are_refused(tmp_path):
    ids = torch.zeros(1, 4, dtype=torch.long)
    d = _save(tmp_path, "llama", shard="60KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.rename(d / shard, tmp_path / "moved")
    r, _ = _run(tmp_path, d, ids)
    assert r.returncode == 1 and f"shard '{shard}' is listed but missing" in r.stderr, r.stderr
    os.rename(tmp_path / "moved", d / shard)

    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 200}))
    r, _ = _run(tmp_path, d, ids)
    assert r.returncode == 1 and "mlp.gate_proj.weight' has shape [176, 64] but config.json implies [200, 64]" in r.stderr, r.stderr
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    r, _ = _run(tmp_path, d, ids)
    assert r.returncode == 1 and "architecture 'FalconForCausalLM' is not supported" in r.stderr, r.stderr
    (d / "config.json").write_text(json.dumps(cfg))

    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 7])
    r, _ = _run(tmp_path, d, ids)
    assert r.returncode == 1 and "truncated" in r.stderr, r.stderr


def test_qlora_run_from_a_transformers_checkpoint_and_tokenizer(tmp_path):
    """The CLI end to end on real inputs: `model.from` a transformers checkpoint, `tokenizer.type:
    huggingface` on a tokenizer.json trained by `tokenizers`, QLoRA for a few steps, adapter written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tiny_runs import QFORGE, kjv_corpus
    corpus = kjv_corpus(tmp_path / "corpus.txt", 2000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    d = _save(tmp_path, "llama")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
run: {{name: hfq, out_dir: {tmp_path}/run, threads: 2}}
model: {{from: {d}}}
tokenizer: {{type: huggingface, path: {d}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, cache_dir: {tmp_path}/cache}}
peft: {{r: 4, base: nf4}}
trainer: {{max_steps: 4, batch_size: 4, eval_batches: 1, schedule: {{warmup_steps: 1}}}}
""")
    r = subprocess.run([QFORGE, "train", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").exists()
    r = subprocess.run([QFORGE, "-q", "eval", str(tmp_path / "run"), "--max-batches", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and '"format": "fp+lora"' in r.stdout, r.stderr
