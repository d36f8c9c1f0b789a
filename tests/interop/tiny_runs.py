"""Shared by the interop tests that need real qforge runs: the repository root, the qforge binary
(under $QFORGE_BUILD_DIR, as ctest sets it), a slice of the KJV corpus, and the tiny Llama recipe
(2 layers, dim 64, 4/2 heads, ffn 160, a 400-piece sentencepiece tokenizer) trained by `qforge train`."""
import os
import subprocess

import numpy as np

from st_io import read_safetensors, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QFORGE = os.path.join(os.environ.get("QFORGE_BUILD_DIR", os.path.join(ROOT, "build")), "qforge")


def kjv_corpus(path, n_lines):
    """Writes the first n_lines of the KJV text extracted by scripts/setup.sh to path."""
    with open(os.path.join(ROOT, "data/corpora/kjv.txt"), encoding="utf-8") as f:
        path.write_text("".join(l for _, l in zip(range(n_lines), f)))
    return path


def tiny_recipe(d, out_dir, tie, max_steps):
    """Writes d/tiny.yaml (corpus, tokenizer and token cache under d) and returns its path."""
    corpus = kjv_corpus(d / "corpus.txt", 2500)
    cfg = d / "tiny.yaml"
    cfg.write_text(f"""
run: {{name: tiny, out_dir: {d}/{out_dir}, seed: 3, threads: 2}}
tokenizer: {{path: {d}/tok.model, train: {{enabled: true, sources: [{corpus}], vocab_size: 400}}}}
model: {{dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 160, max_seq_len: 64, tie_embeddings: {str(tie).lower()}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, val_fraction: 0.05, cache_dir: {d}/cache}}
trainer: {{max_steps: {max_steps}, batch_size: 8, eval_every: 0, eval_batches: 2, log_every: 4, optim: {{lr: 0.003}},
          schedule: {{warmup_steps: 2}}}}
""")
    return cfg


def train(cfg, *overrides):
    """`qforge -q train cfg overrides...` with 2 OpenMP threads; raises on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run([QFORGE, "-q", "train", str(cfg), *overrides], check=True, env=env, capture_output=True)


def qforge(*args, check=True):
    """`qforge -q args...` with 2 OpenMP threads, output captured; asserts success (stderr tail shown) when check."""
    r = subprocess.run([QFORGE, "-q", *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    if check:
        assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


def tool_logits(tool_args, work, ids, n_new):
    """Runs an interop tool as `tool_args... IDS_FILE OUT_FILE n_new` with `ids` written to work/ids.safetensors
    (work created): its fp32 logits of ids (numpy) and greedy tokens of ids[0] (list)."""
    work.mkdir(exist_ok=True)
    write_safetensors(work / "ids.safetensors", {"ids": np.array(ids, dtype=np.int64)})
    r = subprocess.run([*map(str, tool_args), str(work / "ids.safetensors"), str(work / "o.safetensors"), str(n_new)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    o = read_safetensors(work / "o.safetensors")
    return o["logits"].numpy(), o["generated"].tolist()


def mean_kld(ref, model):
    """Mean KL(ref || model) per row of logits (llama.cpp's perplexity --kl-divergence definition), fp64."""
    lr = ref.astype(np.float64) - ref.max(1, keepdims=True)
    lr -= np.log(np.exp(lr).sum(1, keepdims=True))
    lm = model.astype(np.float64) - model.max(1, keepdims=True)
    lm -= np.log(np.exp(lm).sum(1, keepdims=True))
    return float((np.exp(lr) * (lr - lm)).sum(1).mean())
