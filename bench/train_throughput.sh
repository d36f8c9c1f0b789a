#!/usr/bin/env bash
# Training throughput + peak RSS: `qforge train` vs an eager PyTorch loop (bench/train_throughput.py)
# on the demo model (configs/tiny_pretrain.yaml), same shape / batch / data / threads.
#
# Method (identical for both sides): each side is run as a whole process for STEPS_A and STEPS_B
# optimizer steps; steady-state tokens/s = (STEPS_B - STEPS_A) * batch * seq_len / (wall_B - wall_A).
# Everything that does not scale with steps (process start, torch load, tokenizer / data load, model
# init, qforge's step-0 and final eval and its final checkpoint, the first warm-up steps) cancels out.
# Peak RSS = /usr/bin/time "Maximum resident set size" of the STEPS_B process.
# Repetitions are interleaved (qforge/python order alternates per rep); medians are reported.
#
# Usage: bench/train_throughput.sh          (env: REPS=3 STEPS_A=40 STEPS_B=80 THREADS=2 QFORGE=build/qforge
#                                            PYTHON=.venv/bin/python OUT=bench/results/train_throughput.json)
# Builds nothing: build/qforge must exist (cmake --build build --target qforge).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

REPS="${REPS:-3}"
STEPS_A="${STEPS_A:-40}"
STEPS_B="${STEPS_B:-80}"
THREADS="${THREADS:-2}"
QFORGE="${QFORGE:-build/qforge}"
PYTHON="${PYTHON:-.venv/bin/python}"
CONFIG="${CONFIG:-configs/tiny_pretrain.yaml}"
OUT="${OUT:-bench/results/train_throughput.json}"
TIMEBIN=/usr/bin/time

die() { echo "train_throughput: $*" >&2; exit 1; }
[[ -x "$QFORGE" ]] || die "$QFORGE not found or not executable; build it first: cmake --build build -j2 --target qforge"
[[ -x "$PYTHON" ]] || die "$PYTHON not found (the project venv with torch)"
[[ -x "$TIMEBIN" ]] || die "$TIMEBIN missing (GNU time): apt-get install -y time"
[[ -f "$CONFIG" ]] || die "$CONFIG not found"
(( STEPS_B > STEPS_A && STEPS_A > 3 )) || die "need STEPS_B > STEPS_A > 3 (got $STEPS_A, $STEPS_B)"
"$PYTHON" -c 'import torch, numpy' 2>/dev/null || die "$PYTHON cannot import torch and numpy"

WORK="$(mktemp -d /tmp/qf_bench_tt.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"

# Shape from the resolved recipe, so the PyTorch side follows the config (vocab 0 = from the tokenizer).
"$QFORGE" train "$CONFIG" --print-config trainer.max_steps="$STEPS_B" trainer.schedule.total_steps=600 \
  > "$WORK/resolved.yaml" || die "qforge could not resolve $CONFIG"
"$PYTHON" - "$WORK/resolved.yaml" > "$WORK/shape.env" <<'EOF'
import re, sys
txt = open(sys.argv[1]).read()
def get(section, key):
    m = re.search(r"^%s:\n((?:[ ].*\n)+)" % section, txt, re.M)
    v = re.search(r"^  %s: *(.*)$" % key, m.group(1), re.M).group(1).strip()
    return v
print("FAMILY=%s" % get("model", "family"))
for k in ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps", "init_std",
          "tie_embeddings", "qkv_bias", "dtype"]:
    print("M_%s=%s" % (k.upper(), get("model", k)))
for k in ["seq_len", "val_fraction"]:
    print("D_%s=%s" % (k.upper(), get("data", k)))
for k in ["batch_size", "grad_accum", "grad_clip", "precision"]:
    print("T_%s=%s" % (k.upper(), get("trainer", k)))
print("T_WARMUP=%s" % re.search(r"warmup_steps: *(\S+)", txt).group(1))
print("T_MINLR=%s" % re.search(r"min_lr_ratio: *(\S+)", txt).group(1))
print("T_LR=%s" % re.search(r"^    lr: *(\S+)", txt, re.M).group(1))
print("T_WD=%s" % re.search(r"weight_decay: *(\S+)", txt).group(1))
b = re.search(r"betas: *\[([^,]+), *([^\]]+)\]", txt)
print("T_BETAS='%s %s'" % (b.group(1), b.group(2)))
EOF
# shellcheck disable=SC1091
source "$WORK/shape.env"
[[ "$FAMILY" == llama && "$M_TIE_EMBEDDINGS" == true && "$M_QKV_BIAS" == false && "$M_DTYPE" == fp32 \
   && "$T_GRAD_ACCUM" == 1 && "$T_PRECISION" == fp32 ]] \
  || die "the PyTorch reference only models llama / tied / no-bias / fp32 / grad_accum 1 recipes"
