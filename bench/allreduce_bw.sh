#!/usr/bin/env bash
# All-reduce bus bandwidth of the c10d backend qforge's data parallel uses, per message size, as
# nccl-tests' all_reduce_perf reports it (busbw = algbw * 2(n-1)/n). qforge's gradient buckets are
# points on this curve: the first bucket is 1 MB, the rest 25 MB (dist.first_bucket_mb/bucket_mb).
# CPU (default): Gloo over loopback with NPROC ranks. GPU: BACKEND=nccl NPROC=<GPUs> on a CUDA
# machine (one rank per GPU; at NPROC=1 busbw is 0 by definition and algbw is a device copy).
# Usage: bench/allreduce_bw.sh   (env: BACKEND=gloo NPROC=2 MAX_MB=64 ITERS=20 OUT=bench/results/allreduce_bw_gloo.jsonl)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BACKEND="${BACKEND:-gloo}"; NPROC="${NPROC:-2}"; MAX_MB="${MAX_MB:-64}"; ITERS="${ITERS:-20}"
OUT="${OUT:-bench/results/allreduce_bw_${BACKEND}.jsonl}"
BIN="${BIN:-build/bench/allreduce_bw}"
[[ -x "$BIN" ]] || { echo "allreduce_bw: build $BIN first (cmake --build build --target allreduce_bw)" >&2; exit 1; }
PORT=$((29000 + RANDOM % 1000))
TMP="$(mktemp)"; trap 'rm -f "$TMP"' EXIT
for r in $(seq 1 $((NPROC - 1))); do
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT WORLD_SIZE=$NPROC RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=$NPROC \
    OMP_NUM_THREADS=1 "$BIN" --backend "$BACKEND" --max-mb "$MAX_MB" --iters "$ITERS" > /dev/null &
done
MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT WORLD_SIZE=$NPROC RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=$NPROC \
  OMP_NUM_THREADS=1 "$BIN" --backend "$BACKEND" --max-mb "$MAX_MB" --iters "$ITERS" > "$TMP"
wait
{ echo "{\"command\": \"BACKEND=$BACKEND NPROC=$NPROC bench/allreduce_bw.sh\", \"date\": \"$(date -I)\", \"machine\": \"$(nproc) cores\", \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"}"; cat "$TMP"; } > "$OUT"
cat "$OUT"
