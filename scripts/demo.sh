#!/usr/bin/env bash
# The embedded default run (`make demo`): pretrain a small Llama-family model from scratch on the
# King James Bible, then quantize it to 3-bit weights (symmetric int3, groups of 32, fp16 scales)
# three ways and compare held-out perplexity and weight bytes, with torchao's methodology: an FP
# control fine-tuned for the same 300 steps, RTN = round-to-nearest of that control, GPTQ of the
# same control, QAT = the same 300 steps with int3 fake quant; recovery = (ppl_RTN - ppl_X) /
# (ppl_RTN - ppl_control). 3 bits because at 4 bits this 4M-parameter model's gap is within the
# noise between CPUs. Then QLoRA domain fine-tuning of the pretrained model on Python's
# documentation (configs/tiny_qlora_domain.yaml) next to a full fine-tune: domain and general
# perplexity before/after, and the training-memory table of full fine-tune vs LoRA vs bf16 LoRA vs
# QLoRA. Finally a QAT run against llama.cpp's q4_0 is exported to GGUF and run by llama.cpp, its
# perplexity printed next to qforge's. Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=build/qforge
OUT=runs/demo
rm -rf "$OUT"
# The recipes' tokenizer path is shared (runs/tokenizers/); the demo always trains its own, so a
# file left by an older qforge (which normalized text) is never reused.
rm -f runs/tokenizers/kjv_bpe4k.model
start=$(date +%s)
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "demo on: $CPU"

echo "== [1/10] pretraining the embedded default (configs/tiny_pretrain.yaml) =="
$Q train run.out_dir=$OUT/pretrain

echo; echo "== [2/10] FP control: the QAT recipe's 300 steps without fake quant =="
$Q train configs/tiny_qat_q4_0.yaml quant.enabled=false run.out_dir=$OUT/ft_fp run.init_from=$OUT/pretrain 'sample.prompts=[]'

echo; echo "== [3/10] post-training quantization of the control: RTN to int3 g32 (configs/tiny_ptq_int3.yaml) =="
$Q train configs/tiny_ptq_int3.yaml run.out_dir=$OUT/ptq_int3 run.init_from=$OUT/ft_fp

echo; echo "   ... and GPTQ to int3 g32 of the same control (qforge quantize; 128 calibration windows of the training text)"
$Q quantize $OUT/ft_fp --method gptq --quant int3-g32 --out $OUT/gptq_int3

echo; echo "   ... and AWQ to int3 g32 of the same control (activation-aware scales folded into the norms)"
$Q quantize $OUT/ft_fp --method awq --quant int3-g32 --out $OUT/awq_int3

echo; echo "== [4/10] quantization-aware training against int3 g32 (configs/tiny_qat_int3.yaml) =="
$Q train configs/tiny_qat_int3.yaml run.out_dir=$OUT/qat_int3 run.init_from=$OUT/pretrain

echo; echo "== [5/10] held-out perplexity and cloze accuracy of each model (qforge eval, qforge eval --task) =="
# A HellaSwag-shaped task from the held-out 2% of the KJV (the same tail the recipes hold out):
# 600 verses cut in two, the true continuation among 3 distractor spans of other verses; scored by
# log-likelihood as lm-evaluation-harness scores HellaSwag (acc, acc_norm).
.venv/bin/python scripts/make_cloze_task.py data/corpora/kjv.txt --tail 0.02 --n 600 --out $OUT/cloze.jsonl
row() {  # label, run-or-checkpoint dir
  local j t ppl bytes acc se
  j=$($Q -q eval "$2" | grep '^{')
  t=$($Q -q eval "$2" --task $OUT/cloze.jsonl | grep '^{')
  ppl=$(sed -E 's/.*"ppl": ?([0-9.]+).*/\1/' <<<"$j")
  bytes=$(sed -E 's/.*"model_bytes": ?([0-9]+).*/\1/' <<<"$j")
  acc=$(sed -E 's/.*"acc": ?([0-9.]+).*/\1/' <<<"$t")
  se=$(sed -E 's/.*"acc_stderr": ?([0-9.eE-]+).*/\1/' <<<"$t")
  printf "| %-34s | %10.3f | %14s | %12s |\n" "$1" "$ppl" "$(awk -v a="$acc" -v s="$se" 'BEGIN{printf "%.1f%% ± %.1f", 100*a, 100*s}')" "$bytes"
  echo "$1,$ppl,$acc,$se,$bytes" >> "$OUT/summary.csv"
}
echo "model,heldout_ppl,cloze_acc,cloze_acc_stderr,weight_bytes" > "$OUT/summary.csv"
{
  printf "| %-34s | %10s | %14s | %12s |\n" "model (held-out KJV text)" "perplexity" "cloze acc" "weight bytes"
  printf "|%s|%s|%s|%s|\n" "------------------------------------" "------------" "----------------" "--------------"
  row "FP32 pretrained (1000 steps)" $OUT/pretrain
  row "FP32 control (+300 steps)" $OUT/ft_fp
  row "PTQ: RTN int3 g32 of the control" $OUT/ptq_int3/converted
  row "PTQ: GPTQ int3 g32 of the control" $OUT/gptq_int3
  row "PTQ: AWQ int3 g32 of the control" $OUT/awq_int3
  row "QAT int3 g32 (+300 steps; converted)" $OUT/qat_int3/converted
} | tee "$OUT/summary.md"
echo "cloze acc: $OUT/cloze.jsonl (600 held-out verses, 4 choices, chance 25%), ± one standard error" | tee -a "$OUT/summary.md"
awk -F, 'NR==3{fp=$2} NR==4{rtn=$2} NR==5{gptq=$2} NR==6{awq=$2} NR==7{qat=$2} END{
  printf "RTN int3 g32 opens a perplexity gap of %.3f over the FP control; ", rtn-fp;
  if (rtn > fp) printf "GPTQ closes %.1f%% of it, AWQ %.1f%%, QAT recovers %.1f%% ((rtn - x) / (rtn - control))\n", 100*(rtn-gptq)/(rtn-fp), 100*(rtn-awq)/(rtn-fp), 100*(rtn-qat)/(rtn-fp);
  else printf "there is no gap to recover\n" }' "$OUT/summary.csv" | tee -a "$OUT/summary.md"

