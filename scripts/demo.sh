#!/usr/bin/env bash
# The embedded default run (`make demo`): pretrain a small Llama-family model from scratch on the
# King James Bible, then evaluate held-out perplexity and sample from it. Later stages (QAT, QLoRA,
# GGUF export) append to this script. Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=build/qforge
OUT=runs/demo
rm -rf "$OUT"
start=$(date +%s)
echo "== [1/3] pretraining the embedded default (configs/tiny_pretrain.yaml) =="
$Q train run.out_dir=$OUT/pretrain
echo
echo "== [2/3] held-out perplexity of the trained checkpoint =="
$Q eval $OUT/pretrain
echo
echo "== [3/3] greedy generation from the trained checkpoint =="
$Q generate $OUT/pretrain --prompt "In the beginning" -n 40 -t 0
echo
echo "demo finished in $(( $(date +%s) - start )) s; run directory: $OUT/pretrain (metrics.jsonl, tb/, checkpoints/)"
