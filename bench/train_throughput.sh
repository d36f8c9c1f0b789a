#!/usr/bin/env bash
# Training throughput + peak RSS: `qforge train` vs an eager PyTorch loop (bench/train_throughput.py)
# on the demo model (configs/tiny_pretrain.yaml), same shape / batch / data / threads.
#
# Both sides run as whole processes, STEPS_A and STEPS_B optimizer steps each, every rep; each writes
# one metrics line per step (qforge: trainer.log_every=1, PyTorch: --metrics) which bench/step_clock.py
# timestamps from outside. Two steady-state tokens/s numbers, measured identically for both sides:
#   step  = batch*seq_len / median step time of the STEPS_B run, steps <= SKIP (3) excluded
#           (robust to other processes stealing the CPU for a while: the headline number);
#   wall  = (STEPS_B - STEPS_A)*batch*seq_len / (wall_B - wall_A): everything that does not scale
#           with steps (process start, torch load, data load, model init, qforge's step-0 and final
#           eval and its final checkpoint, warm-up) cancels; sensitive to any interference.
# Peak RSS = /usr/bin/time "Maximum resident set size" of the STEPS_B process.
# Reps are interleaved (qforge/PyTorch order alternates per rep); medians over reps are reported.
# Before each process the script waits (up to QUIET_WAIT s) for other processes to go quiet; it
# records the CPU share other processes used during each run (others_cpu_share) and redoes a run
# (up to RETRIES times) when that share exceeds NOISY_MAX.
#
# Usage: bench/train_throughput.sh   (env: REPS=3 STEPS_A=40 STEPS_B=80 THREADS=2 SKIP=3 QUIET_WAIT=120
#                                     QUIET_MAX=0.10 NOISY_MAX=0.10 RETRIES=2
#                                     QFORGE=build/qforge PYTHON=.venv/bin/python CONFIG=configs/tiny_pretrain.yaml
#                                     OUT=bench/results/train_throughput.json)
# Builds nothing: build/qforge must exist (cmake --build build --target qforge).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

REPS="${REPS:-3}"
STEPS_A="${STEPS_A:-40}"
STEPS_B="${STEPS_B:-80}"
THREADS="${THREADS:-2}"
SKIP="${SKIP:-3}"
QUIET_WAIT="${QUIET_WAIT:-120}"
QUIET_MAX="${QUIET_MAX:-0.10}"
NOISY_MAX="${NOISY_MAX:-0.10}"   # a run during which others used more than this share of the CPUs is redone,
RETRIES="${RETRIES:-2}"          # at most RETRIES times (then kept, and flagged by others_cpu_share)
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
(( STEPS_B > STEPS_A && STEPS_A > SKIP + 1 )) || die "need STEPS_B > STEPS_A > SKIP+1 (got $STEPS_A, $STEPS_B, $SKIP)"
"$PYTHON" -c 'import torch, numpy' 2>/dev/null || die "$PYTHON cannot import torch and numpy"

WORK="$(mktemp -d /tmp/qf_bench_tt.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"

# Shape from the resolved recipe, so the PyTorch side follows the config (vocab 0 = from the tokenizer).
"$QFORGE" train "$CONFIG" --print-config > "$WORK/resolved.yaml" || die "qforge could not resolve $CONFIG"
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
for k in ["max_steps", "batch_size", "grad_accum", "grad_clip", "precision"]:
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

# The recipe's max_steps stays the cosine horizon, so the lr schedule is the recipe's whatever N is.
QF_ARGS=(run.threads="$THREADS" trainer.schedule.total_steps="$T_MAX_STEPS" trainer.eval_every=0
         trainer.eval_batches=1 trainer.save_every=0 trainer.log_every=1 sample.prompts=[] trainer.resume=never)
PY_ARGS=(--threads "$THREADS" --skip "$SKIP" --dim "$M_DIM" --n-layers "$M_N_LAYERS" --n-heads "$M_N_HEADS"
         --n-kv-heads "$M_N_KV_HEADS" --ffn-dim "$M_FFN_DIM" --rope-theta "$M_ROPE_THETA" --norm-eps "$M_NORM_EPS"
         --init-std "$M_INIT_STD" --seq-len "$D_SEQ_LEN" --batch-size "$T_BATCH_SIZE" --val-fraction "$D_VAL_FRACTION"
         --lr "$T_LR" --weight-decay "$T_WD" --betas $T_BETAS --grad-clip "$T_GRAD_CLIP"
         --warmup-steps "$T_WARMUP" --total-steps "$T_MAX_STEPS" --min-lr-ratio "$T_MINLR")
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

TOKENS_FILE=""   # the token cache qforge reports using; handed to the PyTorch side
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"

