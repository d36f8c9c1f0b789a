"""`qforge export --format gguf` per family, run by llama.cpp itself (llama-cpp-python): a tiny
random transformers checkpoint with a byte-level BPE tokenizer.json beside it is exported to the
family's own llama.cpp architecture (qwen2, qwen3, ...); llama.cpp loads the file, its logits on
fixed ids match transformers' on the same checkpoint within the format's tolerance, and its
tokenization of tricky strings equals the tokenizers library's. What llama.cpp cannot represent
(a sliding window its architecture ignores, OPT) is refused with the reason and no file."""
import json
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest
import torch
import transformers

from test_hf_models import _save
from tiny_runs import QFORGE, kjv_corpus

# max |llama.cpp - transformers| over the logit scale. F32: summation order only. F16 / Q8_0
# weights (and llama.cpp's Q8_0 activations inside quantized matmuls): rounding of the weights.
TOLS = {"f32": 1e-4, "f16": 5e-3, "q8_0": 3e-2}
# GELU families (Gemma, GPT-2): ggml's CPU GELU goes through a table over fp16 inputs (GGML_GELU_FP16),
# which we take to be why their F32 files agree
# to about 1e-3 only (measured 3.1e-4 gemma2, 4.8e-4 gemma3, 2.0e-4 gpt2).
GELU_F32_TOL = 1e-3
STRINGS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "digits 1234567 and 3.14159",
           "it's what they'll do; I'd've", "UPPER lower MiXeD", "<|bos|> literal special", "héllo wörld ünïcode 日本語"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return kjv_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", 1500)


COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
# Gemma shapes llama.cpp represents: query_pre_attn_scalar = head_dim, gemma2's windows on even
# layers, gemma3's on five of each six with local RoPE base 10000 (test_hf_models' gemma kinds
# set other values: refused below).
GGUF_KINDS = {
    "gemma2_cpp": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=32, sliding_window=6, query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    "gemma3_cpp": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=5, sliding_window_pattern=6,
        query_pre_attn_scalar=16, rope_theta=100000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # (not named "phi3...": llama.cpp looks up Phi-3's "<|end|>" token when general.name says phi3)
    "gemma3_cap": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=5, sliding_window_pattern=6,
        query_pre_attn_scalar=16, rope_local_base_freq=10000.0, final_logit_softcapping=0.5)),
    "phimini_nowin": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, sliding_window=None,
                                                                            pad_token_id=0)),
}


def _save_kind(tmp_path, kind):
    if kind not in GGUF_KINDS:
        return _save(tmp_path, kind)
    torch.manual_seed(0)
    m = GGUF_KINDS[kind]().eval()
    with torch.no_grad():  # larger-than-init weights so differences would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / kind
    m.save_pretrained(d, safe_serialization=True)
    return d


