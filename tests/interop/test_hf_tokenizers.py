"""qforge's tokenizer.json reader (data/hf_tokenizer.cpp) against the `tokenizers` library and
transformers. For each tokenizer layout of the families qforge loads, `tokenizers` trains a small
BPE on local text and the file is given the structure of the published one (normalizer,
pre-tokenizer, decoder, post-processor, added tokens and their flags, tokenizer_config.json):
  gpt2      GPT-2: ByteLevel(add_prefix_space=false) with its regex; <|endoftext|> (normalized)
  gpt2_hub  GPT-2 as openai-community/gpt2 ships it: tokenizer_config.json names no special
            token, transformers takes them from GPT2TokenizerFast's defaults
  opt       OPT: GPT-2's layout, <s> <pad> </s> <unk> first, a post-processor adding </s> as BOS
  llama3    Llama 3.x: Split(tiktoken regex, digits in 3s) + ByteLevel, ignore_merges, 256-style
            <|...|> specials after the vocabulary, BOS from the post-processor's template
  qwen2     Qwen2/2.5/3: NFC normalizer, Split(Qwen regex, single digits) + ByteLevel, <|im_start|>
            etc. special, <tool_call>/<think> added but not special, no BOS
  llama2    Llama 2 / TinyLlama / Mistral v0.1: Prepend("▁") + Replace(" ", "▁"), byte fallback,
            decoder Replace + ByteFallback + Fuse + Strip
  phi3      Phi-3/3.5: Llama 2's layout plus <|user|> <|assistant|> <|end|> ... with rstrip
  mistral   Mistral v0.3 (legacy=false conversions): Metaspace(prepend_scheme "first",
            split=false), [INST] control tokens
  gemma     Gemma 2/3: Replace(" ", "▁") without a prefix, Split(" ", MergedWithPrevious), byte
            fallback, control tokens, user-defined added tokens (newlines, "▁▁", HTML tags)
  metaspace a Metaspace(prepend_scheme "always", split=true) pre-tokenizer and decoder
qforge must give the ids `tokenizers` gives (and transformers' AutoTokenizer, whose BOS/EOS/PAD come
from tokenizer_config.json) on strings with whitespace runs, Unicode spaces, digits, contractions,
punctuation, emoji, CJK, combining marks in NFC and NFD, literal "▁", special tokens in text and
the empty string, and decode ids (its own and random ones) to what `tokenizers` decodes. Unsupported
files are refused with a clear error."""
import json
import os
import random
import subprocess
import time
import unicodedata

import pytest
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,  # peer
                        processors, trainers)
import transformers  # peer

