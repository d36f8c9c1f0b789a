"""qforge's trained sentencepiece tokenizer keeps the text, and llama.cpp tokenizes it identically
from the exported GGUF. A tiny run trains its tokenizer on indented Python-docs text plus KJV lines
(identity normalisation, whitespace-only pieces, byte fallback, split digits, dummy prefix: Llama's
settings), `qforge export --format gguf` writes the vocabulary, and llama.cpp (llama-cpp-python,
vocab_only) must produce qforge's ids - with and without BOS - on text with newlines, indentation,
tabs, runs of spaces, digits and non-ASCII (characters outside the vocabulary go through byte
fallback), and on whole Python-docs files; both decode the ids back to the text byte for byte."""
import json
import os
import subprocess

import gguf  # peers: a missing one fails here, loudly
import llama_cpp
import pytest

from st_io import interop_tool
from tiny_runs import QFORGE, ROOT, tiny_recipe, train

DOCS = os.path.join(ROOT, "data/corpora/python-docs/tutorial")
STRINGS = [
    "def f(x):\n    return x",
    "def f(x): return x",
    "class A:\n\tdef g(self):\n\t\treturn [i for i in range(10)]\n\n\n",
    "runs   of    spaces     and\ttabs\t\tend  ",
    "   leading spaces and a trailing newline\n",
    "\n\nstarts with blank lines",
    "x = 1234567890 + 3.14159  # digits",
    "café naïve été Zürich",
    "中文字符测试 日本語",
    "emoji 😀🎉 mixed👍🏽text",
    "ﬁ full-width ＡＢ Ω (NFKC would change these)",
    "crlf\r\nline",
    ">>> print('hello')\nhello\n>>>     # indented comment",
    " ",
    "   ",
    "\n",
    "a",
    "",
]


def _docs_texts(n):
    names = sorted(f for f in os.listdir(DOCS) if not f.startswith("."))[:n]
    assert names, f"no Python-docs text under {DOCS}; run scripts/setup.sh"
    return [open(os.path.join(DOCS, f), encoding="utf-8").read() for f in names]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_tok")
    cfg = tiny_recipe(d, "run", tie=False, max_steps=2)
    # The tokenizer learns from indented text (the run itself trains on the KJV slice).
    docs = d / "docs.txt"
    docs.write_text("".join(_docs_texts(12)), encoding="utf-8")
    train(cfg, f"tokenizer.train.sources=[{d}/corpus.txt, {docs}]", "tokenizer.train.vocab_size=800")
    out = d / "m.gguf"
    r = subprocess.run([QFORGE, "-q", "export", str(d / "run"), "--format", "gguf", "--quant", "f32", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d, out


def _qforge(tok_model, strings, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps(strings))
    r = subprocess.run([interop_tool("interop_tok"), str(tok_model), str(tmp_path / "in.json"),
                        str(tmp_path / "out.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "out.json").read_text())


def test_gguf_vocabulary_metadata(run):
    _, path = run
    g = gguf.GGUFReader(str(path))
    f = lambda k: g.fields[k].contents()
    assert f("tokenizer.ggml.model") == "llama"
    tokens, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == len(f("tokenizer.ggml.scores")) == 800
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<pad>"] and types[:4] == [2, 3, 3, 3]
    assert tokens[4:260] == [f"<0x{b:02X}>" for b in range(256)] and set(types[4:260]) == {6}
    assert set(types[260:]) == {1}
    assert (f("tokenizer.ggml.unknown_token_id"), f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")) == (0, 1, 2)
    assert f("tokenizer.ggml.add_space_prefix") is True and f("tokenizer.ggml.add_bos_token") is True
    assert "▁▁▁▁" in tokens or "▁▁▁" in tokens, "no whitespace-only piece learned from indented text"


def test_llama_cpp_tokenizes_like_qforge(run, tmp_path):
    d, path = run
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = STRINGS + _docs_texts(12)
    ours = _qforge(d / "tok.model", texts, tmp_path)
    assert ours["bos"] == llm.token_bos() == 1
    a, b = ours["ids"][0], ours["ids"][1]
    assert a != b, "newline + indentation tokenized like a single space"
    n_ours = n_llama = 0
    for text, ids, decoded in zip(texts, ours["ids"], ours["decoded"]):
        show = repr(text[:60])
        assert decoded == text, f"qforge decode does not round-trip {show}"
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert got == ids, f"{show}\n qforge    {ids[:40]}\n llama.cpp {got[:40]}"
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1] + ids, show
        # llama-cpp-python drops the dummy-prefix space after a leading BOS (as Llama-1's decode did).
        assert llm.detokenize([1] + ids).decode() == text, f"llama.cpp decode does not round-trip {show}"
        n_ours += len(ids)
        n_llama += len(got)
    print(f"\nGGUF_TOKENIZER {len(texts)} texts: qforge {n_ours} tokens, llama.cpp {n_llama}")