def _checkpoint(tmp_path, kind, corpus, pre=None):
    """The family's tiny checkpoint with a byte-level BPE tokenizer.json; pre: a Split regex put
    before ByteLevel (Llama 3's / Qwen2's pre-tokenizer) instead of ByteLevel's own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    d = _save_kind(tmp_path, kind)
    tok = Tokenizer(models.BPE())
    if pre is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # 310 tokens: the 256 byte symbols, 2 specials and ~50 merges (the model has 320 rows)
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=310, special_tokens=["<|bos|>", "<|eos|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    return d, tok


def _export(d, out, quant, check=True):
    r = subprocess.run([QFORGE, "-q", "export", str(d), "--format", "gguf", "--quant", quant, "--out", str(out)],
                       capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _llama(path):
    import llama_cpp  # built from its sdist by scripts/setup.sh; a missing peer fails here, loudly
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _transformers_logits(d, ids, n_ctx):
    cfg = transformers.AutoConfig.from_pretrained(d)
    rs = getattr(cfg, "rope_scaling", None) or {}
    if rs.get("type", rs.get("rope_type")) == "longrope" and n_ctx > cfg.original_max_position_embeddings:
        # llama.cpp picks LongRoPE's factor set by its context size (rounded up to 256 here), not by
        # the sequence's length as transformers does: compare with transformers on the long factors
        rs["short_factor"] = rs["long_factor"]
    m = transformers.AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def _check_family(tmp_path, kind, corpus, quant, want_arch, pre=None, want_pre="gpt-2", gelu=False):
    d, tok = _checkpoint(tmp_path, kind, corpus, pre)
    out = tmp_path / f"{kind}.{quant}.gguf"
    _export(d, out, quant)
    g = gguf.GGUFReader(str(out))
    assert g.fields["general.architecture"].contents() == want_arch
    assert g.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert g.fields["tokenizer.ggml.pre"].contents() == want_pre
    assert len(g.fields["tokenizer.ggml.merges"].contents()) > 40
    llm = _llama(out)
    for s in STRINGS:  # splits, merges and added specials as in the tokenizers library
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s).ids, s
    ids = [(i * 37 + 5) % 310 for i in range(20)]  # longer than the test windows
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    want = _transformers_logits(d, ids, llm.n_ctx())
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    print(f"\nGGUF {kind} {quant}: max|diff| {err:.3g} scale {scale:.3g} rel {err / scale:.3g}")
    tol = GELU_F32_TOL if gelu and quant == "f32" else TOLS[quant]
    assert err <= tol * scale, f"{kind} {quant}: max |llama.cpp - transformers| = {err} (scale {scale})"
    return g


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_qwen2_gguf_runs_in_llama_cpp(tmp_path, corpus, quant):
    g = _check_family(tmp_path, "qwen2", corpus, quant, "qwen2", QWEN2_SPLIT, "qwen2")
    names = {t.name for t in g.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "output.weight" not in names  # tied


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_qwen3_gguf_runs_in_llama_cpp(tmp_path, corpus, quant):
    g = _check_family(tmp_path, "qwen3", corpus, quant, "qwen3")
    assert g.fields["qwen3.attention.key_length"].contents() == 32  # head_dim 32 * 4 heads != 64
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= {t.name for t in g.tensors}


@pytest.mark.parametrize("kind,arch,quant", [("gemma2_cpp", "gemma2", "f32"), ("gemma2_cpp", "gemma2", "q8_0"),
                                             ("gemma3_cpp", "gemma3", "f32"), ("gemma3_cpp", "gemma3", "f16"),
                                             ("gemma3_cap", "gemma3", "f32")])
def test_gemma_gguf_runs_in_llama_cpp(tmp_path, corpus, kind, arch, quant):
    g = _check_family(tmp_path, kind, corpus, quant, arch, gelu=True)
    assert g.fields[f"{arch}.attention.sliding_window"].contents() == (6 if arch == "gemma2" else 5)
    if arch == "gemma2":  # head_dim 32 * 4 heads != 64
        assert g.fields["gemma2.attention.key_length"].contents() == 32
        assert g.fields["gemma2.attn_logit_softcapping"].contents() == 2.0
    elif kind == "gemma3_cpp":
        assert g.fields["gemma3.rope.scaling.factor"].contents() == 4.0


@pytest.mark.parametrize("kind,quant", [("phimini_nowin", "f32"), ("phimini_nowin", "q8_0"), ("phi4_longrope", "f32"),
                                        ("phi4_longrope", "f16"), ("phi4_longrope_long", "f32")])
def test_phi3_gguf_runs_in_llama_cpp(tmp_path, corpus, kind, quant):
    g = _check_family(tmp_path, kind, corpus, quant, "phi3")
    names = {t.name for t in g.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    if kind.startswith("phi4_longrope"):  # partial rotary 0.75 of head_dim 16, LongRoPE factors as tensors
        assert g.fields["phi3.rope.dimension_count"].contents() == 12
        assert g.fields["phi3.rope.scaling.original_context_length"].contents() == (16 if kind.endswith("_long") else 64)
        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gpt2_gguf_runs_in_llama_cpp(tmp_path, corpus, quant):
    g = _check_family(tmp_path, "gpt2", corpus, quant, "gpt2", gelu=True)
    names = {t.name for t in g.tensors}
    assert {"position_embd.weight", "blk.0.attn_qkv.bias", "blk.0.ffn_down.bias", "output_norm.bias"} <= names
    assert "gpt2.attention.layer_norm_epsilon" in g.fields and "output.weight" not in names


@pytest.mark.parametrize("kind,quant", [("llama", "f32"), ("llama3_tied", "f32"), ("llama3_tied", "q8_0")])
def test_llama3_gguf_runs_in_llama_cpp(tmp_path, corpus, kind, quant):
    """Llama 3's pre-tokenizer (llama-bpe) and its rope scaling (llama3_tied: as a rope_freqs tensor)."""
    g = _check_family(tmp_path, kind, corpus, quant, "llama", LLAMA3_SPLIT, "llama-bpe")
    assert ("rope_freqs.weight" in {t.name for t in g.tensors}) == (kind == "llama3_tied")