from st_io import interop_tool
from tiny_runs import ROOT

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
STRINGS = [
    "Hello world",
    "  leading and  double  spaces\t\ttabs\nnew\n\nlines  ",
    "1234567 3.14159 2024-11-22 0x1F 12345678901 1,000,000 ٣٤٥٦ ½ ²³",
    "punctuation!?... (x) [y] {z} 'quoted' \"dq\" it's we'll I'M they're YOU'VE she'd 'S 'T",
    "emoji 😀🎉 mixed👍🏽text 👨‍👩‍👧",
    "中文字符测试 日本語のテキスト 한국어",
    "combining: e\u0301 n\u0303 a\u0308 \u00e9 Cafe\u0301 Caf\u00e9 e\u0323\u0301 e\u0301\u0323 \u1e0b\u0323 A\u030a \u212b",
    "hangul jamo \u1100\u1161\u11a8 \uac00\u11a8",
    "unicode spaces:\u00a0nbsp\u3000ideo\u2009thin\u2028line\u0085nel\u200bzw\u000b\u000c\u001c\u180e",
    "case-folded contractions: it'\u017f DON'\u212a \u0130stanbul stra\u00dfe \u2460\u2461 \u216b \U0001d7d9",
    "literal ▁▁ metaspace ▁x ▁",
    "In the beginning God created the heaven and the earth.",
    "def f(x):\n    return x**2  # comment\r\n",
    "trailing spaces   ",
    "   ",
    "\n\n\n  \t \n",
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


BYTE_LEVEL = ("gpt2", "gpt2_hub", "opt", "llama3", "qwen2")
SPM = ("llama2", "phi3", "mistral", "gemma", "metaspace")
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Gemma's user-defined sentencepiece pieces: added tokens, not special, matched in the raw text.
GEMMA_USER = ["\n", "\n\n", "\n\n\n", "\t", "\t\t", "▁▁", "▁▁▁", "<table>", "<tr>", "<td>", "</td>", "<h1>", "</h1>"]
# Per layout: tokens in the text that must come out as one id each, BOS/EOS/PAD, whether
# transformers starts an encoding with BOS, tokenizer_config.json's class and config.json's model_type.
FAMILY = {
    "gpt2": dict(specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False,
                 cls="GPT2Tokenizer", model_type="gpt2"),
    "gpt2_hub": dict(specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False,
                     cls=None, model_type="gpt2"),
    "opt": dict(specials=["</s>", "<pad>"], bos="</s>", eos="</s>", pad="<pad>", adds_bos=True, cls="GPT2Tokenizer",
                model_type="opt"),
    "llama3": dict(specials=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"], bos="<|begin_of_text|>",
                   eos="<|eot_id|>", pad=None, adds_bos=True, cls="PreTrainedTokenizerFast", model_type="llama"),
    "qwen2": dict(specials=["<|im_start|>", "<|im_end|>", "<tool_call>", "</think>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", adds_bos=False, cls="Qwen2Tokenizer", model_type="qwen2"),
    "llama2": dict(specials=["<s>", "</s>"], bos="<s>", eos="</s>", pad=None, adds_bos=True, cls="LlamaTokenizer",
                   model_type="llama"),
    "phi3": dict(specials=["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], bos="<s>", eos="<|endoftext|>",
                 pad="<|endoftext|>", adds_bos=False, cls="LlamaTokenizer", model_type="phi3"),
    "mistral": dict(specials=["[INST]", "[/INST]", "</s>"], bos="<s>", eos="</s>", pad=None, adds_bos=True,
                    cls="LlamaTokenizer", model_type="mistral"),
    "gemma": dict(specials=["<start_of_turn>", "<end_of_turn>", "\n\n", "<h1>", "▁▁"], bos="<bos>", eos="<eos>",
                  pad="<pad>", adds_bos=True, cls="GemmaTokenizer", model_type="gemma2"),
    "metaspace": dict(specials=["SPECIAL_A", "SPECIAL_B"], bos="<s>", eos="</s>", pad=None, adds_bos=False,
                      cls="PreTrainedTokenizerFast", model_type="llama"),
}


def _strings(kind):
    sp = FAMILY[kind]["specials"]
    a, b = sp[0], sp[-1]
    return STRINGS + [f"{a}Hello {b} world{a}", f"{a}\n  x {b}  \n\t{a}", f" {a} {a}{b} ", f"text{a}", a,
                      f"{a}user\nhi there{b}\n{a}assistant\n", "x" + "".join(sp) + "y"]


def _flags(j, content, **kw):
    for t in j["added_tokens"]:
        if t["content"] == content:
            t.update(kw)
            return
    raise KeyError(content)


def _template(bos, bos_id):
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _build(kind):
    """The tokenizer.json of `kind` (a dict), trained here with the published file's structure."""
    if kind in BYTE_LEVEL:
        tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
        if kind in ("gpt2", "gpt2_hub", "opt"):
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            if kind == "qwen2":
                tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3 if kind == "llama3" else QWEN2), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        first = ["<s>", "<pad>", "</s>", "<unk>"] if kind == "opt" else []
        trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=first, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        if kind in ("llama2", "phi3"):
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        elif kind == "mistral":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        elif kind == "gemma":
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        if kind == "gemma":
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        elif kind == "metaspace":
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        else:
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        if kind == "gemma":
            first = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]", "<unused0>", "<unused1>",
                      "<start_of_turn>", "<end_of_turn>"] + GEMMA_USER)
        else:
            first = ["<unk>", "<s>", "</s>"] + (["[INST]", "[/INST]"] if kind == "mistral" else [])
            first += ["SPECIAL_A", "SPECIAL_B"] if kind == "metaspace" else []
        trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=first + BYTES, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    # Tokens the published files add after the trained vocabulary.
    if kind in ("gpt2", "gpt2_hub"):
        tok.add_special_tokens(["<|endoftext|>"])
    elif kind == "llama3":
        tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    elif kind == "qwen2":
        tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in ["<tool_call>", "</tool_call>", "<think>", "</think>"]])
    elif kind == "phi3":
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
                                for t in ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|system|>",
                                          "<|end|>", "<|user|>"]])
    j = json.loads(tok.to_str())
    # Byte tokens are ordinary vocabulary in sentencepiece conversions, not added tokens;
    # user-defined pieces are added tokens that are not special; OPT/GPT-2 files mark theirs normalized.
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] not in BYTES]
    if kind == "gemma":
        for t in GEMMA_USER:
            _flags(j, t, special=False)
    if kind in ("gpt2", "gpt2_hub", "opt"):
        for t in j["added_tokens"]:
            t["normalized"] = True
    f = FAMILY[kind]
    if f["adds_bos"]:
        bos_id = j["model"]["vocab"].get(f["bos"], next((t["id"] for t in j["added_tokens"] if t["content"] == f["bos"]),
                                                         None))
        tp = _template(f["bos"], bos_id)
        j["post_processor"] = ({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}, tp]}
            if kind == "llama3" else tp)
    elif kind in BYTE_LEVEL:
        j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    return j


