#!/usr/bin/env bash
# The embedded default run (`make demo`): pretrain a small Llama-family model from scratch on the
# King James Bible, then quantize it to llama.cpp's q4_0 two ways — post-training round-to-nearest
# (RTN) and quantization-aware training (QAT) against the exact q4_0 block format — and compare
# held-out perplexity and weight bytes. Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=build/qforge
OUT=runs/demo
rm -rf "$OUT"
start=$(date +%s)

echo "== [1/5] pretraining the embedded default (configs/tiny_pretrain.yaml) =="
$Q train run.out_dir=$OUT/pretrain

echo; echo "== [2/5] post-training quantization: RTN to q4_0 (configs/tiny_ptq_q4_0.yaml) =="
$Q train configs/tiny_ptq_q4_0.yaml run.out_dir=$OUT/ptq_q4_0 run.init_from=$OUT/pretrain

echo; echo "== [3/5] quantization-aware training against q4_0 (configs/tiny_qat_q4_0.yaml) =="
$Q train configs/tiny_qat_q4_0.yaml run.out_dir=$OUT/qat_q4_0 run.init_from=$OUT/pretrain

echo; echo "== [4/5] held-out perplexity of each model (qforge eval) =="
row() {  # label, run-or-checkpoint dir
  local j
  j=$($Q -q eval "$2" | grep '^{')
  local ppl bytes
  ppl=$(sed -E 's/.*"ppl": ([0-9.]+).*/\1/' <<<"$j")
  bytes=$(sed -E 's/.*"model_bytes": ([0-9]+).*/\1/' <<<"$j")
  printf "| %-34s | %10.3f | %12s |\n" "$1" "$ppl" "$bytes"
  echo "$1,$ppl,$bytes" >> "$OUT/summary.csv"
}
echo "method,heldout_ppl,weight_bytes" > "$OUT/summary.csv"
{
  printf "| %-34s | %10s | %12s |\n" "model (held-out KJV text)" "perplexity" "weight bytes"
  printf "|%s|%s|%s|\n" "------------------------------------" "------------" "--------------"
  row "FP32 (pretrained)" $OUT/pretrain
  row "PTQ RTN q4_0 (converted)" $OUT/ptq_q4_0/converted
  row "QAT q4_0 (converted)" $OUT/qat_q4_0/converted
} | tee "$OUT/summary.md"
python_gap() { awk -F, 'NR==2{fp=$2} NR==3{rtn=$2} NR==4{qat=$2} END{ if (rtn>fp) printf "QAT recovers %.1f%% of the perplexity gap RTN opens (fp %.3f, rtn %.3f, qat %.3f)\n", 100*(rtn-qat)/(rtn-fp), fp, rtn, qat }' "$OUT/summary.csv"; }
python_gap | tee -a "$OUT/summary.md"

echo; echo "== [5/5] greedy generation from the QAT q4_0 model (packed weights) =="
$Q generate $OUT/qat_q4_0/converted --prompt "In the beginning" -n 40 -t 0
echo
echo "demo finished in $(( $(date +%s) - start )) s; run directories under $OUT/ (metrics.jsonl, tb/, checkpoints/, converted/)"
