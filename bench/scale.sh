#!/usr/bin/env bash
# Scale: QLoRA and QAT of 1B-8B checkpoints within a memory budget (issue 19, item 5). qforge vs
# transformers + PEFT + bitsandbytes (CPU 4-bit NF4), both with activation (gradient) checkpointing,
# on random-init Llama checkpoints that transformers writes (bench/scale/make_ckpt.py).
#
# Parts (PARTS, default "qlora fit 8b qat"):
#   qlora  Llama-3.2-1B shape, QLoRA r16/alpha 32 on all 7 decoder linears, NF4 base (blocksize 64,
#          double quant), bf16 compute, batch 1: peak RSS and step time at SEQS (512 2048 8192), both
#          sides, REPS reps (REPS_LONG for seq >= LONG_SEQ), STEPS steps per run (median of steps 2..N).
#   fit    per side: peak RSS = a + b*seq (+ c*seq^2 when the quadratic term matters) over the qlora
#          points (+ FIT_SEQS), solved for the longest seq within BUDGET_GIB (16 GiB); the step time is
#          fitted the same way. The predicted maximum is then verified with one 1-step run per side when
#          VERIFY=1, or VERIFY=auto (default) and STEPS_VERIFY x the predicted step time is <= VERIFY_MAX_S.
#          The fit uses each run's high-water mark through step 2 (RSS creeps up over the first steps).
#   8b     Llama-3.1-8B shape (checkpoint streamed to disk, see make_ckpt.py): load peak and one QLoRA
#          step's peak at seq 512 (STEPS_8B steps), both sides.
#   qat    1B shape, full-parameter QAT (int4-g32 fake quant on the decoder linears, fp32 master weights,
#          bf16 autocast), seq QAT_SEQ: peak RSS with AdamW (fp32 state) vs 8-bit AdamW
#          (trainer.optim.name=adamw8bit). qforge only.
#
# qforge's memory keys (NEW_KEYS): trainer.activation_checkpointing=true,
# trainer.activation_checkpointing_every=$AC_EVERY, trainer.loss_chunk_tokens=$LOSS_CHUNK (when set;
# else the binary's default) and, for the qat part, trainer.optim.name=adamw8bit.
#   NEW_KEYS=require (default)  every key must be known to the binary, or the bench stops;
#   NEW_KEYS=auto               keys the binary refuses are left out (recorded in the JSON; the 8-bit
#                               QAT row is skipped without adamw8bit);
#   NEW_KEYS=off                none (today's qforge: no checkpointing, full logits).
#
# Measurement (one configuration per process): the peer (bench/scale/peer.py) reports its own
# ru_maxrss after loading and at the end; qforge runs under bench/scale/qf_run.py, which polls VmHWM
# and timestamps the per-step metrics lines (load peak = before step 1, step peak = at the last step,
# before the final checkpoint write). Every process is killed past RSS_CAP_MIB (the machine has
# 24 GiB and other users), which is recorded. Each record carries the 1-min load average.
#
# Usage:   bench/scale.sh                         # the full run (hours on 2 cores, see bench/README.md)
#          SMOKE=1 NEW_KEYS=auto bench/scale.sh   # tiny shape (hidden 256, 2 layers, vocab 128256), ~3 min
#          PARTS=qlora SIDES=peer SEQS="512 2048" bench/scale.sh
# Env (defaults): SMOKE=0 PARTS SIDES="qforge peer" SEQS="512 2048 8192" REPS=3 REPS_LONG=1
#   LONG_SEQ=8192 STEPS=4 STEPS_LONG=2 STEPS_8B=1 STEPS_VERIFY=2 FIT_SEQS="" BUDGET_GIB=16 VERIFY=auto
#   VERIFY_MAX_S=3600 QAT_SEQ=512 QAT_STEPS=2 QF_EXTRA= (more key=value for every qforge run) NEW_KEYS=require AC_EVERY=1 LOSS_CHUNK= THREADS=2
#   RSS_CAP_MIB=min(21504, MemTotal-1.5 GiB) CACHE=.cache/scale BUILD=1 QFORGE=build/qforge
#   PYTHON=.venv/bin/python BENCH_VENV=.cache/bench-venv OUT=bench/results/scale.json
#   (PNG: OUT with .png) RECORDS=$CACHE/records[-smoke].jsonl RESUME=1 (skip runs already in RECORDS)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE="${SMOKE:-0}"
PARTS="${PARTS:-qlora fit 8b qat}"; SIDES="${SIDES:-qforge peer}"
if [[ $SMOKE == 1 ]]; then
  SHAPE=tiny; SHAPE8=tiny; SEQS="${SEQS:-128 256 512}"; LONG_SEQ="${LONG_SEQ:-512}"; REPS="${REPS:-2}"
  QAT_SEQ="${QAT_SEQ:-128}"; SEQ8="${SEQ8:-128}"; BUDGET_GIB="${BUDGET_GIB:-1.5}"
  OUT="${OUT:-/tmp/qf_scale_smoke.json}"; TAG=-smoke