VOCAB="$M_VOCAB_SIZE"   # 0 = from the tokenizer: taken from the first qforge log ("vocab N on cpu")

QF_ARGS=(run.threads="$THREADS" trainer.schedule.total_steps=600 trainer.eval_every=0 trainer.eval_batches=1
         trainer.save_every=0 trainer.log_every=10 sample.prompts=[] trainer.resume=never)
PY_ARGS=(--threads "$THREADS" --dim "$M_DIM" --n-layers "$M_N_LAYERS" --n-heads "$M_N_HEADS"
         --n-kv-heads "$M_N_KV_HEADS" --ffn-dim "$M_FFN_DIM" --rope-theta "$M_ROPE_THETA" --norm-eps "$M_NORM_EPS"
         --init-std "$M_INIT_STD" --seq-len "$D_SEQ_LEN" --batch-size "$T_BATCH_SIZE" --val-fraction "$D_VAL_FRACTION"
         --lr "$T_LR" --weight-decay "$T_WD" --betas $T_BETAS --grad-clip "$T_GRAD_CLIP"
         --warmup-steps "$T_WARMUP" --total-steps 600 --min-lr-ratio "$T_MINLR")
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

TOKENS_FILE=""   # the token cache qforge reports using; handed to the PyTorch side
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"

now_ns() { date +%s%N; }

# CPU share used by other processes over 1 s (we run nothing in between measurements).
busy_frac() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  awk -v u="$(( b[1]+b[2]+b[3]+b[6]+b[7]+b[8] - a[1]-a[2]-a[3]-a[6]-a[7]-a[8] ))" \
      -v t="$(( b[1]+b[2]+b[3]+b[4]+b[5]+b[6]+b[7]+b[8] - a[1]-a[2]-a[3]-a[4]-a[5]-a[6]-a[7]-a[8] ))" \
      'BEGIN{printf "%.2f", (t > 0) ? (u / t) : 0}'
}
# Wait (up to QUIET_WAIT s, default 180) until other processes use < QUIET_MAX (default 0.10) of the CPUs.
QUIET_WAIT="${QUIET_WAIT:-180}"
QUIET_MAX="${QUIET_MAX:-0.10}"
BUSY=0
wait_quiet() {
  local waited=0
  BUSY=$(busy_frac)
  while awk -v b="$BUSY" -v m="$QUIET_MAX" 'BEGIN{exit !(b > m)}' && (( waited < QUIET_WAIT )); do
    (( waited == 0 )) && echo "  (machine busy: ${BUSY} of CPU used by others; waiting up to ${QUIET_WAIT}s)" >&2
    sleep 4; waited=$((waited + 5)); BUSY=$(busy_frac)
  done
}
maxrss() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1"; }

run_qforge() {  # rep steps
  local rep=$1 steps=$2 dir="$WORK/qf_r${1}_s${2}" log="$WORK/qf_r${1}_s${2}.log" tv="$WORK/qf_r${1}_s${2}.time"
  rm -rf "$dir"
  wait_quiet
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  local t0 t1; t0=$(now_ns)
  "$TIMEBIN" -v -o "$tv" "$QFORGE" train "$CONFIG" run.out_dir="$dir" trainer.max_steps="$steps" "${QF_ARGS[@]}" \
    > "$log" 2>&1 || { tail -20 "$log" >&2; die "qforge train failed (rep $rep, $steps steps); log above"; }
  t1=$(now_ns)
  local tps; tps=$(sed -n 's/.*finished: steps [0-9]* -> [0-9]*, \([0-9.]*\) tokens\/s.*/\1/p' "$log" | tail -1)
  if [[ "$VOCAB" == 0 ]]; then
    VOCAB=$(sed -n 's/.*, vocab \([0-9]*\) on .*/\1/p' "$log" | head -1)
    [[ -n "$VOCAB" ]] || die "could not read the vocabulary size from $log"
  fi
  if [[ -z "$TOKENS_FILE" ]]; then
    TOKENS_FILE=$(sed -n 's/.*token cache [a-z]* (\(.*\.bin\)).*/\1/p' "$log" | head -1)
  fi
  printf '{"impl":"qforge","rep":%d,"steps":%d,"wall_s":%s,"maxrss_kb":%s,"self_reported_tokens_per_s":%s,"loadavg_1m_before":%s,"busy_before":%s}\n' \
    "$rep" "$steps" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f", (b-a)/1e9}')" "$(maxrss "$tv")" \
    "${tps:-null}" "$load" "$BUSY" >> "$RECORDS"
  printf '  rep %d qforge  %3d steps: %6.2fs  rss %6d MiB  (qforge says %s tok/s, load %s, others %s)\n' "$rep" "$steps" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print (b-a)/1e9}')" $(( $(maxrss "$tv") / 1024 )) "${tps:-?}" "$load" "$BUSY"
}