echo "measured on: $CPU" | tee -a "$OUT/summary.md"

echo; echo "== [6/10] greedy generation from the QAT int3 model (packed weights) =="
$Q generate $OUT/qat_int3/converted --prompt "In the beginning" -n 40 -t 0

echo; echo "== [7/10] QLoRA domain fine-tuning on Python's docs (configs/tiny_qlora_domain.yaml) and a full fine-tune =="
$Q train configs/tiny_qlora_domain.yaml run.out_dir=$OUT/qlora_domain run.init_from=$OUT/pretrain
$Q train configs/tiny_qlora_domain.yaml peft.enabled=false trainer.optim.lr=3.0e-4 run.out_dir=$OUT/full_ft_domain \
  run.init_from=$OUT/pretrain 'sample.prompts=[]'
# Memory/speed rows only (memory does not depend on the step count): LoRA with an fp32 / bf16 base.
for base in fp32 bf16; do
  $Q -q train configs/tiny_qlora_domain.yaml peft.base=$base trainer.max_steps=60 trainer.eval_every=0 \
    peft.save_adapter=false run.out_dir=$OUT/lora_${base}_domain run.init_from=$OUT/pretrain 'sample.prompts=[]' >/dev/null
done

echo; echo "== [8/10] domain vs general perplexity, and training memory =="
ppl() { $Q -q eval "$@" | grep '^{' | sed -E 's/.*"ppl": ([0-9.]+).*/\1/'; }
D=configs/tiny_qlora_domain.yaml
G=configs/tiny_pretrain.yaml
{
  printf "| %-30s | %16s | %17s |\n" "model" "Python docs ppl" "KJV (general) ppl"
  printf "|%s|%s|%s|\n" "--------------------------------" "------------------" "-------------------"
  printf "| %-30s | %16.2f | %17.2f |\n" "pretrained (before)" "$(ppl $OUT/pretrain --data-from $D)" "$(ppl $OUT/pretrain --data-from $G)"
  printf "| %-30s | %16.2f | %17.2f |\n" "full fine-tune (300 steps)" "$(ppl $OUT/full_ft_domain --data-from $D)" "$(ppl $OUT/full_ft_domain --data-from $G)"
  printf "| %-30s | %16.2f | %17.2f |\n" "QLoRA r16 NF4 (300 steps)" "$(ppl $OUT/qlora_domain --data-from $D)" "$(ppl $OUT/qlora_domain --data-from $G)"
} | tee "$OUT/domain.md"
mem_row() { .venv/bin/python scripts/memory_row.py "$1" "$2"; }
{
  echo
  printf "| %-26s | %9s | %8s | %8s | %8s | %8s | %8s |\n" "training memory (MB)" "weights" "grads" "AdamW" "total" "RSS MiB" "tok/s"
  printf "|%s|%s|%s|%s|%s|%s|%s|\n" "----------------------------" "-----------" "----------" "----------" "----------" "----------" "----------"
  mem_row "full fine-tune (fp32)" $OUT/full_ft_domain
  mem_row "LoRA r16, fp32 base" $OUT/lora_fp32_domain
  mem_row "LoRA r16, bf16 base" $OUT/lora_bf16_domain
  mem_row "QLoRA r16, NF4 base" $OUT/qlora_domain
} | tee -a "$OUT/domain.md"

echo; echo "== [9/10] greedy generation from the QLoRA model (NF4 base + adapter) =="
$Q generate $OUT/qlora_domain --prompt "The list of" -n 40 -t 0

echo; echo "== [10/10] QAT against llama.cpp's q4_0 (configs/tiny_qat_q4_0.yaml), exported to GGUF and run by llama.cpp (llama-cpp-python) =="
$Q -q train configs/tiny_qat_q4_0.yaml run.out_dir=$OUT/qat_q4_0 run.init_from=$OUT/pretrain 'sample.prompts=[]' >/dev/null
rm -f $OUT/qat_q4_0.gguf
$Q -q export $OUT/qat_q4_0/converted --format gguf --quant q4_0 --out $OUT/qat_q4_0.gguf
qf_json=$($Q -q eval $OUT/qat_q4_0/converted --save-tokens $OUT/heldout_tokens.safetensors | grep '^{')
ll_json=$(.venv/bin/python scripts/llama_cpp_ppl.py $OUT/qat_q4_0.gguf $OUT/heldout_tokens.safetensors)
.venv/bin/python - "$qf_json" "$ll_json" <<'PYEOF' | tee "$OUT/gguf.md"
import json, sys
q, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("| held-out KJV (%d tokens) | perplexity |" % q["tokens"])
print("|---|---:|")
print("| qforge (packed q4_0 weights) | %.4f |" % q["ppl"])
print("| llama.cpp on the exported GGUF | %.4f |" % l["ppl"])
print("difference: %+.3f%% (llama.cpp also quantizes activations to q8_0 inside its q4_0 matmuls)" % (100 * (l["ppl"] / q["ppl"] - 1)))
PYEOF
echo "measured on: $CPU" | tee -a "$OUT/gguf.md"
echo
echo "demo finished in $(( $(date +%s) - start )) s; run directories under $OUT/ (metrics.jsonl, tb/, checkpoints/, converted/)"
