#!/usr/bin/env bash
# Hugging Face checkpoint load time and peak RSS: `qforge inspect DIR --forward` vs
# transformers.AutoModelForCausalLM.from_pretrained (bench/hf_load_peer.py), on a ~1.1B-parameter
# Llama checkpoint (random weights, bf16 safetensors, 2.2 GB) that transformers itself writes.
# Both sides load in the checkpoint's dtype (bf16) and then run one forward pass over 8 tokens,
# which reads every weight. Reported per side (median over REPS interleaved processes, each after
# dropping nothing: the page cache is warm for both after the first rep, which is discarded):
# load_s (in-process, from the start of loading to a usable model), load_and_forward_s, process
# peak RSS (GNU time) and its ratio to the checkpoint's size. Goals: qforge >= 2x faster to load,
# peak RSS <= 1.1x the checkpoint size.
# Usage: bench/hf_load.sh   (env: REPS=3 SHAPE=1b CKPT=/tmp/qf_bench_hf_1b OUT=bench/results/hf_load.json)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REPS="${REPS:-3}"; SHAPE="${SHAPE:-1b}"; CKPT="${CKPT:-/tmp/qf_bench_hf_$SHAPE}"
QFORGE="${QFORGE:-build/qforge}"; PYTHON="${PYTHON:-.venv/bin/python}"; OUT="${OUT:-bench/results/hf_load.json}"
export OMP_NUM_THREADS=2
[[ -x "$QFORGE" ]] || { echo "hf_load: build $QFORGE first" >&2; exit 1; }
if [[ ! -f "$CKPT/config.json" ]]; then
  echo "hf_load: writing the $SHAPE checkpoint with transformers to $CKPT (once)"
  "$PYTHON" bench/hf_load_peer.py make "$CKPT" --shape "$SHAPE"
fi
WORK="$(mktemp -d /tmp/qf_bench_hfl.XXXXXX)"; trap 'rm -rf "$WORK"' EXIT
REC="$WORK/records.jsonl"; : > "$REC"
run() {  # impl rep
  local log="$WORK/$1_$2"
  if [[ $1 == qforge ]]; then
    /usr/bin/time -v -o "$log.time" "$QFORGE" -q inspect "$CKPT" --forward > "$log.json"
  else
    /usr/bin/time -v -o "$log.time" "$PYTHON" bench/hf_load_peer.py load "$CKPT" > "$log.json" 2> "$log.err"
  fi
  "$PYTHON" - "$1" "$2" "$log" >> "$REC" <<'PYEOF'
import json, re, sys
impl, rep, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
j = json.loads(open(log + ".json").read().strip().splitlines()[-1])
t = open(log + ".time").read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1).split(":")
wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
print(json.dumps({"impl": impl, "rep": rep, "load_s": j["load_s"], "load_and_forward_s": j["load_and_forward_s"],
                  "peak_rss_mib": rss, "wall_s": wall_s, "logits_sum": j["forward_logits_sum"]}))
sys.stderr.write(f"  rep {rep} {impl:7s} load {j['load_s']:.2f}s  load+forward {j['load_and_forward_s']:.2f}s  "
                 f"peak RSS {rss:.0f} MiB  wall {wall_s:.1f}s\n")
PYEOF
}
echo "hf_load: $REPS reps (+1 warm-up each) x {qforge, transformers} on $CKPT"
for ((rep = 0; rep <= REPS; rep++)); do
  if (( rep % 2 )); then run transformers $rep; run qforge $rep; else run qforge $rep; run transformers $rep; fi
done
CKPT_BYTES=$(du -cb "$CKPT"/*.safetensors | tail -1 | cut -f1)
export CKPT CKPT_BYTES REPS SHAPE
"$PYTHON" - "$REC" "$OUT" <<'PYEOF'
import json, os, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
E = os.environ
size_mib = int(E["CKPT_BYTES"]) / 2**20
res = {}
for impl in ("qforge", "transformers"):
    rs = [r for r in recs if r["impl"] == impl and r["rep"] > 0]  # rep 0 warms the page cache
    res[impl] = {k: statistics.median(r[k] for r in rs) for k in ("load_s", "load_and_forward_s", "peak_rss_mib", "wall_s")}
    res[impl]["peak_rss_over_checkpoint"] = res[impl]["peak_rss_mib"] / size_mib
ratios = {"load_speedup": res["transformers"]["load_s"] / res["qforge"]["load_s"],
          "load_and_forward_speedup": res["transformers"]["load_and_forward_s"] / res["qforge"]["load_and_forward_s"],
          "wall_speedup": res["transformers"]["wall_s"] / res["qforge"]["wall_s"]}
same = len({round(r["logits_sum"], 1) for r in recs}) == 1
out = {"bench": "hf_load", "command": "bench/hf_load.sh", "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"), "checkpoint": E["CKPT"], "shape": E["SHAPE"],
       "checkpoint_mib": size_mib, "reps": int(E["REPS"]), "results": res, "ratios": ratios,
       "same_logits_sum_both_sides": same, "records": recs}
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(json.dumps({"checkpoint_mib": round(size_mib), **{k: round(v, 2) for k, v in ratios.items()},
                  **{f"{i}_{k}": round(v, 2) for i in res for k, v in res[i].items()}, "same_logits": same}, indent=1))
PYEOF
