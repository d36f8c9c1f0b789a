#!/usr/bin/env bash
# QLoRA step time and training memory: qforge (QLoRA = NF4 base, LoRA on a bf16 base, full fine-tune)
# vs the Python stack doing the same work (bench/qlora_peer.py: transformers + PEFT + bitsandbytes
# on CPU), in one run, on the demo model shape (configs/tiny_qlora_domain.yaml: 4.0M params, LoRA
# r16/alpha 32 on all 28 decoder linears, batch 16 x 128, fp32 compute, 2 threads).
#
# Each (impl, mode) runs REPS times as a whole process for STEPS optimizer steps; reps are interleaved.
#   qforge: step times from an external clock on its per-step metrics lines (bench/step_clock.py,
#           trainer.log_every=1), steps <= SKIP excluded; peak RSS from GNU time.
#   peer:   its own in-loop per-step times (steps <= SKIP excluded) and getrusage peak RSS.
# Reported per (impl, mode): median over reps of the median step time -> tokens/s; peak RSS; weight
# bytes as stored (qforge: train_summary.json; peer: its own count). Ratios: qforge/peer tokens/s per
# mode (goal for QLoRA >= 1.2x) and the NF4 base's bytes / a bf16 base's bytes (goal <= 0.30x).
# Data: qforge trains on the recipe's tokens, the peer on random ids of the same shape (throughput
# does not depend on the values). Weights: random init on both sides (run.init_from cleared).
#
# Usage: bench/qlora_step.sh   (env: REPS=3 STEPS=30 SKIP=5 THREADS=2 QUIET_WAIT=120 QUIET_MAX=0.10
#                               QFORGE=build/qforge PYTHON=.venv/bin/python OUT=bench/results/qlora_step.json)
# Builds nothing: build/qforge must exist. Run on a quiet machine (OpenMP spin-waits: any concurrent
# build slows every side several-fold; the script waits for quiet before each process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REPS="${REPS:-3}"; STEPS="${STEPS:-30}"; SKIP="${SKIP:-5}"; THREADS="${THREADS:-2}"
QUIET_WAIT="${QUIET_WAIT:-120}"; QUIET_MAX="${QUIET_MAX:-0.10}"
QFORGE="${QFORGE:-build/qforge}"; PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-bench/results/qlora_step.json}"
CONFIG=configs/tiny_qlora_domain.yaml
die() { echo "qlora_step: $*" >&2; exit 1; }
[[ -x "$QFORGE" ]] || die "$QFORGE not found; build it first: cmake --build build --target qforge"
[[ -x /usr/bin/time ]] || die "/usr/bin/time missing (GNU time)"
"$PYTHON" -c 'import peft, bitsandbytes' 2>/dev/null || die "$PYTHON cannot import peft and bitsandbytes (run scripts/setup.sh)"
WORK="$(mktemp -d /tmp/qf_bench_ql.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
RECORDS="$WORK/records.jsonl"; : > "$RECORDS"

# shellcheck source=bench/quiet.sh
source "$ROOT/bench/quiet.sh"

QF_COMMON=(run.init_from= run.threads="$THREADS" trainer.max_steps="$STEPS" trainer.eval_every=0 trainer.eval_batches=1
           trainer.save_every=0 trainer.log_every=1 'sample.prompts=[]' trainer.resume=never peft.save_adapter=false)
declare -A QF_MODE=([qlora]="peft.base=nf4" [lora_bf16]="peft.base=bf16" [full]="peft.enabled=false")
PEER_ARGS=(--steps "$STEPS" --skip "$SKIP" --threads "$THREADS" --r 16 --alpha 32 --batch 16 --seq-len 128)

