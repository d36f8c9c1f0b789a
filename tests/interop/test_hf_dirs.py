"""Hugging Face checkpoint dirs wherever qforge takes a model (issue 15), against transformers and
peft themselves. transformers writes a tiny random Llama and `tokenizers` a byte-level BPE next to
it; then:
- `qforge eval` and `qforge generate` take the dir (greedy text == transformers' greedy text,
  decoded with skip_special_tokens); eval without data says what to give;
- `model.from: DIR` with no tokenizer section trains on the dir's tokenizer.json, with the default
  warmup on a 2-step run;
- the QLoRA adapter of such a run loads with peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
  alone (base_model_name_or_path is the dir) without PEFT's "upgrade" warning;
- generate past the context warns, never prints EOS's text, and writes valid UTF-8 to stdout
  however a random model splits multi-byte characters over byte tokens."""
import json
import logging
import os
import subprocess
import warnings

import pytest
import torch
import transformers

from tiny_runs import QFORGE, kjv_corpus

CTX = 48


def _tokenizer(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = tmp_path / "mixed.txt"
    text.write_text(corpus.read_text(encoding="utf-8") + "\n" + "中文字符 ☃ émoji 😀 日本語\n" * 50, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # EOS first (id 0): a model whose logits are all equal picks it greedily.
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>", "<|bos|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hfdirs")
    corpus = kjv_corpus(tmp_path / "corpus.txt", 1500)
    tok = _tokenizer(tmp_path, corpus)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CTX, bos_token_id=1, eos_token_id=0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path / "llama"
    m.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tmp_path, d, corpus


def _q(*args, env=None):
    return subprocess.run([QFORGE, *map(str, args)], capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2", QFORGE_PROGRESS="0", **(env or {})))


def test_eval_and_generate_take_a_hf_dir(hf_dir):
    tmp_path, d, corpus = hf_dir
    r = _q("eval", d)
    assert r.returncode == 1 and b"--text FILE|DIR" in r.stderr and b"--data-from" in r.stderr, r.stderr
    assert b"is not a run directory" not in r.stderr
    r = _q("eval", d, "--text", corpus, "--max-batches", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert res["tokens"] > 0 and 0 < res["ppl"] < 1e6

    prompt = "And God said"
    r = _q("-q", "generate", d, "--prompt", prompt, "-n", 12, "-t", 0)
    assert r.returncode == 0, r.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() != hf_tok.bos_token_id  # this tokenizer adds no BOS; neither may qforge
    m = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.eos_token_id)
    want = hf_tok.decode(out[0], skip_special_tokens=True)
    assert r.stdout.decode("utf-8") == want + "\n"


def test_model_from_without_tokenizer_section_and_peft_loads_the_adapter(hf_dir, caplog):
    tmp_path, d, corpus = hf_dir
    cfg = tmp_path / "from.yaml"
    cfg.write_text(f"""
run: {{name: hf_lora, out_dir: {tmp_path}/lora, threads: 2}}
model: {{from: {d}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, cache_dir: {tmp_path}/cache}}
peft: {{r: 4}}
trainer: {{max_steps: 2, batch_size: 4, eval_batches: 1}}
""")  # no tokenizer section, no warmup: both defaults must work
    r = _q("train", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tokenizer: {d}/tokenizer.json (huggingface".encode() in r.stderr, r.stderr[-3000:]
    adapter = tmp_path / "lora" / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(d)
    assert "qforge" not in acfg
    assert json.loads((adapter / "qforge_adapter.json").read_text())["base"] == "fp32"

    import peft
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    said = [str(x.message) for x in w] + [rec.getMessage() for rec in caplog.records]
    assert not [s for s in said if "upgrade" in s.lower() or "unexpected keyword" in s.lower()], said
    assert sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default")) == 2 * 7


def test_generate_edges_context_eos_and_utf8(hf_dir, tmp_path):
    _, d, _ = hf_dir
    # Past the context: a warning naming it, then a normal exit.
    r = _q("generate", d, "--prompt", "And God", "-n", 400, "-t", 1.0, "--ignore-eos", "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert f"fill the model's context of {CTX} positions (max_position_embeddings".encode() in r.stderr, r.stderr
    # Random sampling over byte tokens splits and garbles multi-byte characters: stdout must still
    # be valid UTF-8, and never hold the EOS token's text.
    for seed in range(6):
        r = _q("-q", "generate", d, "--prompt", "中文 😀", "-n", 30, "-t", 5.0, "--top-k", 0, "--top-p", 1.0,
               "--seed", seed, "--ignore-eos")
        assert r.returncode == 0, r.stderr
        r.stdout.decode("utf-8")  # strict: raises on any invalid byte
        assert b"<|eos|>" not in r.stdout and b"<|bos|>" not in r.stdout
    # A model whose logits are all equal picks id 0 = EOS at once: generation stops there, silently.
    flat = tmp_path / "flat"
    m = transformers.AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.model.norm.weight.zero_()
    m.save_pretrained(flat, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (flat / f).write_bytes((d / f).read_bytes())
    r = _q("-q", "generate", flat, "--prompt", "And God", "-n", 10, "-t", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"And God\n", r.stdout


def test_vocab_advice_under_model_from(hf_dir):
    """A tokenizer with more tokens than the checkpoint's embedding rows is the wrong tokenizer; the
    advice must not be "use model.vocab_size 0" (model.from fixes the size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tmp_path, d, corpus = hf_dir
    big = Tokenizer(models.BPE())
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.train([str(corpus)], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    big.save(str(tmp_path / "big.json"))
    cfg = tmp_path / "wrong_tok.yaml"
    cfg.write_text(f"""
run: {{name: wrong, out_dir: {tmp_path}/wrong, threads: 2}}
model: {{from: {d}}}
tokenizer: {{type: huggingface, path: {tmp_path}/big.json}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, cache_dir: {tmp_path}/cache}}
trainer: {{max_steps: 2, batch_size: 4}}
""")
    r = _q("train", cfg)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.decode()
    assert "has 400 tokens but the model.from checkpoint" in err and "320 embedding rows" in err, err
    assert "drop the tokenizer section" in err and "use 0 to take it" not in err, err
