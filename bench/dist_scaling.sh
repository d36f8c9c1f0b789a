#!/usr/bin/env bash
# Data-parallel scaling on this CPU machine (Gloo over loopback), same global batch everywhere:
#   one_1t : 1 rank, 1 thread, batch B          (one core's worth of work)
#   one_all: 1 rank, every core, batch B        (what a single process gets from the machine)
#   two    : `qforge launch --nproc-per-node 2`, batch B/2 per rank, cores split between ranks,
#            buckets launched from autograd hooks during backward (dist.overlap true)
#   two_after: the same with every bucket launched after backward (dist.overlap false)
# Reported (median over REPS runs of STEPS steps each): tokens/s; speedup of `two` over one_1t
# (ideal 2.0 on 2 cores) and over one_all; exposed communication per step (time spent finishing
# the gradient sync after backward: train_summary.json data_parallel.exposed_comm_s_per_step) and
# the share of the communication that overlap hides, 1 - exposed(two) / exposed(two_after).
# Usage: bench/dist_scaling.sh   (env: REPS=3 STEPS=30 B=16 EXTRA='' OUT=bench/results/dist_scaling.json)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source bench/quiet.sh
REPS="${REPS:-3}"; STEPS="${STEPS:-30}"; B="${B:-16}"; EXTRA="${EXTRA:-}"
QFORGE="${QFORGE:-build/qforge}"; PYTHON="${PYTHON:-.venv/bin/python}"; OUT="${OUT:-bench/results/dist_scaling.json}"
CFG=configs/tiny_pretrain.yaml
[[ -x "$QFORGE" ]] || { echo "dist_scaling: build $QFORGE first" >&2; exit 1; }
WORK="$(mktemp -d /tmp/qf_bench_dist.XXXXXX)"; trap 'rm -rf "$WORK"' EXIT
REC="$WORK/records.jsonl"; : > "$REC"
COMMON="trainer.max_steps=$STEPS trainer.eval_every=0 trainer.eval_batches=1 trainer.save_every=0 trainer.log_every=10 sample.prompts=[] trainer.schedule.warmup_steps=5 $EXTRA"
"$QFORGE" -q train "$CFG" run.out_dir="$WORK/warm" trainer.max_steps=0 'sample.prompts=[]' > /dev/null  # tokenizer + token cache
NCORES=$(nproc)
for rep in $(seq 1 "$REPS"); do
  for c in one_1t one_all two two_after; do
    wait_quiet
    d="$WORK/$c-$rep"
    case $c in
      one_1t)    "$QFORGE" -q train "$CFG" run.out_dir="$d" run.threads=1 trainer.batch_size="$B" $COMMON ;;
      one_all)   "$QFORGE" -q train "$CFG" run.out_dir="$d" run.threads="$NCORES" trainer.batch_size="$B" $COMMON ;;
      two)       "$QFORGE" -q launch --nproc-per-node 2 -- train "$CFG" run.out_dir="$d" trainer.batch_size=$((B / 2)) $COMMON ;;
      two_after) "$QFORGE" -q launch --nproc-per-node 2 -- train "$CFG" run.out_dir="$d" trainer.batch_size=$((B / 2)) dist.overlap=false $COMMON ;;
    esac > "$d.log" 2>&1 || { cat "$d.log" >&2; exit 1; }
    "$PYTHON" - "$c" "$rep" "$d/train_summary.json" "$BUSY" >> "$REC" <<'PYEOF'
import json, sys
c, rep, path, busy = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = json.load(open(path))
dp = s.get("data_parallel", {})
print(json.dumps({"case": c, "rep": rep, "tokens_per_s": s["tokens_per_s"], "exposed_comm_s_per_step": dp.get("exposed_comm_s_per_step"),
                  "step_s": dp.get("step_s"), "buckets": dp.get("buckets"), "gradient_bytes_per_step": dp.get("gradient_bytes_per_step"),
                  "busy_before": busy}))
PYEOF
    echo "  $c rep $rep: $(tail -1 "$REC")"
  done
done
"$PYTHON" - "$REC" "$OUT" "$REPS" "$STEPS" "$B" "$EXTRA" <<'PYEOF'
import json, statistics, sys, datetime, platform, os
rec, out, reps, steps, b, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rows = [json.loads(l) for l in open(rec)]
med = lambda c, k: statistics.median(r[k] for r in rows if r["case"] == c)
tps = {c: med(c, "tokens_per_s") for c in ("one_1t", "one_all", "two", "two_after")}
exp_on, exp_off = med("two", "exposed_comm_s_per_step"), med("two_after", "exposed_comm_s_per_step")
res = {
    "command": "bench/dist_scaling.sh" + (f" (EXTRA='{extra}')" if extra else ""),
    "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, {platform.machine()}", "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
    "model": "configs/tiny_pretrain.yaml (4.2M params, seq 128)", "global_batch": b, "steps": steps, "reps": reps,
    "tokens_per_s": tps,
    "speedup_two_vs_one_1t": tps["two"] / tps["one_1t"],
    "speedup_two_vs_one_all": tps["two"] / tps["one_all"],
    "exposed_comm_ms_per_step": {"overlap": 1e3 * exp_on, "after_backward": 1e3 * exp_off},
    "comm_hidden_by_overlap": 1 - exp_on / exp_off if exp_off else None,
    "step_ms": {"two": 1e3 * med("two", "step_s"), "two_after": 1e3 * med("two_after", "step_s")},
    "buckets": rows[-1]["buckets"] if rows[-1]["buckets"] is not None else next(r["buckets"] for r in rows if r["buckets"]),
    "gradient_mb_per_step": next(r["gradient_bytes_per_step"] for r in rows if r["gradient_bytes_per_step"]) / 2**20,
    "records": rows,
}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "records"}, indent=1))
PYEOF