else
  SHAPE=1b; SHAPE8=8b; SEQS="${SEQS:-512 2048 8192}"; LONG_SEQ="${LONG_SEQ:-8192}"; REPS="${REPS:-3}"
  QAT_SEQ="${QAT_SEQ:-512}"; SEQ8="${SEQ8:-512}"; BUDGET_GIB="${BUDGET_GIB:-16}"
  OUT="${OUT:-bench/results/scale.json}"; TAG=
fi
REPS_LONG="${REPS_LONG:-1}"; STEPS="${STEPS:-4}"; STEPS_LONG="${STEPS_LONG:-2}"; STEPS_8B="${STEPS_8B:-1}"; STEPS_VERIFY="${STEPS_VERIFY:-2}"
FIT_SEQS="${FIT_SEQS:-}"; VERIFY="${VERIFY:-auto}"; VERIFY_MAX_S="${VERIFY_MAX_S:-3600}"; QAT_STEPS="${QAT_STEPS:-2}"
QF_EXTRA="${QF_EXTRA:-}"; NEW_KEYS="${NEW_KEYS:-require}"; AC_EVERY="${AC_EVERY:-1}"; LOSS_CHUNK="${LOSS_CHUNK:-}"; THREADS="${THREADS:-2}"
MEM_TOTAL_MIB=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 ))
DEFAULT_CAP=$(( MEM_TOTAL_MIB - 1536 )); (( DEFAULT_CAP > 21504 )) && DEFAULT_CAP=21504
RSS_CAP_MIB="${RSS_CAP_MIB:-$DEFAULT_CAP}"
CACHE="${CACHE:-.cache/scale}"; BUILD="${BUILD:-1}"; QFORGE="${QFORGE:-build/qforge}"
PYTHON="${PYTHON:-.venv/bin/python}"; BENCH_VENV="${BENCH_VENV:-.cache/bench-venv}"
RECORDS="${RECORDS:-$CACHE/records$TAG.jsonl}"; RESUME="${RESUME:-1}"
CORPUS="${CORPUS:-data/corpora/kjv.txt}"
die() { echo "scale: $*" >&2; exit 1; }
mkdir -p "$CACHE" "$(dirname "$OUT")"
CACHE="$(cd "$CACHE" && pwd)"
RUNS="$CACHE/runs$TAG"; mkdir -p "$RUNS"
touch "$RECORDS"
[[ $RESUME == 1 ]] || : > "$RECORDS"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

# ---- build, tools, checkpoints --------------------------------------------------------------------
if [[ $BUILD == 1 && " $SIDES " == *" qforge "* ]]; then
  echo "scale: cmake --build build --target qforge"
  cmake --build build -j "$THREADS" --target qforge > "$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; die "build failed"; }
fi
[[ " $SIDES " != *" qforge "* || -x "$QFORGE" ]] || die "$QFORGE missing (make build)"
"$PYTHON" -c 'import transformers, peft, bitsandbytes, tokenizers, safetensors' 2>/dev/null \
  || die "$PYTHON lacks transformers/peft/bitsandbytes (scripts/setup.sh)"
[[ -f $CORPUS ]] || die "$CORPUS missing (scripts/setup.sh extracts Debian's bible-kjv)"
if [[ ! -x $BENCH_VENV/bin/python ]] || ! "$BENCH_VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "scale: bench-only venv for the plot: $BENCH_VENV (bench/requirements.txt)"
  python3 -m venv "$BENCH_VENV" && "$BENCH_VENV/bin/pip" install -q -r bench/requirements.txt \
    || echo "scale: could not install matplotlib; the JSON is written without the plot" >&2