@pytest.mark.parametrize("kind,why", [
    ("qwen2_sw", "llama.cpp's qwen2 architecture ignores sliding windows"),
    ("mistral_sw", "llama.cpp's llama architecture ignores sliding windows"),
    ("qwen3_sw", "llama.cpp's qwen3 architecture ignores sliding windows"),
    ("opt", "llama.cpp has no OPT architecture"),
    ("phi3", "llama.cpp's phi3 architecture ignores sliding windows"),
    ("gemma2", "query_pre_attn_scalar 24 is not what llama.cpp's gemma2 uses"),
    ("gemma3", "query_pre_attn_scalar 256 is not what llama.cpp's gemma3 uses")])
def test_gguf_export_refuses_what_llama_cpp_cannot_represent(tmp_path, corpus, kind, why):
    d, _ = _checkpoint(tmp_path, kind, corpus)
    out = tmp_path / "x.gguf"
    r = _export(d, out, "f16", check=False)
    assert r.returncode == 1 and why in r.stderr, r.stderr
    assert not out.exists()


def test_gguf_export_refuses_a_pre_tokenizer_llama_cpp_lacks(tmp_path, corpus):
    d, _ = _checkpoint(tmp_path, "qwen2", corpus, r"\p{N}+|[^\p{N}]+")
    r = _export(d, tmp_path / "x.gguf", "f16", check=False)
    assert r.returncode == 1 and "tokenizer.json" in r.stderr and "pre-tokenizer" in r.stderr, r.stderr


@pytest.mark.parametrize("kind,arch,layers", [  # (ffn widths of 176 fit no q4_0 block: attention only there)
    ("qwen3", "qwen3", "model.layers.*.self_attn.*"), ("gemma2_cpp", "gemma2", "model.layers.*.self_attn.*"),
    ("phimini_nowin", "phi3", "model.layers.*.self_attn.*"), ("gpt2", "gpt2", "transformer.h.*")])
def test_qat_q4_0_blocks_run_in_llama_cpp(tmp_path, corpus, kind, arch, layers):
    """A QAT run against llama.cpp's q4_0 (converted at the end) keeps its trained blocks in the GGUF;
    llama.cpp's logits match transformers' on the run's dequantized HF export within 2e-2 of the logit
    scale (llama.cpp also quantizes the activations to Q8_0 inside its q4_0 matmuls; measured 9.3e-3
    qwen3, 3.2e-3 gemma2, 6e-4 phi3, 5e-4 gpt2)."""
    d, _ = _checkpoint(tmp_path, kind, corpus)
    cfg = tmp_path / "qat.yaml"
    cfg.write_text(f"""
run: {{name: qat, out_dir: {tmp_path}/qat, threads: 2, seed: 1}}
model: {{from: {d}}}
tokenizer: {{type: huggingface, path: {d}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 24, val_fraction: 0.05, cache_dir: {tmp_path}/cache}}
quant: {{rules: [{{pattern: "{layers}", weight: {{preset: q4_0}}}}], fake_quant_after_steps: 0}}
trainer: {{max_steps: 4, batch_size: 4, eval_every: 0, eval_batches: 1, log_every: 1, optim: {{lr: 0.01}},
          schedule: {{warmup_steps: 1}}}}
""")
    subprocess.run([QFORGE, "-q", "train", str(cfg)], check=True, capture_output=True)
    run = tmp_path / "qat" / "converted"
    out = tmp_path / "m.gguf"
    _export(run, out, "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_output.weight"] == "Q4_0", types
    hf = tmp_path / "hf"
    subprocess.run([QFORGE, "-q", "export", str(run), "--format", "hf", "--dtype", "fp32", "--out", str(hf)],
                   check=True, capture_output=True)
    llm = _llama(out)
    ids = [(i * 37 + 5) % 310 for i in range(20)]
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    want = _transformers_logits(hf, ids, llm.n_ctx())
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    print(f"\nGGUF {kind} QAT q4_0: max|diff| {err:.3g} scale {scale:.3g} rel {err / scale:.3g}")
    assert err <= 2e-2 * scale, f"{kind} QAT q4_0: max |llama.cpp - transformers| = {err} (scale {scale})"