# Share of all CPUs used (by anyone: we run nothing meanwhile) over 1 s.
# shellcheck source=bench/quiet.sh
source "$ROOT/bench/quiet.sh"

run_one() {  # impl rep steps
  local impl=$1 rep=$2 steps=$3 tag="$WORK/${1}_r${2}_s${3}"
  local cmd
  if [[ $impl == qforge ]]; then
    rm -rf "$tag.run"
    cmd=("$QFORGE" train "$CONFIG" run.out_dir="$tag.run" trainer.max_steps="$steps" "${QF_ARGS[@]}")
    metrics="$tag.run/metrics.jsonl"
  else
    cmd=("$PYTHON" bench/train_throughput.py --steps "$steps" --vocab-size "$VOCAB" "${PY_ARGS[@]}"
         ${TOKENS_FILE:+--tokens "$TOKENS_FILE"} --metrics "$tag.metrics.jsonl")
    metrics="$tag.metrics.jsonl"
  fi
  local try others
  for ((try = 0; ; try++)); do
    wait_quiet
    [[ $impl == qforge ]] && rm -rf "$tag.run"
    "$PYTHON" bench/step_clock.py --metrics "$metrics" --out "$tag.json" --log "$tag.log" -- "${cmd[@]}" \
      || { tail -20 "$tag.log" >&2; die "$impl failed (rep $rep, $steps steps); log above"; }
    others=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["others_cpu_share"] or 0)' "$tag.json")
    awk -v o="$others" -v m="$NOISY_MAX" 'BEGIN{exit !(o > m)}' && (( try < RETRIES )) || break
    echo "  (rep $rep $impl $steps steps: other processes used $others of the CPUs meanwhile; retrying)" >&2
  done
  if [[ $impl == qforge && "$VOCAB" == 0 ]]; then
    VOCAB=$(sed -n 's/.*, vocab \([0-9]*\) on .*/\1/p' "$tag.log" | head -1)
    [[ -n "$VOCAB" ]] || die "could not read the vocabulary size from $tag.log"
  fi
  if [[ $impl == qforge && -z "$TOKENS_FILE" ]]; then
    TOKENS_FILE=$(sed -n 's/.*token cache [a-z]* (\(.*\.bin\)).*/\1/p' "$tag.log" | head -1)
  fi
  "$PYTHON" - "$impl" "$rep" "$steps" "$tag" "$BUSY" "$SKIP" "$T_BATCH_SIZE" "$D_SEQ_LEN" >> "$RECORDS" <<'EOF'
import json, re, statistics, sys
impl, rep, steps, tag, busy, skip, bs, sl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
r = json.load(open(tag + ".json"))
log = open(tag + ".log", errors="replace").read()
t = {int(k): v for k, v in r["step_t"].items()}
if sorted(t) != list(range(1, steps + 1)):
    sys.exit("step_clock saw steps %s..., expected 1..%d" % (sorted(t)[:5], steps))
dts = [t[k] - t[k - 1] for k in range(skip + 1, steps + 1)]
rec = {"impl": impl, "rep": rep, "steps": steps, "wall_s": r["wall_s"], "maxrss_kb": r.get("maxrss_kb"),
       "user_s": r.get("user_s"), "sys_s": r.get("sys_s"), "others_cpu_share": r["others_cpu_share"],
       "others_cpu_share_before": busy, "step_s_median": statistics.median(dts),
       "step_s_min": min(dts), "step_s_max": max(dts), "first_step_line_s": t[1], "last_step_line_s": t[steps]}
rec["step_tokens_per_s"] = bs * sl / rec["step_s_median"]
if impl == "qforge":
    m = re.findall(r"finished: steps \d+ -> \d+, ([0-9.]+) tokens/s", log)
    rec["self_reported_tokens_per_s"] = float(m[-1]) if m else None
else:
    j = json.loads([l for l in log.splitlines() if l.startswith("{")][-1])
    rec["self_reported_tokens_per_s"] = j["tokens_per_s_loop"]
    rec["in_loop_steady_tokens_per_s"] = j["tokens_per_s_steady"]
    rec["data"], rec["params"] = j["data"], j["params"]
print(json.dumps(rec))
sys.stderr.write("  rep %d %-7s %3d steps: wall %6.2fs  median step %.3fs (%5.0f tok/s)  rss %5.0f MiB  others %.2f\n" % (
    rep, impl, steps, rec["wall_s"], rec["step_s_median"], rec["step_tokens_per_s"], (rec["maxrss_kb"] or 0) / 1024,
    rec["others_cpu_share"] or 0))
EOF
}