fi
ckpt() {  # shape [name [make_ckpt args...]] -> dir (made once)
  local shape=$1 d="$CACHE/ckpt-${2:-$1}"; shift; shift || true
  if [[ ! -f $d/make_ckpt.json ]]; then
    echo "scale: writing the $shape checkpoint to $d" >&2
    "$PYTHON" bench/scale/make_ckpt.py "$d" --shape "$shape" --tokenizer-corpus "$CORPUS" "$@" >&2 || die "make_ckpt $shape failed"
  fi
  echo "$d"
}
CK=$(ckpt "$SHAPE")

# ---- qforge's memory keys ------------------------------------------------------------------------
key_known() { "$QFORGE" train configs/tiny_pretrain.yaml --print-config "$1" > /dev/null 2>&1; }
MEM_KEYS=(); KEYS_LEFT_OUT=(); OPT8_KEY=()
if [[ " $SIDES " == *" qforge "* && $NEW_KEYS != off ]]; then
  want=(trainer.activation_checkpointing=true trainer.activation_checkpointing_every="$AC_EVERY")
  [[ -n $LOSS_CHUNK ]] && want+=(trainer.loss_chunk_tokens="$LOSS_CHUNK")
  for k in "${want[@]}" trainer.optim.name=adamw8bit; do
    if key_known "$k"; then
      [[ $k == trainer.optim.name=* ]] && OPT8_KEY=("$k") || MEM_KEYS+=("$k")
    elif [[ $NEW_KEYS == require ]]; then
      die "$QFORGE does not know $k (NEW_KEYS=auto leaves unknown keys out, NEW_KEYS=off all of them)"
    else
      KEYS_LEFT_OUT+=("$k")
    fi
  done
fi
echo "scale: qforge memory keys: ${MEM_KEYS[*]:-none}${KEYS_LEFT_OUT:+ (left out, unknown to the binary: ${KEYS_LEFT_OUT[*]})}"

