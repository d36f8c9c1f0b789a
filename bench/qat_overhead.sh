#!/usr/bin/env bash
# QAT overhead on CPU: training-loop tokens/s of the demo model with q4_0 fake quant on every
# decoder linear (configs/tiny_qat_q4_0.yaml) vs the same model without (configs/tiny_pretrain.yaml),
# interleaved repetitions, medians, ratio = plain step time / QAT step time... reported as
# qat_step_time / plain_step_time (goal <= 1.10). Writes bench/results/qat_overhead.json.
# Usage: REPS=3 STEPS=60 bench/qat_overhead.sh      (needs build/qforge: `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
STEPS=${STEPS:-60}
THREADS=${THREADS:-2}
Q=build/qforge
[ -x "$Q" ] || { echo "bench/qat_overhead.sh: $Q is missing; run 'make build' first" >&2; exit 1; }
TMP=$(mktemp -d /tmp/qf_bench_qat.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
common="trainer.max_steps=$STEPS run.threads=$THREADS trainer.eval_every=0 trainer.eval_batches=1 trainer.save_every=0 \
trainer.schedule.total_steps=1000 trainer.resume=never sample.prompts=[] quant.convert_at_end=false"
declare -a plain qat
for r in $(seq 1 "$REPS"); do
  for kind in plain qat; do
    cfg=configs/tiny_pretrain.yaml
    extra=""
    if [ $kind = qat ]; then cfg=configs/tiny_qat_q4_0.yaml; extra="run.init_from="; fi
    out=$($Q -q train $cfg run.out_dir=$TMP/$kind$r $common $extra 2>/dev/null | grep -E '^== run' )
    tps=$(sed -E 's/.*, ([0-9.]+) tokens\/s.*/\1/' <<<"$out")
    echo "rep $r $kind: $tps tokens/s"
    if [ $kind = plain ]; then plain+=("$tps"); else qat+=("$tps"); fi
  done
done
median() { printf "%s\n" "$@" | sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
mp=$(median "${plain[@]}"); mq=$(median "${qat[@]}")
ratio=$(awk -v p="$mp" -v q="$mq" 'BEGIN{printf "%.4f", p/q}')
mkdir -p bench/results
cat > bench/results/qat_overhead.json <<JSON
{
  "benchmark": "qat_overhead",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "machine": {"nproc": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"},
  "command": "REPS=$REPS STEPS=$STEPS THREADS=$THREADS bench/qat_overhead.sh",
  "model": "configs/tiny_pretrain.yaml (4.0M params); QAT: q4_0 fake quant on all 28 decoder linears",
  "plain_tokens_per_s": [$(IFS=,; echo "${plain[*]}")],
  "qat_tokens_per_s": [$(IFS=,; echo "${qat[*]}")],
  "median_plain_tokens_per_s": $mp,
  "median_qat_tokens_per_s": $mq,
  "qat_step_time_over_plain": $ratio,
  "goal": "<= 1.10 on CPU"
}
JSON
echo "median plain $mp tok/s, QAT $mq tok/s: QAT step time / plain step time = $ratio (goal <= 1.10)"