if pgrep -x cc1plus >/dev/null 2>&1 || pgrep -x ninja >/dev/null 2>&1 || pgrep -x ctest >/dev/null 2>&1; then
  echo "train_throughput: warning: a compiler/ninja/ctest is running; timings may be noisy (others_cpu_share in the results)" >&2
fi
echo "train_throughput: $REPS reps x {qforge, pytorch} x {$STEPS_A, $STEPS_B} steps, $THREADS threads, batch $T_BATCH_SIZE x $D_SEQ_LEN"
T_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for ((rep = 1; rep <= REPS; rep++)); do
  for steps in "$STEPS_A" "$STEPS_B"; do
    if (( rep % 2 == 1 )); then run_one qforge "$rep" "$steps"; run_one pytorch "$rep" "$steps"
    else run_one pytorch "$rep" "$steps"; run_one qforge "$rep" "$steps"; fi
  done
done

QF_CMD="$QFORGE train $CONFIG run.out_dir=<tmp> trainer.max_steps=<N> ${QF_ARGS[*]}"
PY_CMD="$PYTHON bench/train_throughput.py --steps <N> --vocab-size $VOCAB ${PY_ARGS[*]} ${TOKENS_FILE:+--tokens $TOKENS_FILE} --metrics <tmp>"
export QF_CMD PY_CMD T_START ROOT QFORGE CONFIG THREADS REPS STEPS_A STEPS_B SKIP VOCAB TOKENS_FILE
export M_DIM M_N_LAYERS M_N_HEADS M_N_KV_HEADS M_FFN_DIM D_SEQ_LEN T_BATCH_SIZE
"$PYTHON" - "$RECORDS" "$OUT" <<'EOF'
import datetime, hashlib, json, os, platform, statistics, sys
import torch
E = os.environ
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
A, B, reps, skip = int(E["STEPS_A"]), int(E["STEPS_B"]), int(E["REPS"]), int(E["SKIP"])
tok_per_step = int(E["T_BATCH_SIZE"]) * int(E["D_SEQ_LEN"])
get = lambda impl, rep, steps: next(r for r in recs if r["impl"] == impl and r["rep"] == rep and r["steps"] == steps)
per_rep = []
for rep in range(1, reps + 1):
    row = {"rep": rep}
    for impl in ("qforge", "pytorch"):
        a, b = get(impl, rep, A), get(impl, rep, B)
        dt = b["wall_s"] - a["wall_s"]
        row[impl] = {"step_tokens_per_s": b["step_tokens_per_s"], "step_s_median": b["step_s_median"],
                     "wall_tokens_per_s": (B - A) * tok_per_step / dt if dt > 0 else None,
                     "wall_s": {str(A): a["wall_s"], str(B): b["wall_s"]},
                     "peak_rss_mib": b["maxrss_kb"] / 1024,
                     "cpu_s": {str(A): a["user_s"] + a["sys_s"], str(B): b["user_s"] + b["sys_s"]},
                     "self_reported_tokens_per_s": b["self_reported_tokens_per_s"],
                     "others_cpu_share": {str(A): a["others_cpu_share"], str(B): b["others_cpu_share"]}}
        if impl == "pytorch":
            row[impl]["in_loop_steady_tokens_per_s"] = b["in_loop_steady_tokens_per_s"]
    for k in ("step", "wall"):
        q, p = row["qforge"][k + "_tokens_per_s"], row["pytorch"][k + "_tokens_per_s"]
        row[k + "_ratio"] = q / p if q and p else None
    per_rep.append(row)
def med(impl, key):
    v = [r[impl][key] for r in per_rep if r[impl][key] is not None]
    return statistics.median(v) if v else None
def medr(key):
    v = [r[key] for r in per_rep if r[key] is not None]
    return statistics.median(v) if v else None
s = {k: med(impl, key) for k, impl, key in [
    ("qforge_tokens_per_s", "qforge", "step_tokens_per_s"), ("pytorch_tokens_per_s", "pytorch", "step_tokens_per_s"),
    ("qforge_wall_tokens_per_s", "qforge", "wall_tokens_per_s"), ("pytorch_wall_tokens_per_s", "pytorch", "wall_tokens_per_s"),
    ("qforge_peak_rss_mib", "qforge", "peak_rss_mib"), ("pytorch_peak_rss_mib", "pytorch", "peak_rss_mib"),
    ("qforge_self_reported_tokens_per_s", "qforge", "self_reported_tokens_per_s"),
    ("pytorch_in_loop_tokens_per_s", "pytorch", "self_reported_tokens_per_s")]}
s["ratio"] = s["qforge_tokens_per_s"] / s["pytorch_tokens_per_s"]
s["ratio_per_rep_median"] = medr("step_ratio")
s["wall_ratio"] = (s["qforge_wall_tokens_per_s"] / s["pytorch_wall_tokens_per_s"]
                   if s["qforge_wall_tokens_per_s"] and s["pytorch_wall_tokens_per_s"] else None)
