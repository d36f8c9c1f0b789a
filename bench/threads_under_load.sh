#!/usr/bin/env bash
# Threads under load: training tokens/s of the demo model with run.threads 0 (every usable core)
# when other processes keep 0, 1 or all cores busy, for libgomp's default wait policy (idle
# OpenMP workers spin ~300k iterations before sleeping; QFORGE_OMP_REEXEC=1 keeps it) and for
# qforge's default, OMP_WAIT_POLICY=PASSIVE (core/threads.h). Loads are busy-loop shell processes
# started before and killed after each run. Interleaved repetitions, medians.
# Writes bench/results/threads_under_load.json.
# Usage: REPS=3 STEPS=8 bench/threads_under_load.sh      (needs build/qforge: `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/quiet.sh
REPS=${REPS:-3}
STEPS=${STEPS:-8}
Q=build/qforge
[ -x "$Q" ] || { echo "bench/threads_under_load.sh: $Q is missing; run 'make build' first" >&2; exit 1; }
TMP=$(mktemp -d /tmp/qf_bench_threads.XXXXXX)
LOADS=(0 1 $(nproc))
declare -A tps
cleanup() { jobs -p | xargs -r kill 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
common="trainer.max_steps=$STEPS run.threads=0 trainer.eval_every=0 trainer.eval_batches=1 trainer.save_every=0 \
trainer.schedule.warmup_steps=0 trainer.schedule.total_steps=1000 trainer.resume=never sample.prompts=[]"
for r in $(seq 1 "$REPS"); do
  for load in "${LOADS[@]}"; do
    for policy in spin passive; do
      wait_quiet
      pids=()
      for ((i = 0; i < load; i++)); do (while :; do :; done) & pids+=($!); done
      env=(); [ $policy = spin ] && env=(QFORGE_OMP_REEXEC=1)
      out=$(env "${env[@]}" timeout 900 $Q -q train run.out_dir=$TMP/$policy$load$r $common 2>/dev/null | grep -E '^== run' || echo "x, 0 tokens/s")
      kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true
      t=$(sed -E 's/.*, ([0-9.]+) tokens\/s.*/\1/' <<<"$out")
      echo "rep $r, $load busy cores, $policy: $t tokens/s"
      tps[$policy,$load]="${tps[$policy,$load]:-}${tps[$policy,$load]:+,}$t"
      rm -rf "$TMP/$policy$load$r"
    done
  done
done
median() { tr , '\n' <<<"$1" | sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
rows=""
for load in "${LOADS[@]}"; do
  for policy in spin passive; do
    rows+="${rows:+,
}    {\"busy_cores\": $load, \"wait_policy\": \"$policy\", \"tokens_per_s\": [${tps[$policy,$load]}], \"median\": $(median "${tps[$policy,$load]}")}"
  done
done
mkdir -p bench/results
cat > bench/results/threads_under_load.json <<JSON
{
  "benchmark": "threads_under_load",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "machine": {"nproc": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"},
  "command": "REPS=$REPS STEPS=$STEPS bench/threads_under_load.sh",
  "model": "configs/tiny_pretrain.yaml (4.0M params, batch 16x128), run.threads 0",
  "spin": "libgomp default (QFORGE_OMP_REEXEC=1: qforge leaves the wait policy alone)",
  "passive": "qforge's default: OMP_WAIT_POLICY=PASSIVE set by re-executing itself once",
  "rows": [
$rows
  ]
}
JSON
python3 - <<'PYEOF'
import json
d = json.load(open("bench/results/threads_under_load.json"))
base = {r["wait_policy"]: r["median"] for r in d["rows"] if r["busy_cores"] == 0}
print("| busy cores | spin tok/s | passive tok/s | spin slowdown | passive slowdown |")
print("|---:|---:|---:|---:|---:|")
for load in sorted({r["busy_cores"] for r in d["rows"]}):
    m = {r["wait_policy"]: r["median"] for r in d["rows"] if r["busy_cores"] == load}
    sd = lambda p: base[p] / m[p] if m[p] else float("inf")
    print(f"| {load} | {m['spin']:.0f} | {m['passive']:.0f} | {sd('spin'):.2f}x | {sd('passive'):.2f}x |")
PYEOF
