#!/usr/bin/env bash
# The embedded default run (`make demo`): pretrain a small Llama-family model from scratch on the
# King James Bible, then quantize it to llama.cpp's q4_0 two ways and compare held-out perplexity
# and weight bytes, with torchao's methodology: an FP control fine-tuned for the same 300 steps,
# PTQ = round-to-nearest q4_0 of that control, QAT = the same 300 steps with q4_0 fake quant;
# recovery = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_control). Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=build/qforge
OUT=runs/demo
rm -rf "$OUT"
start=$(date +%s)

echo "== [1/6] pretraining the embedded default (configs/tiny_pretrain.yaml) =="
$Q train run.out_dir=$OUT/pretrain

echo; echo "== [2/6] FP control: the QAT recipe's 300 steps without fake quant =="
$Q train configs/tiny_qat_q4_0.yaml quant.enabled=false run.out_dir=$OUT/ft_fp run.init_from=$OUT/pretrain 'sample.prompts=[]'

echo; echo "== [3/6] post-training quantization of the control: RTN to q4_0 (configs/tiny_ptq_q4_0.yaml) =="
$Q train configs/tiny_ptq_q4_0.yaml run.out_dir=$OUT/ptq_q4_0 run.init_from=$OUT/ft_fp

echo; echo "== [4/6] quantization-aware training against q4_0 (configs/tiny_qat_q4_0.yaml) =="
$Q train configs/tiny_qat_q4_0.yaml run.out_dir=$OUT/qat_q4_0 run.init_from=$OUT/pretrain

echo; echo "== [5/6] held-out perplexity of each model (qforge eval) =="
row() {  # label, run-or-checkpoint dir
  local j ppl bytes
  j=$($Q -q eval "$2" | grep '^{')
  ppl=$(sed -E 's/.*"ppl": ([0-9.]+).*/\1/' <<<"$j")
  bytes=$(sed -E 's/.*"model_bytes": ([0-9]+).*/\1/' <<<"$j")
  printf "| %-34s | %10.3f | %12s |\n" "$1" "$ppl" "$bytes"
  echo "$1,$ppl,$bytes" >> "$OUT/summary.csv"
}
echo "model,heldout_ppl,weight_bytes" > "$OUT/summary.csv"
{
  printf "| %-34s | %10s | %12s |\n" "model (held-out KJV text)" "perplexity" "weight bytes"
  printf "|%s|%s|%s|\n" "------------------------------------" "------------" "--------------"
  row "FP32 pretrained (1000 steps)" $OUT/pretrain
  row "FP32 control (+300 steps)" $OUT/ft_fp
  row "PTQ: RTN q4_0 of the control" $OUT/ptq_q4_0/converted
  row "QAT q4_0 (+300 steps; converted)" $OUT/qat_q4_0/converted
} | tee "$OUT/summary.md"
awk -F, 'NR==3{fp=$2} NR==4{rtn=$2} NR==5{qat=$2} END{
  printf "RTN q4_0 opens a perplexity gap of %.3f over the FP control; ", rtn-fp;
  if (rtn > fp) printf "QAT recovers %.1f%% of it ((ptq - qat) / (ptq - control))\n", 100*(rtn-qat)/(rtn-fp);
  else printf "there is no gap to recover\n" }' "$OUT/summary.csv" | tee -a "$OUT/summary.md"

echo; echo "== [6/6] greedy generation from the QAT q4_0 model (packed weights) =="
$Q generate $OUT/qat_q4_0/converted --prompt "In the beginning" -n 40 -t 0
echo
echo "demo finished in $(( $(date +%s) - start )) s; run directories under $OUT/ (metrics.jsonl, tb/, checkpoints/, converted/)"