run_python() {  # rep steps
  local rep=$1 steps=$2 log="$WORK/py_r${1}_s${2}.json" tv="$WORK/py_r${1}_s${2}.time"
  local tok=(); [[ -n "$TOKENS_FILE" ]] && tok=(--tokens "$TOKENS_FILE")
  wait_quiet
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  local t0 t1; t0=$(now_ns)
  "$TIMEBIN" -v -o "$tv" "$PYTHON" bench/train_throughput.py --steps "$steps" --vocab-size "$VOCAB" "${PY_ARGS[@]}" "${tok[@]}" \
    > "$log" 2> "$log.err" || { cat "$log.err" >&2; die "PyTorch reference failed (rep $rep, $steps steps)"; }
  t1=$(now_ns)
  "$PYTHON" - "$log" "$rep" "$steps" "$t0" "$t1" "$(maxrss "$tv")" "$load" "$BUSY" >> "$RECORDS" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print(json.dumps({"impl": "pytorch", "rep": int(sys.argv[2]), "steps": int(sys.argv[3]),
                  "wall_s": round((int(sys.argv[5]) - int(sys.argv[4])) / 1e9, 4), "maxrss_kb": int(sys.argv[6]),
                  "self_reported_tokens_per_s": j["tokens_per_s_loop"],
                  "in_loop_steady_tokens_per_s": j["tokens_per_s_steady"], "data": j["data"], "params": j["params"],
                  "loadavg_1m_before": float(sys.argv[7]), "busy_before": float(sys.argv[8])}))
EOF
  printf '  rep %d pytorch %3d steps: %6.2fs  rss %6d MiB  (in-loop %s tok/s, load %s, others %s)\n' "$rep" "$steps" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print (b-a)/1e9}')" $(( $(maxrss "$tv") / 1024 )) \
    "$("$PYTHON" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["tokens_per_s_loop"]))' "$log")" "$load" "$BUSY"
}

if pgrep -x cc1plus >/dev/null 2>&1 || pgrep -x ninja >/dev/null 2>&1; then
  echo "train_throughput: warning: a compiler/ninja is running; timings will be noisy (see loadavg in the results)" >&2
fi
echo "train_throughput: $REPS reps x {qforge, pytorch} x {$STEPS_A, $STEPS_B} steps, $THREADS threads, batch $T_BATCH_SIZE x $D_SEQ_LEN"
T_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for ((rep = 1; rep <= REPS; rep++)); do
  for steps in "$STEPS_A" "$STEPS_B"; do
    if (( rep % 2 == 1 )); then run_qforge "$rep" "$steps"; run_python "$rep" "$steps"
    else run_python "$rep" "$steps"; run_qforge "$rep" "$steps"; fi
  done
done

QF_CMD="$QFORGE train $CONFIG run.out_dir=<tmp> trainer.max_steps=<N> ${QF_ARGS[*]}"
PY_CMD="$PYTHON bench/train_throughput.py --steps <N> --vocab-size $VOCAB ${PY_ARGS[*]} ${TOKENS_FILE:+--tokens $TOKENS_FILE}"
"$PYTHON" - "$RECORDS" "$OUT" <<EOF
import json, os, platform, statistics, subprocess, sys, datetime, hashlib
import torch
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
A, B, reps = $STEPS_A, $STEPS_B, $REPS
tok_per_step = $T_BATCH_SIZE * $D_SEQ_LEN
def get(impl, rep, steps):
    return next(r for r in recs if r["impl"] == impl and r["rep"] == rep and r["steps"] == steps)
per_rep = []
for rep in range(1, reps + 1):
    row = {"rep": rep}
    for impl in ("qforge", "pytorch"):
        a, b = get(impl, rep, A), get(impl, rep, B)
        dt = b["wall_s"] - a["wall_s"]
        row[impl] = {"wall_s": {str(A): a["wall_s"], str(B): b["wall_s"]},
                     "step_s": dt / (B - A),
                     "tokens_per_s": (B - A) * tok_per_step / dt if dt > 0 else None,
                     "peak_rss_mib": b["maxrss_kb"] / 1024,
                     "self_reported_tokens_per_s": b.get("self_reported_tokens_per_s"),
                     "loadavg_1m_before": [a["loadavg_1m_before"], b["loadavg_1m_before"]],
                     "others_cpu_share_before": [a["busy_before"], b["busy_before"]]}
        if impl == "pytorch":
            row[impl]["in_loop_steady_tokens_per_s"] = b["in_loop_steady_tokens_per_s"]
            row[impl]["data"] = b["data"]
    q, p = row["qforge"]["tokens_per_s"], row["pytorch"]["tokens_per_s"]
    row["ratio"] = q / p if q and p else None
    per_rep.append(row)
