#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz/fuzz_tokenizer_json.cpp into tests/fuzz/seeds_tokenizer/
(committed): small tokenizer.json files trained by the `tokenizers` library (byte-level BPE with
GPT-2's regex, Llama-3-style Split + ByteLevel with ignore_merges, Llama-2-style Prepend/Replace with
byte fallback, Metaspace), each followed by a NUL byte and a text to encode (some of it not UTF-8),
plus a few hand-made edge cases (id 2^31, merge of unknown tokens, nested Sequences).
Run with the project's venv: .venv/bin/python tests/fuzz/make_seeds_tokenizer.py"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds_tokenizer")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
TEXT = ["In the beginning God created the heaven and the earth.", "def f(x):\n    return x**2  # 3.14\n",
        "emoji 😀 中文 e\u0301 SPECIAL_A tokens  spaces\t\ttabs"] * 4


def train(kind):
    if kind in ("gpt2", "llama3"):
        tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
        if kind == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["SPECIAL_A"],
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
        bytes_ = [f"<0x{b:02X}>" for b in (0x0A, 0x61, 0x81, 0x96, 0xC3, 0xE2, 0xFF)]  # a few: seeds stay small
        trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                      show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    t = json.loads(tok.to_str())
    t["added_tokens"] = [{k: a[k] for k in ("id", "content", "special")} for a in t["added_tokens"]]
    return t


def write(name, tok_json, text):
    raw = json.dumps(tok_json, ensure_ascii=False, separators=(",", ":")).encode()
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(raw + b"\0" + text)


def main():
    os.makedirs(OUT, exist_ok=True)
    texts = [b"Hello world  2024", "emoji 😀 中文 e\u0301".encode(), b"abc \xff def", b"\xe2\x96", b""]
    for kind in ("gpt2", "llama3", "llama2", "metaspace"):
        t = train(kind)
        for i, text in enumerate(texts[:3]):
            write(f"{kind}_{i}", t, text)
    tiny = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}
    write("tiny", tiny, b"abab")
    write("tiny_bad_utf8", tiny, b"ab\xc3(")
    big = json.loads(json.dumps(tiny))
    big["model"]["vocab"]["c"] = 2 ** 31
    write("id_2_31", big, b"abc")
    alias = json.loads(json.dumps(tiny))
    alias["model"]["vocab"]["c"] = 2 ** 32 + 3
    write("id_2_32_plus_3", alias, b"abc")
    unk = json.loads(json.dumps(tiny))
    unk["model"]["merges"] = ["a z"]
    write("merge_unknown", unk, b"ab")
    nested = json.loads(json.dumps(tiny))
    nested["decoder"] = {"type": "Sequence", "decoders": [{"type": "Sequence", "decoders": [
        {"type": "Strip", "content": " ", "start": 3, "stop": 2}, {"type": "Fuse"}]}]}
    nested["added_tokens"] = [{"id": 3, "content": "<s>", "special": True}]
    write("nested_strip", nested, b"<s>ab ab")


if __name__ == "__main__":
    main()