# ---- one run -------------------------------------------------------------------------------------
have() { grep -q "\"key\": \"$1\"" "$RECORDS"; }
record() {  # key part impl shape seq rep steps raw.json [extra json]
  "$PYTHON" - "$@" >> "$RECORDS" <<'PYEOF'
import json, sys
key, part, impl, shape, seq, rep, steps, raw = sys.argv[1:9]
extra = json.loads(sys.argv[9]) if len(sys.argv) > 9 and sys.argv[9] else {}
try:
    txt = open(raw).read().strip()
    try:
        r = json.loads(txt)                   # qf_run.py --out: one indented object
    except ValueError:
        r = json.loads(txt.splitlines()[-1])  # peer.py: the JSON is its last stdout line
except Exception as e:  # noqa: BLE001
    r = {"error": f"no result: {e}"}
print(json.dumps({"key": key, "part": part, "impl": impl, "shape": shape, "seq": int(seq), "rep": int(rep),
                  "steps_asked": int(steps), **extra, "raw": r}))
PYEOF
  tail -1 "$RECORDS" | "$PYTHON" -c 'import json,sys
r=json.loads(sys.stdin.read()); x=r["raw"]
f=lambda v: "-" if v is None else ("%.0f" % v)
print("  %-5s %-7s %-4s seq %6d rep %d: load %s MiB, step peak %s MiB, step %s s%s (load avg %s)" % (r["part"], r["impl"], r["shape"], r["seq"], r["rep"],
  f(x.get("load_peak_rss_mib")), f(x.get("step_peak_rss_mib")), "-" if x.get("step_s_median") is None else "%.2f" % x["step_s_median"],
  " KILLED over cap" if x.get("killed_over_cap") else (" ERROR %s" % (x.get("error") or x.get("rc")) if x.get("error") or x.get("rc") else ""), x.get("loadavg_1m")))' >&2
}
run_peer() {  # part shape ckpt seq steps rep
  local key="$1/peer/$2/$4/$6"; have "$key" && return 0
  local tag="$RUNS/${key//\//_}"
  echo "  [$(date +%T)] peer $2 seq $4 rep $6 ($5 steps)" >&2
  "$PYTHON" bench/scale/peer.py "$3" --seq "$4" --steps "$5" --threads "$THREADS" --kill-above-mib "$RSS_CAP_MIB" \
    > "$tag.json" 2> "$tag.log" || echo "  peer exited $? (see $tag.log)" >&2
  record "$key" "$1" peer "$2" "$4" "$6" "$5" "$tag.json" \
    "{\"command\": \"$PYTHON bench/scale/peer.py $3 --seq $4 --steps $5 --threads $THREADS --kill-above-mib $RSS_CAP_MIB\"}"
}
QF_DATA=("data.sources=[{path: $ROOT/$CORPUS, split: line}]" "data.cache_dir=$CACHE/tokens" run.threads="$THREADS")
run_qforge() {  # part shape ckpt seq steps rep config [extra keys...]
  local part=$1 shape=$2 ck=$3 seq=$4 steps=$5 rep=$6 cfg=$7; shift 7
  local variant=""; [[ $part == qat ]] && variant="/${QAT_OPT}"
  local key="$part/qforge/$shape/$seq/$rep$variant"; have "$key" && return 0
  local tag="$RUNS/${key//\//_}"; rm -rf "$tag.run"
  echo "  [$(date +%T)] qforge $part$variant $shape seq $seq rep $rep ($steps steps)" >&2
  local cmd=("$QFORGE" train "$cfg" model.from="$ck" data.seq_len="$seq" trainer.max_steps="$steps"
             run.out_dir="$tag.run" "${QF_DATA[@]}" "${MEM_KEYS[@]}" $QF_EXTRA "$@")
  "$PYTHON" bench/scale/qf_run.py --metrics "$tag.run/metrics.jsonl" --out "$tag.json" --log "$tag.log" \
    --kill-above-mib "$RSS_CAP_MIB" -- "${cmd[@]}" > /dev/null || echo "  qforge exited $? (see $tag.log)" >&2
  local summary="{}"; [[ -f $tag.run/train_summary.json ]] && summary=$(cat "$tag.run/train_summary.json")
  rm -rf "$tag.run"   # checkpoints: up to the model + optimizer state
  record "$key" "$part" qforge "$shape" "$seq" "$rep" "$steps" "$tag.json" \
    "$("$PYTHON" -c 'import json,sys; print(json.dumps({"command": " ".join(sys.argv[2:]), "variant": sys.argv[1] or None, "train_summary": json.loads(sys.stdin.read())}))' "${variant#/}" "${cmd[@]}" <<< "$summary")"
}

T_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# ---- qlora: the 1B shape at SEQS ------------------------------------------------------------------
if [[ " $PARTS " == *" qlora "* ]]; then
  echo "scale: qlora $SHAPE, seqs $SEQS, sides $SIDES, reps $REPS (seq >= $LONG_SEQ: $REPS_LONG), steps $STEPS/$STEPS_LONG"
  for seq in $SEQS $FIT_SEQS; do
    reps=$REPS; steps=$STEPS
    (( seq >= LONG_SEQ )) && { reps=$REPS_LONG; steps=$STEPS_LONG; }
    [[ " $FIT_SEQS " == *" $seq "* && " $SEQS " != *" $seq "* ]] && { reps=1; steps=1; }
    for ((rep = 1; rep <= reps; rep++)); do
      order="$SIDES"; (( rep % 2 == 0 )) && order=$(echo "$SIDES" | awk '{for(i=NF;i>0;i--) printf "%s ", $i}')
      for side in $order; do
        if [[ $side == peer ]]; then run_peer qlora "$SHAPE" "$CK" "$seq" "$steps" "$rep"
        else run_qforge qlora "$SHAPE" "$CK" "$seq" "$steps" "$rep" bench/scale/qlora.yaml; fi
      done
    done
  done
fi
# ---- fit: the longest seq within the budget ------------------------------------------------------
if [[ " $PARTS " == *" fit "* ]]; then
  for side in $SIDES; do
    pred=$("$PYTHON" bench/scale/summarize.py fit "$RECORDS" --impl "$side" --shape "$SHAPE" --budget-gib "$BUDGET_GIB") || continue
    echo "scale: fit $side: $pred"
    smax=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1]).get("seq_max") or 0)' "$pred")
    pt=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1]).get("step_s_at_seq_max") or 1e18)' "$pred")
    if (( smax > 0 )) && { [[ $VERIFY == 1 ]] || { [[ $VERIFY == auto ]] && "$PYTHON" -c 'import sys; sys.exit(not float(sys.argv[1]) * int(sys.argv[3]) <= float(sys.argv[2]))' "$pt" "$VERIFY_MAX_S" "$STEPS_VERIFY"; }; }; then
      if [[ $side == peer ]]; then run_peer verify "$SHAPE" "$CK" "$smax" "$STEPS_VERIFY" 1
      else run_qforge verify "$SHAPE" "$CK" "$smax" "$STEPS_VERIFY" 1 bench/scale/qlora.yaml; fi
    else
      echo "scale: $side: predicted max seq $smax not verified (VERIFY=$VERIFY, predicted step ${pt}s > VERIFY_MAX_S=$VERIFY_MAX_S)"
    fi
  done