def med(impl, key):
    v = [r[impl][key] for r in per_rep if r[impl][key] is not None]
    return statistics.median(v) if v else None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
qf = os.path.join("$ROOT", "$QFORGE") if not os.path.isabs("$QFORGE") else "$QFORGE"
summary = {
    "qforge_tokens_per_s": med("qforge", "tokens_per_s"),
    "pytorch_tokens_per_s": med("pytorch", "tokens_per_s"),
    "qforge_peak_rss_mib": med("qforge", "peak_rss_mib"),
    "pytorch_peak_rss_mib": med("pytorch", "peak_rss_mib"),
    "qforge_self_reported_tokens_per_s": med("qforge", "self_reported_tokens_per_s"),
    "pytorch_in_loop_tokens_per_s": med("pytorch", "self_reported_tokens_per_s"),
}
if not (summary["qforge_tokens_per_s"] and summary["pytorch_tokens_per_s"]):
    sys.exit("train_throughput: no valid repetition (wall time did not grow with steps: machine too noisy?)")
summary["ratio_of_medians"] = summary["qforge_tokens_per_s"] / summary["pytorch_tokens_per_s"]
summary["median_of_per_rep_ratios"] = statistics.median([r["ratio"] for r in per_rep if r["ratio"]])
summary["rss_ratio_qforge_over_pytorch"] = summary["qforge_peak_rss_mib"] / summary["pytorch_peak_rss_mib"]
summary["goal"] = "qforge >= 1.3x PyTorch eager tokens/s on the demo model"
summary["goal_met"] = summary["ratio_of_medians"] >= 1.3
out = {
    "benchmark": "train_throughput",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "started": "$T_START",
    "machine": {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
                "mem_total_kb": int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))},
    "software": {"torch": torch.__version__, "python": platform.python_version(),
                 "qforge_binary": qf, "qforge_binary_sha256": hashlib.sha256(open(qf, "rb").read()).hexdigest(),
                 "qforge_libtorch": "same libtorch as the venv torch (build/CMakeCache.txt Torch_DIR)"},
    "setup": {"config": "$CONFIG", "model": {"family": "$FAMILY", "dim": $M_DIM, "n_layers": $M_N_LAYERS,
              "n_heads": $M_N_HEADS, "n_kv_heads": $M_N_KV_HEADS, "ffn_dim": $M_FFN_DIM, "vocab_size": $VOCAB,
              "tie_embeddings": True, "params": next(r["params"] for r in recs if r["impl"] == "pytorch")},
              "seq_len": $D_SEQ_LEN, "batch_size": $T_BATCH_SIZE, "tokens_per_step": tok_per_step,
              "threads": $THREADS, "precision": "fp32", "reps": reps, "steps": [A, B],
              "data": "qforge's own token cache ($TOKENS_FILE) read by both sides",
              "method": ("whole-process wall time for %d and %d steps per side; tokens/s = (%d-%d)*%d / (wall_%d - wall_%d); "
                         "setup, evals, checkpointing and warm-up steps cancel. Peak RSS = GNU time max RSS of the %d-step "
                         "process. Reps interleaved, order alternating.") % (A, B, B, A, tok_per_step, B, A, B)},
    "command": {"bench": "REPS=%d STEPS_A=%d STEPS_B=%d THREADS=$THREADS bench/train_throughput.sh" % (reps, A, B),
                "qforge": "$QF_CMD", "pytorch": "$PY_CMD", "timer": "/usr/bin/time -v"},
    "per_rep": per_rep,
    "median": summary,
}
json.dump(out, open(sys.argv[2], "w"), indent=2)
s = summary
print()
print("| impl | median tokens/s (steady, %d->%d steps) | peak RSS (MiB) | ratio vs PyTorch |" % (A, B))
print("|---|---:|---:|---:|")
print("| qforge train | %.0f | %.0f | %.2fx |" % (s["qforge_tokens_per_s"], s["qforge_peak_rss_mib"], s["ratio_of_medians"]))
print("| PyTorch eager (torch %s) | %.0f | %.0f | 1.00x |" % (torch.__version__, s["pytorch_tokens_per_s"], s["pytorch_peak_rss_mib"]))
print()
print("per-rep ratios: " + ", ".join("%.2f" % r["ratio"] for r in per_rep if r["ratio"]) +
      "; goal >= 1.3x: " + ("met" if s["goal_met"] else "NOT met"))
print("results: " + sys.argv[2])
EOF
