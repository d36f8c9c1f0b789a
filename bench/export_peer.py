#!/usr/bin/env python3
"""Helpers of bench/export_gguf.sh (llama.cpp's side and the set-up).

  export_peer.py tokenizer DIR          trains a sentencepiece BPE tokenizer (KJV + Python docs, vocab
                                        8000, byte fallback) into DIR/tokenizer.model + tokenizer_config.json,
                                        once, so both convert_hf_to_gguf.py and qforge read the same vocab.
  export_peer.py sources                prints the llama.cpp source dir of the llama-cpp-python sdist
                                        (downloaded once into the wheel cache, unpacked under /tmp): it
                                        holds convert_hf_to_gguf.py and its matching gguf-py.
  export_peer.py quantize SRC DST FTYPE llama_model_quantize (what the llama-quantize tool calls), nthread 2.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLCP = "0.3.36"


def tokenizer(d):
    d = Path(d)
    if (d / "tokenizer.model").exists():
        return
    import sentencepiece as spm
    files = [str(ROOT / "data/corpora/kjv.txt")] + [str(p) for p in sorted((ROOT / "data/corpora/python-docs").rglob("*.rst*"))[:400]]
    spm.SentencePieceTrainer.train(input=files, model_prefix=str(d / "tokenizer"), vocab_size=8000, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2,
                                   input_sentence_size=200000, shuffle_input_sentence=True, minloglevel=2)
    (d / "tokenizer.vocab").unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", '
                                             '"eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true}\n')


def sources():
    cache = Path(os.environ.get("QFORGE_WHEEL_CACHE", Path.home() / ".cache/qforge-wheels"))
    sdist = cache / f"llama_cpp_python-{LLCP}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={LLCP}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache)], check=True)
    dest = Path("/tmp/qf_llama_cpp_src")
    src = dest / f"llama_cpp_python-{LLCP}/vendor/llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        with tarfile.open(sdist) as t:
            t.extractall(dest, filter="data")
    print(src)


def main():
    mode = sys.argv[1]
    if mode == "tokenizer":
        tokenizer(sys.argv[2])
    elif mode == "sources":
        sources()
    elif mode == "quantize":
        sys.path.insert(0, str(ROOT / "tests/interop"))
        from llama_ref import llama_quantize
        llama_quantize(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