fi
# ---- 8b: load peak and one QLoRA step at SEQ8 ----------------------------------------------------
if [[ " $PARTS " == *" 8b "* ]]; then
  if [[ $SMOKE == 1 ]]; then CK8=$(ckpt tiny tiny-stream --method stream --max-shard-size 40MB)  # the 8b path, sharded
  else CK8=$(ckpt "$SHAPE8"); fi
  echo "scale: 8b ($SHAPE8): load + $STEPS_8B QLoRA step(s) at seq $SEQ8"
  for side in $SIDES; do
    if [[ $side == peer ]]; then run_peer 8b "$SHAPE8" "$CK8" "$SEQ8" "$STEPS_8B" 1
    else run_qforge 8b "$SHAPE8" "$CK8" "$SEQ8" "$STEPS_8B" 1 bench/scale/qlora.yaml; fi
  done
fi
# ---- qat: full-parameter QAT of the 1B shape, AdamW fp32 state vs 8-bit ---------------------------
if [[ " $PARTS " == *" qat "* && " $SIDES " == *" qforge "* ]]; then
  echo "scale: qat $SHAPE seq $QAT_SEQ, $QAT_STEPS steps: adamw (fp32 state) vs adamw8bit"
  QAT_OPT=adamw; run_qforge qat "$SHAPE" "$CK" "$QAT_SEQ" "$QAT_STEPS" 1 bench/scale/qat.yaml
  if (( ${#OPT8_KEY[@]} )); then QAT_OPT=adamw8bit; run_qforge qat "$SHAPE" "$CK" "$QAT_SEQ" "$QAT_STEPS" 1 bench/scale/qat.yaml "${OPT8_KEY[@]}"
  else echo "scale: qat adamw8bit skipped: $QFORGE does not know trainer.optim.name=adamw8bit"; fi
fi

# ---- report --------------------------------------------------------------------------------------
PLOT_PY="$PYTHON"; "$BENCH_VENV/bin/python" -c 'import matplotlib' 2>/dev/null && PLOT_PY="$BENCH_VENV/bin/python"
export T_START SMOKE SHAPE SHAPE8 SEQS FIT_SEQS REPS REPS_LONG LONG_SEQ STEPS STEPS_LONG STEPS_8B BUDGET_GIB VERIFY \
  VERIFY_MAX_S QAT_SEQ QAT_STEPS NEW_KEYS THREADS RSS_CAP_MIB PARTS SIDES CK QF_EXTRA QFORGE
export MEM_KEYS_STR="${MEM_KEYS[*]:-}" KEYS_LEFT_OUT_STR="${KEYS_LEFT_OUT[*]:-}" OPT8_STR="${OPT8_KEY[*]:-}"
export CMDLINE="$(for v in SMOKE PARTS SIDES SEQS FIT_SEQS REPS STEPS NEW_KEYS AC_EVERY LOSS_CHUNK QF_EXTRA VERIFY; do [[ -n ${!v:-} ]] && printf '%s="%s" ' "$v" "${!v}"; done)bench/scale.sh"
"$PLOT_PY" bench/scale/summarize.py report "$RECORDS" --out "$OUT" --ckpt-dir "$CACHE"
