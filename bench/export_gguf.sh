#!/usr/bin/env bash
# GGUF export throughput and peak RSS: `qforge export HF_DIR --format gguf --quant Q` (one pass,
# streaming) vs llama.cpp's own path on the same checkpoint, as a llama.cpp user runs it:
# convert_hf_to_gguf.py --outtype f16 (from the llama-cpp-python 0.3.36 sdist, its own gguf-py),
# then llama-quantize (llama_model_quantize from the wheel, 2 threads). Checkpoint: the ~1.1B Llama
# of bench/hf_load.sh (bf16 safetensors written by transformers) plus a sentencepiece tokenizer.
# Per side: wall seconds (sum of the steps), GB/s of input weights (checkpoint bytes / wall), and
# peak RSS (the largest step) over the checkpoint size. Goals: qforge >= 1.0x llama.cpp's
# throughput, peak RSS <= 1.2x the model size. Medians over REPS interleaved runs.
# Usage: bench/export_gguf.sh   (env: REPS=1 QUANTS="q4_0 q4_k_m" CKPT=/tmp/qf_bench_hf_1b OUT=bench/results/export_gguf.json)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source bench/quiet.sh
REPS="${REPS:-1}"; QUANTS="${QUANTS:-q4_0 q4_k_m}"; CKPT="${CKPT:-/tmp/qf_bench_hf_1b}"
QFORGE="${QFORGE:-build/qforge}"; PYTHON="${PYTHON:-.venv/bin/python}"; OUT="${OUT:-bench/results/export_gguf.json}"
export OMP_NUM_THREADS=2
[[ -x "$QFORGE" ]] || { echo "export_gguf: build $QFORGE first" >&2; exit 1; }
if [[ ! -f "$CKPT/config.json" ]]; then
  echo "export_gguf: writing the 1b checkpoint with transformers to $CKPT (once)"
  "$PYTHON" bench/hf_load_peer.py make "$CKPT" --shape 1b
fi
"$PYTHON" bench/export_peer.py tokenizer "$CKPT"
SRC="$("$PYTHON" bench/export_peer.py sources)"
WORK="$(mktemp -d /tmp/qf_bench_export.XXXXXX)"; trap 'rm -rf "$WORK"' EXIT
REC="$WORK/records.jsonl"; : > "$REC"
timed() {  # log cmd... -> appends "wall_s rss_kib" of the step to $WORK/steps
  local log="$1"; shift
  wait_quiet
  /usr/bin/time -v -o "$log.time" "$@" > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
  local rss wall
  rss=$(grep "Maximum resident set size" "$log.time" | awk '{print $NF}')
  wall=$(grep "Elapsed (wall clock)" "$log.time" | awk '{print $NF}' | awk -F: '{s=0; for(i=1;i<=NF;i++) s=s*60+$i; print s}')
  echo "$wall $rss" >> "$WORK/steps"
}
record() {  # impl quant rep
  awk -v impl="$1" -v q="$2" -v rep="$3" '{w+=$1; if ($2>r) r=$2} END {printf "{\"impl\": \"%s\", \"quant\": \"%s\", \"rep\": %d, \"wall_s\": %.3f, \"peak_rss_mib\": %.1f}\n", impl, q, rep, w, r/1024}' "$WORK/steps" >> "$REC"
  tail -1 "$REC" >&2
  rm -f "$WORK/steps"
}
for ((rep = 0; rep < REPS; rep++)); do
  for q in $QUANTS; do
    rm -f "$WORK"/*.gguf
    timed "$WORK/qforge.log" "$QFORGE" export "$CKPT" --format gguf --quant "$q" --out "$WORK/qforge-$q.gguf"
    record qforge "$q" "$rep"
    rm -f "$WORK"/*.gguf
    timed "$WORK/convert.log" "$PYTHON" "$SRC/convert_hf_to_gguf.py" "$CKPT" --outtype f16 --outfile "$WORK/f16.gguf"
    timed "$WORK/quantize.log" "$PYTHON" bench/export_peer.py quantize "$WORK/f16.gguf" "$WORK/llama-$q.gguf" "$q"
    record llama.cpp "$q" "$rep"
  done
done
CKPT_BYTES=$(du -cb "$CKPT"/*.safetensors | tail -1 | cut -f1)
export CKPT CKPT_BYTES REPS QUANTS
"$PYTHON" - "$REC" "$OUT" <<'PYEOF'
import json, os, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
E = os.environ
gb = int(E["CKPT_BYTES"]) / 1e9
res = {}
for q in E["QUANTS"].split():
    res[q] = {}
    for impl in ("qforge", "llama.cpp"):
        rs = [r for r in recs if r["impl"] == impl and r["quant"] == q]
        wall = statistics.median(r["wall_s"] for r in rs)
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        res[q][impl] = {"wall_s": wall, "gb_per_s": gb / wall, "peak_rss_mib": rss,
                        "peak_rss_over_model": rss / (int(E["CKPT_BYTES"]) / 2**20)}
    res[q]["throughput_ratio"] = res[q]["qforge"]["gb_per_s"] / res[q]["llama.cpp"]["gb_per_s"]
out = {"bench": "export_gguf", "command": "bench/export_gguf.sh", "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"), "checkpoint": E["CKPT"], "checkpoint_gb": gb,
       "reps": int(E["REPS"]), "peer": "convert_hf_to_gguf.py --outtype f16 + llama_model_quantize (llama-cpp-python 0.3.36, llama.cpp 0c1e570), 2 threads",
       "results": res, "records": recs}
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(json.dumps(res, indent=1))
PYEOF