run_qforge() {  # mode rep
  local tag="$WORK/qforge_$1_$2"
  wait_quiet
  "$PYTHON" bench/step_clock.py --metrics "$tag.run/metrics.jsonl" --out "$tag.json" --log "$tag.log" -- \
    "$QFORGE" train "$CONFIG" run.out_dir="$tag.run" "${QF_COMMON[@]}" ${QF_MODE[$1]} \
    || { tail -20 "$tag.log" >&2; die "qforge $1 failed"; }
  "$PYTHON" - "$1" "$2" "$tag" "$SKIP" >> "$RECORDS" <<'PYEOF'
import json, statistics, sys
mode, rep, tag, skip = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
r = json.load(open(tag + ".json")); s = json.load(open(tag + ".run/train_summary.json"))
t = {int(k): v for k, v in r["step_t"].items()}
dts = [t[k] - t[k - 1] for k in sorted(t) if k > skip and k - 1 in t]
print(json.dumps({"impl": "qforge", "mode": mode, "rep": rep, "step_s": statistics.median(dts),
                  "peak_rss_mib": r["maxrss_kb"] / 1024, "weight_bytes": s["train_weight_bytes"],
                  "train_state_bytes": s["train_weight_bytes"] + s["grad_bytes"] + s["optimizer_bytes"],
                  "others_cpu_share": r["others_cpu_share"]}))
PYEOF
}
run_peer() {  # mode rep
  local tag="$WORK/peer_$1_$2"
  wait_quiet
  "$PYTHON" bench/qlora_peer.py --mode "$1" "${PEER_ARGS[@]}" > "$tag.json" 2> "$tag.log" \
    || { tail -20 "$tag.log" >&2; die "peer $1 failed"; }
  "$PYTHON" - "$1" "$2" "$tag.json" >> "$RECORDS" <<'PYEOF'
import json, sys
mode, rep, j = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3]))
print(json.dumps({"impl": "peer", "mode": mode, "rep": rep, "step_s": j["step_s_median"], "peak_rss_mib": j["peak_rss_mib"],
                  "weight_bytes": j["weight_bytes"], "breakdown": j.get("weight_bytes_breakdown"),
                  "versions": {k: v for k, v in j.items() if k.endswith("version") or k == "versions"}}))
PYEOF
}

echo "qlora_step: $REPS reps x {qforge, peft+bnb} x {qlora, lora_bf16, full}, $STEPS steps, $THREADS threads"
T_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for ((rep = 1; rep <= REPS; rep++)); do
  for mode in qlora lora_bf16 full; do
    if (( rep % 2 )); then run_qforge $mode $rep; run_peer $mode $rep; else run_peer $mode $rep; run_qforge $mode $rep; fi
    tail -2 "$RECORDS" | "$PYTHON" -c 'import json,sys
for l in sys.stdin: r=json.loads(l); print("  rep %d %-6s %-9s step %.3fs (%5.0f tok/s) rss %5.0f MiB" % (r["rep"], r["impl"], r["mode"], r["step_s"], 2048/r["step_s"], r["peak_rss_mib"]))' >&2
  done
done
export T_START REPS STEPS SKIP THREADS QFORGE CONFIG
"$PYTHON" - "$RECORDS" "$OUT" <<'PYEOF'
import json, os, platform, statistics, sys
E = os.environ
recs = [json.loads(l) for l in open(sys.argv[1])]
tok = 16 * 128
res = {}
for impl in ("qforge", "peer"):
    for mode in ("qlora", "lora_bf16", "full"):
        rs = [r for r in recs if r["impl"] == impl and r["mode"] == mode]
        st = statistics.median(r["step_s"] for r in rs)
        res[f"{impl}/{mode}"] = {"tokens_per_s": tok / st, "step_s_median": st, "step_s_reps": [r["step_s"] for r in rs],
                                 "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                                 "weight_bytes": rs[0]["weight_bytes"], **({"train_state_bytes": rs[0]["train_state_bytes"]}
                                                                            if impl == "qforge" else {})}
ratios = {f"qforge_over_peer_tokens_per_s/{m}": res[f"qforge/{m}"]["tokens_per_s"] / res[f"peer/{m}"]["tokens_per_s"]
          for m in ("qlora", "lora_bf16", "full")}
# Frozen decoder-linear bytes, NF4 (packed + 8-bit scales + nested scales + offset) over bf16 (2 B per
# weight): the two qforge LoRA runs differ only in how those linears are stored.
n_lin = 4 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 704)
nf4_lin = res["qforge/qlora"]["weight_bytes"] - res["qforge/lora_bf16"]["weight_bytes"] + 2 * n_lin
ratios["nf4_base_over_bf16_base_bytes"] = nf4_lin / (2 * n_lin)
ratios["qlora_over_bf16_lora_model_weight_bytes"] = res["qforge/qlora"]["weight_bytes"] / res["qforge/lora_bf16"]["weight_bytes"]
ratios["qlora_over_full_train_state_bytes"] = res["qforge/qlora"]["train_state_bytes"] / res["qforge/full"]["train_state_bytes"]
out = {"bench": "qlora_step", "started_utc": E["T_START"], "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
       "threads": int(E["THREADS"]), "reps": int(E["REPS"]), "steps": int(E["STEPS"]), "skip": int(E["SKIP"]),
       "shape": "configs/tiny_qlora_domain.yaml (llama dim 256, 4 layers, 8/4 heads, ffn 704, vocab 4096), LoRA r16 "
                "alpha 32 on all 28 decoder linears, batch 16 x 128, fp32 compute",
       "command": "bench/qlora_step.sh", "results": res, "ratios": ratios, "records": recs}
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(json.dumps({"ratios": ratios, **{k: round(v["tokens_per_s"]) for k, v in res.items()}}, indent=1))
PYEOF
