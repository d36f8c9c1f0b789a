#!/usr/bin/env python3
"""Perplexity of a GGUF model in llama.cpp (llama-cpp-python, built by scripts/setup.sh) over the
exact token windows `qforge eval RUN --save-tokens T.safetensors` evaluated, so the two numbers
are comparable: each window w is run as w[:-1], and the next-token log-likelihood of w[1:] is
summed where the loss mask is set, as qforge's eval does. Usage:
    llama_cpp_ppl.py MODEL.gguf TOKENS.safetensors    -> prints JSON {ppl, tokens, windows}
The KV cache is F32 (llama.cpp's F16 default would add its own rounding)."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "interop"))
from st_io import read_safetensors  # noqa: E402


def main():
    import llama_cpp
    path, toks = sys.argv[1], sys.argv[2]
    t = read_safetensors(toks)
    tokens, mask = t["tokens"].numpy().astype(np.int64), t["loss_mask"].numpy()
    n_ctx = tokens.shape[1]
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    nll, count = 0.0, 0
    for w, m in zip(tokens, mask):
        llm.reset()
        llm.eval(w[:-1].tolist())
        logits = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        mx = logits.max(-1, keepdims=True)
        logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        tgt = w[1:]
        keep = (m if len(m) == len(tgt) else m[1:]).astype(bool)  # qforge's mask is aligned with the labels
        nll -= logp[np.arange(len(tgt)), tgt][keep].sum()
        count += int(keep.sum())
    print(json.dumps({"ppl": float(np.exp(nll / count)), "tokens": count, "windows": int(len(tokens))}))


if __name__ == "__main__":
    main()