def _write(d, kind, j):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and config.json as published."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False))
    f = FAMILY[kind]
    if kind == "gpt2_hub":
        cfg = {"model_max_length": 1024}
    else:
        cfg = {"bos_token": f["bos"], "eos_token": {"__type": "AddedToken", "content": f["eos"], "lstrip": False, "normalized": False,
                                                     "rstrip": False, "single_word": False, "special": True},
               "pad_token": f["pad"], "tokenizer_class": f["cls"] + ("Fast" if f["cls"] != "PreTrainedTokenizerFast" else ""),
               "clean_up_tokenization_spaces": False}
        if kind in ("llama2", "phi3", "mistral", "gemma", "opt"):
            cfg["add_bos_token"] = f["adds_bos"]
            cfg["add_eos_token"] = False
        if kind in ("llama2", "phi3", "mistral"):
            cfg["legacy"] = kind == "llama2"
            cfg["unk_token"] = "<unk>"
        if kind == "opt":
            cfg.update(unk_token="</s>", add_prefix_space=False, errors="replace")
        if kind == "qwen2":
            cfg.update(add_prefix_space=False, errors="replace", unk_token=None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"model_type": f["model_type"]}))


def _run(path, strings, tmp_path, ids=None):
    inp = {"texts": strings, "ids": ids} if ids is not None else strings
    (tmp_path / "in.json").write_text(json.dumps(inp))
    r = subprocess.run([interop_tool("interop_tok"), str(path), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    return r, (json.loads((tmp_path / "out.json").read_text()) if r.returncode == 0 else None)


@pytest.mark.parametrize("kind", list(FAMILY))
def test_ids_and_decoding_match_tokenizers_and_transformers(tmp_path, kind):
    j = _build(kind)
    d = tmp_path / kind
    _write(d, kind, j)
    ref = Tokenizer.from_str(json.dumps(j))
    strings = _strings(kind)
    rng = random.Random(kind)
    n = ref.get_vocab_size(with_added_tokens=True)
    random_ids = [[rng.randrange(n) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    random_ids += [[ref.token_to_id(t) for t in pair] for pair in (["<0xE4>", "<0xB8>"], ["<0xE4>", "<0xB8>", "<0xAD>"],
                                                                   ["<0x41>", "<0xFF>", "<0x42>"])
                   if all(ref.token_to_id(t) is not None for t in pair)]
    r, got = _run(d, strings, tmp_path, random_ids)
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    f = FAMILY[kind]
    for key in ("bos", "eos", "pad"):
        want = ref.token_to_id(f[key]) if f[key] else None
        assert getattr(hf, f"{key}_token_id") == want, f"{kind}: transformers' {key} is not the layout's"
        assert got[key] == (want if want is not None else -1), f"{kind}: {key} qforge {got[key]} transformers {want}"
    for s, ids, dec in zip(strings, got["ids"], got["decoded"]):
        want = ref.encode(s, add_special_tokens=False).ids
        assert ids == want, f"{kind}: {s!r}\n qforge {ids}\n tokenizers {want}"
        assert hf(s, add_special_tokens=False)["input_ids"] == want, f"{kind}: transformers differs on {s!r}"
        # With special tokens transformers adds BOS (when the family does) and nothing else.
        assert hf(s)["input_ids"] == ([got["bos"]] if f["adds_bos"] else []) + ids, f"{kind}: specials on {s!r}"
        assert dec == ref.decode(want, skip_special_tokens=False), f"{kind}: decode of {s!r}"
        if kind in BYTE_LEVEL:  # byte-level BPE round-trips any text, normalized
            assert dec == (unicodedata.normalize("NFC", s) if kind == "qwen2" else s)
    for ids, dec in zip(random_ids, got["decoded_ids"]):
        assert dec == ref.decode(ids, skip_special_tokens=False), f"{kind}: decode of {ids} {ref.id_to_token(ids[0])!r}"


def test_nfc_matches_tokenizers_on_every_composable_character(tmp_path):
    # Qwen's NFC normalizer on every code point with a canonical decomposition (given as itself and
    # decomposed), canonical reordering of random mark sequences, Hangul jamo: the byte-level
    # round trip shows qforge's normalized text, which must be tokenizers' NFC.
    j = _build("qwen2")
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    ref = Tokenizer.from_str(json.dumps(j))
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and unicodedata.decomposition(chr(c))
             and not unicodedata.decomposition(chr(c)).startswith("<")]
    marks = [chr(c) for c in range(0x300, 0x370)] + ["\u0591", "\u05b0", "\u0f71", "\u0f80", "\u3099", "\u1df6", "\u07fd"]
    rng = random.Random(0)
    strings = []
    for i in range(0, len(chars), 40):
        strings.append(" ".join(unicodedata.normalize("NFD", c) + c for c in chars[i:i + 40]))
    for _ in range(200):
        strings.append(rng.choice("aeiouAEOUsnczgk\u1100\uac00\u0915") + "".join(rng.choice(marks) for _ in range(4)))
    strings.append("".join(chr(0x1100 + i % 19) + chr(0x1161 + i % 21) + chr(0x11A8 + i % 27) for i in range(60)))
    r, got = _run(tmp_path / "tokenizer.json", strings, tmp_path)
    assert r.returncode == 0, r.stderr
    for s, ids, dec in zip(strings, got["ids"], got["decoded"]):
        assert dec == ref.normalizer.normalize_str(s), f"NFC of {s!r}"
        assert ids == ref.encode(s, add_special_tokens=False).ids, f"ids of {s!r}"


def test_added_token_options_match_tokenizers(tmp_path):
    # lstrip/rstrip (Unicode whitespace, as far as the previous token), single_word (Unicode word
    # characters), normalized (matched in the normalized text as its normalized content: with
    # Llama 2's Prepend("▁") that is "▁<n>", with NFC the composed form).
    tokens = [AddedToken("<L>", lstrip=True, special=True, normalized=False),
              AddedToken("<R>", rstrip=True, special=True, normalized=False),
              AddedToken("<LR>", lstrip=True, rstrip=True, special=False, normalized=False),
              AddedToken("word", single_word=True, special=False, normalized=False),
              AddedToken("<n>", special=False, normalized=True),
              AddedToken("A\u030aX", special=False, normalized=True),
              AddedToken("wide", single_word=True, normalized=True, lstrip=True)]
    strings = ["a <L> b", "a\t\n <L>b", "<L>", "  <L>", "<R>  \n x", "x<R>\u3000\u00a0y", "<R><R> <R>", "x <LR>\u2003y",
               "<R> <LR> <L>", "a word b", "aword b", "word", "wordy", "_word", "é word", "word\u0301", "word-x",
               "3word", "\u4e2dword", "<n> x <n>", "x<n>y", " <n>", "<n>", "\u00c5X \u212bX A\u030aX", "wide wide",
               "a wide", "xwide", "wide_", *STRINGS]
    for kind in ("llama2", "qwen2", "gpt2"):
        j = _build(kind)
        base = Tokenizer.from_str(json.dumps(j))
        base.add_tokens(tokens)
        j = json.loads(base.to_str())
        p = tmp_path / f"{kind}.json"
        p.write_text(json.dumps(j))
        ref = Tokenizer.from_str(json.dumps(j))
        r, got = _run(p, strings, tmp_path)
        assert r.returncode == 0, r.stderr
        for s, ids, dec in zip(strings, got["ids"], got["decoded"]):
            want = ref.encode(s, add_special_tokens=False).ids
            assert ids == want, f"{kind}: {s!r}\n qforge {ids}\n tokenizers {want}"
            assert dec == ref.decode(want, skip_special_tokens=False), f"{kind}: decode of {s!r}"


def test_split_behaviours_match_tokenizers(tmp_path):
    # Split with a String or a Regex pattern, each of the five delimiter behaviours, inverted or not
    # (Gemma's is Split(" ", merged_with_previous)), before a ByteLevel pre-tokenizer: every
    # (behaviour, invert) pair, the patterns taken in turn (each run of the driver loads libtorch).
    j = _build("llama3")
    strings = ["How are  you doing?  ", "ab abab  a b 12 3 x", " lead", "abab", "", " ", "a1b22c333 ", *STRINGS[:8]]
    patterns = [{"String": " "}, {"String": "ab"}, {"Regex": r"\s+"}, {"Regex": r"\d"}, {"Regex": r"\w+|[^\w\s]+"}]
    configs = [(b, inv) for b in ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")
               for inv in (False, True)]
    configs = [(patterns[i % len(patterns)], b, inv) for i, (b, inv) in enumerate(configs)]
    configs.append(({"String": " "}, "MergedWithPrevious", False))
    for n, (pattern, behavior, invert) in enumerate(configs):
        j["pre_tokenizer"]["pretokenizers"][0] = {"type": "Split", "pattern": pattern, "behavior": behavior,
                                                  "invert": invert}
        p = tmp_path / f"s{n}.json"
        p.write_text(json.dumps(j))
        ref = Tokenizer.from_str(json.dumps(j))
        r, got = _run(p, strings, tmp_path)
        assert r.returncode == 0, r.stderr
        for s, ids in zip(strings, got["ids"]):
            want = ref.encode(s, add_special_tokens=False).ids
            assert ids == want, f"{pattern} {behavior} invert={invert}: {s!r}\n qforge {ids}\n tokenizers {want}"


def test_unsupported_tokenizers_are_refused(tmp_path):
    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "wp.json"))
    r, _ = _run(tmp_path / "wp.json", ["a"], tmp_path)
    assert r.returncode == 1 and "model type 'WordPiece' is not supported" in r.stderr, r.stderr
    j = _build("gpt2")
    for key, value, message in [
            ("normalizer", {"type": "NFKC"}, "normalizer 'NFKC' is not supported"),
            ("normalizer", {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"},
             "normalizer 'Replace' is not supported (supported: Sequence, Prepend, Replace with a String pattern, NFC)"),
            ("pre_tokenizer", {"type": "Digits", "individual_digits": True}, "pre_tokenizer 'Digits' is not supported"),
            ("pre_tokenizer", {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True},
             "Metaspace with a replacement other than U+2581"),
            ("decoder", {"type": "WordPiece", "prefix": "##", "cleanup": True}, "decoder 'WordPiece' is not supported")]:
        p = tmp_path / f"{key}.json"
        p.write_text(json.dumps({**j, key: value}))
        Tokenizer.from_file(str(p))  # a file tokenizers itself reads
        r, _ = _run(p, ["a"], tmp_path)
        assert r.returncode == 1 and message in r.stderr and str(p) in r.stderr, r.stderr
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
        for s, ids, dec in zip(strings, got["ids"], got["decoded"]):
            assert ids == tok.encode(s).ids, f"case {i}: {s!r} qforge {ids} tokenizers {tok.encode(s).ids}"
            assert dec == tok.decode(ids)  # no decoder: tokens joined with spaces


def test_byte_fallback_without_every_byte_token_gives_one_unk_per_character(tmp_path):
    # A character outside the vocabulary whose bytes are not all <0xXX> tokens becomes one <unk>
    # (fused with its neighbours' under fuse_unk), as tokenizers does.
    vocab = {"<unk>": 0, "<0xE4>": 1, "<0xB8>": 2, "a": 3, "<0xAD>": 4}
    for fuse in (False, True):
        for drop in ("<0xAD>", None):
            v = {k: i for k, i in vocab.items() if k != drop}
            tok = Tokenizer(models.BPE(vocab=v, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=fuse))
            p = tmp_path / "bf.json"
            tok.save(str(p))
            strings = ["a中a中中a", "中", "a\u00e9\u00e9a"]
            r, got = _run(p, strings, tmp_path)
            assert r.returncode == 0, r.stderr
            for s, ids in zip(strings, got["ids"]):
                assert ids == tok.encode(s).ids, f"fuse={fuse} drop={drop}: {s!r} qforge {ids} tokenizers {tok.encode(s).ids}"


def test_long_lines_without_pre_tokenizer_match_and_are_fast(tmp_path):
    # Llama-2-style tokenizers have no pre-tokenizer: a whole line is one BPE piece. 40 KB lines
    # must match tokenizers and take well under a second each (merging is O(n log n)).
    j = _build("llama2")
    (tmp_path / "l2.json").write_text(json.dumps(j))
    tok = Tokenizer.from_str(json.dumps(j))
    with open(os.path.join(ROOT, "data/corpora/kjv.txt"), encoding="utf-8") as f:
        text = f.read(200_000)
    strings = [text[i:i + 40_000].replace("\n", " ") for i in range(0, 160_000, 40_000)]
    t0 = time.time()
    r, got = _run(tmp_path / "l2.json", strings, tmp_path)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr
    for s, ids in zip(strings, got["ids"]):
        assert ids == tok.encode(s, add_special_tokens=False).ids
    assert took < 20, f"4 lines of 40 KB took {took:.1f} s"


def test_geometric_replace_chains_are_refused(tmp_path):
    j = _build("llama2")
    j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": " "},
                                                            "content": "  "}] * 16}
    (tmp_path / "grow.json").write_text(json.dumps(j))
    r, _ = _run(tmp_path / "grow.json", ["a b c d e f"], tmp_path)
    assert r.returncode == 1 and "normalizer's Replace/Prepend steps grow" in r.stderr, r.stderr
