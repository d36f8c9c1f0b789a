#!/usr/bin/env bash
# `qforge quantize` at the Llama-3.2-1B and Llama-3.1-8B shapes (issue 19, item 3): peak RSS of the
# streaming path (each decoder layer loaded from the mapped bf16 shards, calibrated, converted and
# released in turn) against --no-stream (the fp32 model loaded whole first; 1B only: the 8B shape's
# fp32 model is 32 GB, more than this machine has). Checkpoints: bench/scale.sh's random-init ones
# (bench/scale/make_ckpt.py, made here when missing). Calibration and held-out text: the first 3000
# lines of data/corpora/kjv.txt in 128-token windows. Each run's figures come from its own
# ptq_summary.json (peak_rss_bytes = VmHWM, model_bytes = the packed model as stored).
# Usage: bench/scale_quantize.sh      Env (defaults): SHAPES="1b 8b" METHOD=rtn QUANT=int4-g128 SAMPLES=8
#   CACHE=.cache/scale QFORGE=build/qforge PYTHON=.venv/bin/python OUT=bench/results/scale_quantize.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SHAPES="${SHAPES:-1b 8b}"; METHOD="${METHOD:-rtn}"; QUANT="${QUANT:-int4-g128}"; SAMPLES="${SAMPLES:-8}"
CACHE="${CACHE:-.cache/scale}"; QFORGE="${QFORGE:-build/qforge}"; PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-bench/results/scale_quantize.json}"
WORK="$CACHE/quantize"; mkdir -p "$WORK"
RECORDS="$WORK/records.jsonl"; : > "$RECORDS"
head -n 3000 data/corpora/kjv.txt > "$WORK/calib.txt"
for shape in $SHAPES; do
  ck="$CACHE/ckpt-$shape"
  [[ -f $ck/config.json ]] || "$PYTHON" bench/scale/make_ckpt.py "$shape" "$ck"
  # A view of the checkpoint with a tokenizer (the streamed 8B dir may have none beside its shards).
  view="$WORK/view-$shape"; mkdir -p "$view"
  for f in "$ck"/*.safetensors "$ck"/*.json; do ln -sf "$(realpath "$f")" "$view/$(basename "$f")"; done
  [[ -e $view/tokenizer.json ]] || cp "$CACHE/tokenizer-v8192.json" "$view/tokenizer.json"
  [[ -e $view/tokenizer_config.json ]] || echo '{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}' > "$view/tokenizer_config.json"
  cat > "$WORK/calib-$shape.yaml" <<YAML
# bench/scale_quantize.sh: calibration and held-out text for qforge quantize (the model is --calib's HF dir)
run: {name: scale_quantize_$shape, out_dir: $WORK/unused, threads: 2, seed: 1}
data: {sources: [{path: $WORK/calib.txt, split: line}], seq_len: 128, val_fraction: 0.01, cache_dir: $WORK/tokens}
YAML
  modes="stream"; [[ $shape == 8b ]] || modes="stream whole"
  for mode in $modes; do
    extra=(); [[ $mode == whole ]] && extra=(--no-stream)
    out="$WORK/out-$shape-$mode"
    cmd=("$QFORGE" -q quantize "$view" --method "$METHOD" --quant "$QUANT" --calib "$WORK/calib-$shape.yaml"
         --samples "$SAMPLES" --out "$out" --force "${extra[@]}")
    echo "[$(date +%T)] ${cmd[*]}" >&2
    t0=$(date +%s.%N)
    "${cmd[@]}"
    t1=$(date +%s.%N)
    "$PYTHON" - "$shape" "$mode" "$out/ptq_summary.json" "$t0" "$t1" "$(cat /proc/loadavg | cut -d' ' -f1)" "${cmd[*]}" >> "$RECORDS" <<'PY'
import json, sys
shape, mode, summ, t0, t1, load, cmd = sys.argv[1:8]
s = json.load(open(summ))
print(json.dumps({"shape": shape, "mode": mode, "command": cmd, "wall_s": round(float(t1) - float(t0), 1),
                  "load_avg_1m": float(load), **{k: s[k] for k in ["method", "quant", "streamed", "peak_rss_bytes",
                  "model_bytes", "val_loss_fp", "val_loss", "mean_err", "calib_tokens", "seconds"]}}))
PY
    tail -1 "$RECORDS" >&2
    rm -rf "$out"  # the packed 8B run is ~8 GB
  done
done
"$PYTHON" - "$RECORDS" "$OUT" <<'PY'
import json, os, platform, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) * 1024
json.dump({"bench": "bench/scale_quantize.sh", "machine": {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem},
           "records": recs}, open(sys.argv[2], "w"), indent=2)
for r in recs:
    print(f"{r['shape']:3} {r['mode']:6} peak {r['peak_rss_bytes'] / 2**20:8.0f} MiB  model {r['model_bytes'] / 2**20:8.0f} MiB  "
          f"ratio {r['peak_rss_bytes'] / r['model_bytes']:.2f}x  {r['wall_s']:.0f} s")
PY
