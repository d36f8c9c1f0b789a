"""qforge's tokenizer.json reader (data/hf_tokenizer.cpp) against the `tokenizers` library itself:
tokenizers trains byte-level BPEs (GPT-2's ByteLevel regex; Llama-3's Split + ByteLevel with
ignore_merges; Qwen2's pattern) and SentencePiece-style BPEs (Llama-2's Prepend/Replace normalizer
with byte fallback; a Metaspace pre-tokenizer) on local text; qforge must produce identical ids on
strings with whitespace runs, digits, punctuation, emoji, CJK, combining marks and special tokens,
and decode them to what tokenizers decodes. Unsupported files are refused with a clear error."""
import json
import os
import subprocess

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # peer

from st_io import interop_tool
from tiny_runs import ROOT

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
STRINGS = [
    "Hello world",
    "  leading and  double  spaces\t\ttabs\nnew\n\nlines  ",
    "1234567 3.14159 2024-11-22 0x1F",
    "punctuation!?... (x) [y] {z} 'quoted' \"dq\" it's we'll I'M",
    "emoji 😀🎉 mixed👍🏽text",
    "中文字符测试 日本語のテキスト 한국어",
    "combining: e\u0301 n\u0303 a\u0308 \u00e9",
    "SPECIAL_Aspecial textSPECIAL_B tokens SPECIAL_A",
    "In the beginning God created the heaven and the earth.",
    "def f(x):\n    return x**2  # comment\r\n",
    "",
    " ",
]


def _corpus():
    lines = []
    with open(os.path.join(ROOT, "data/corpora/kjv.txt"), encoding="utf-8") as f:
        for i, l in enumerate(f):
            if i >= 3000:
                break
            lines.append(l)
    d = os.path.join(ROOT, "data/corpora/python-docs/tutorial")
    for name in sorted(os.listdir(d))[:6]:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            lines += f.readlines()
    lines += STRINGS * 3
    return lines


def _build(kind, specials):
    if kind in ("gpt2", "llama3", "qwen2"):
        tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
        if kind == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            pat = LLAMA3 if kind == "llama3" else QWEN2
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        if kind == "llama2":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"] + specials + bytes_,
                                      show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _run(path, strings, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps(strings))
    r = subprocess.run([interop_tool("interop_tok"), str(path), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    return r, (json.loads((tmp_path / "out.json").read_text()) if r.returncode == 0 else None)


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2", "llama2", "metaspace"])
def test_ids_and_decoding_match_tokenizers(tmp_path, kind):
    tok = _build(kind, ["SPECIAL_A", "SPECIAL_B"])
    d = tmp_path / kind
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    bos, eos = ("<s>", "</s>") if kind in ("llama2", "metaspace") else ("SPECIAL_A", "SPECIAL_B")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": {"content": eos}}))
    r, got = _run(d, STRINGS, tmp_path)
    assert r.returncode == 0, r.stderr
    assert got["bos"] == tok.token_to_id(bos) and got["eos"] == tok.token_to_id(eos)
    for s, ids, dec in zip(STRINGS, got["ids"], got["decoded"]):
        want = tok.encode(s, add_special_tokens=False).ids
        assert ids == want, f"{kind}: {s!r}\n qforge {ids}\n tokenizers {want}"
        assert dec == tok.decode(want, skip_special_tokens=False), f"{kind}: decode of {s!r}"
        if kind in ("gpt2", "llama3", "qwen2"):
            assert dec == s  # byte-level BPE round-trips any text


def test_unsupported_tokenizers_are_refused(tmp_path):
    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "wp.json"))
    r, _ = _run(tmp_path / "wp.json", ["a"], tmp_path)
    assert r.returncode == 1 and "model type 'WordPiece' is not supported" in r.stderr, r.stderr
    t2 = _build("gpt2", [])
    t2.normalizer = normalizers.NFKC()
    t2.save(str(tmp_path / "nfkc.json"))
    r, _ = _run(tmp_path / "nfkc.json", ["a"], tmp_path)
    assert r.returncode == 1 and "normalizer 'NFKC' is not supported" in r.stderr, r.stderr
    (tmp_path / "broken.json").write_text("{\"model\": ")
    r, _ = _run(tmp_path / "broken.json", ["a"], tmp_path)
    assert r.returncode == 1 and "not valid JSON" in r.stderr, r.stderr


def test_merge_order_follows_tokenizers_heap(tmp_path):
    # "abab" with merges [a b] (rank 0) and [ab a] (rank 1 < nothing else): tokenizers pops the
    # lowest (rank, position) merge one at a time, so after the first "a b" the new pair "ab a" can
    # win over the second "a b" only if its rank is lower; both orders are checked, plus a chain
    # whose later merges outrank the ones that made their parts.
    cases = [
        ({"a": 0, "b": 1, "ab": 2, "aba": 3}, [("a", "b"), ("ab", "a")], ["abab", "ababab", "aab", "ba"]),
        ({"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}, [("ab", "c"), ("b", "c"), ("a", "b")],
         ["abc", "abcabc", "ababc", "cabcb"]),
        ({"a": 0, "aa": 1, "aaaa": 2, "aaa": 3}, [("a", "a"), ("aa", "aa"), ("aa", "a")],
         ["a" * k for k in range(1, 12)]),
    ]
    for i, (vocab, merges, strings) in enumerate(cases):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        p = tmp_path / f"t{i}.json"
        tok.save(str(p))
        r, got = _run(p, strings, tmp_path)
        assert r.returncode == 0, r.stderr
        for s, ids in zip(strings, got["ids"]):
            assert ids == tok.encode(s).ids, f"case {i}: {s!r} qforge {ids} tokenizers {tok.encode(s).ids}"


def test_long_lines_without_pre_tokenizer_match_and_are_fast(tmp_path):
    # Llama-2-style tokenizers have no pre-tokenizer: a whole line is one BPE piece. 40 KB lines
    # must match tokenizers and take well under a second each (merging is O(n log n)).
    tok = _build("llama2", [])
    tok.save(str(tmp_path / "l2.json"))
    with open(os.path.join(ROOT, "data/corpora/kjv.txt"), encoding="utf-8") as f:
        text = f.read(200_000)
    strings = [text[i:i + 40_000].replace("\n", " ") for i in range(0, 160_000, 40_000)]
    import time
    t0 = time.time()
    r, got = _run(tmp_path / "l2.json", strings, tmp_path)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr
    for s, ids in zip(strings, got["ids"]):
        assert ids == tok.encode(s, add_special_tokens=False).ids
    assert took < 20, f"4 lines of 40 KB took {took:.1f} s"


def test_geometric_replace_chains_are_refused(tmp_path):
    tok = _build("llama2", [])
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "  ")] * 16)
    tok.save(str(tmp_path / "grow.json"))
    r, _ = _run(tmp_path / "grow.json", ["a b c d e f"], tmp_path)
    assert r.returncode == 1 and "normalizer's Replace/Prepend steps grow" in r.stderr, r.stderr