s["wall_ratio_per_rep_median"] = medr("wall_ratio")
s["rss_ratio_qforge_over_pytorch"] = s["qforge_peak_rss_mib"] / s["pytorch_peak_rss_mib"]
s["max_others_cpu_share"] = max(r["others_cpu_share"] or 0 for r in recs)
s["goal"] = "qforge >= 1.3x PyTorch eager tokens/s on the demo model"
s["goal_met"] = s["ratio"] >= 1.3
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
qf = E["QFORGE"] if os.path.isabs(E["QFORGE"]) else os.path.join(E["ROOT"], E["QFORGE"])
pyrec = next(r for r in recs if r["impl"] == "pytorch")
out = {
    "benchmark": "train_throughput",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "started": E["T_START"],
    "machine": {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
                "mem_total_kb": int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))},
    "software": {"torch": torch.__version__, "python": platform.python_version(), "qforge_binary": qf,
                 "qforge_binary_sha256": hashlib.sha256(open(qf, "rb").read()).hexdigest(),
                 "qforge_binary_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(qf), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
    "setup": {"config": E["CONFIG"],
              "model": {"family": "llama", "dim": int(E["M_DIM"]), "n_layers": int(E["M_N_LAYERS"]),
                        "n_heads": int(E["M_N_HEADS"]), "n_kv_heads": int(E["M_N_KV_HEADS"]),
                        "ffn_dim": int(E["M_FFN_DIM"]), "vocab_size": int(E["VOCAB"]), "tie_embeddings": True,
                        "params": pyrec["params"]},
              "seq_len": int(E["D_SEQ_LEN"]), "batch_size": int(E["T_BATCH_SIZE"]), "tokens_per_step": tok_per_step,
              "threads": int(E["THREADS"]), "precision": "fp32", "reps": reps, "steps": [A, B], "skip": skip,
              "data": "both sides train on qforge's own packed token ids (%s); batches drawn independently" % pyrec["data"],
              "method": {
                  "tokens_per_s (headline)": "tokens_per_step / median time between consecutive per-step metrics lines of the %d-step run (steps <= %d excluded), timed from outside by bench/step_clock.py" % (B, skip),
                  "wall_tokens_per_s": "(%d - %d) * tokens_per_step / (wall_%d - wall_%d), whole-process wall times" % (B, A, B, A),
                  "peak_rss": "GNU time 'Maximum resident set size' of the %d-step process" % B,
                  "order": "reps interleaved, qforge/pytorch order alternating per rep; medians over reps"}},
    "command": {"bench": "REPS=%d STEPS_A=%d STEPS_B=%d THREADS=%s SKIP=%d bench/train_throughput.sh" % (reps, A, B, E["THREADS"], skip),
                "qforge": E["QF_CMD"], "pytorch": E["PY_CMD"],
                "timer": ".venv/bin/python bench/step_clock.py --metrics <metrics.jsonl> --out <json> -- /usr/bin/time -v <cmd>"},
    "per_rep": per_rep,
    "runs": recs,
    "median": s,
}
json.dump(out, open(sys.argv[2], "w"), indent=2)
f = lambda v, fmt="%.0f": fmt % v if v is not None else "n/a"
print()
print("| | qforge train | PyTorch eager (torch %s) | qforge / PyTorch |" % torch.__version__)
print("|---|---:|---:|---:|")
print("| tokens/s, median step (headline) | %s | %s | %sx |" % (f(s["qforge_tokens_per_s"]), f(s["pytorch_tokens_per_s"]), f(s["ratio"], "%.2f")))
print("| tokens/s, wall %d->%d steps | %s | %s | %sx |" % (A, B, f(s["qforge_wall_tokens_per_s"]), f(s["pytorch_wall_tokens_per_s"]), f(s["wall_ratio"], "%.2f")))
print("| peak RSS (MiB) | %s | %s | %sx |" % (f(s["qforge_peak_rss_mib"]), f(s["pytorch_peak_rss_mib"]), f(s["rss_ratio_qforge_over_pytorch"], "%.2f")))
print()
print("per-rep ratios (step): " + ", ".join(f(r["step_ratio"], "%.2f") for r in per_rep) +
      "; (wall): " + ", ".join(f(r["wall_ratio"], "%.2f") for r in per_rep) +
      "; max CPU share used by other processes during a run: %.2f" % s["max_others_cpu_share"])
print("goal qforge >= 1.3x: " + ("met" if s["goal_met"] else "NOT met") + "; results: " + sys.argv[2])
EOF
