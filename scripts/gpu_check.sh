#!/usr/bin/env bash
# Every CUDA path of qforge in one command on the GPU machine (issue 20), within a global time budget.
# Prepare here with scripts/gpu_stage.sh (fills the git-ignored gpu_carry/), then with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=["gpu_carry"], timeout_s=570)
# The results come back as $OUT/gpu_results.json (every stage: status, rc, seconds, exact command,
# figures; GPU name, driver, torch version at the top) and $OUT/gpu_check.log (all output).
#
# Invariants:
# - A stage never stops the script: each runs under `timeout` with what is left of BUDGET_S (default
#   480 s), its rc is recorded, and a stage whose prerequisite failed or whose minimum time is no longer
#   left is recorded as "skipped" with the reason. The JSON is rewritten after every stage, so a run
#   killed from outside still returns what finished.
# - Nothing is installed into /: the Debian .debs are unpacked with `dpkg -x` into gpu_prefix/ (ignored), and
#   bitsandbytes is imported from gpu_carry/py through PYTHONPATH. The only change outside the repo copy
#   is a /work/main -> repo symlink, made when /work/main does not exist: the carried test binaries have
#   QFORGE_SOURCE_DIR=/work/main baked in (tests/CMakeLists.txt).
# - BUILD=auto (default): the carried binaries of gpu_carry/bin (built by this project's CPU machine
#   against the same torch 2.11.0+cu130 wheel, sm_90 kernels) when they start there, else a source
#   build; BUILD=source always builds (configure against the prefix and the machine's torch, Ninja if
#   present else make, -j16, only the targets below); BUILD=prebuilt never builds.
# - Without a CUDA device every GPU stage is "skipped" (rehearsal on the CPU machine: BUDGET_S small,
#   OUT=/tmp/x); the results file is still written.
# Env: OUT (default ./gpu_out), BUDGET_S=480, BUILD=auto|source|prebuilt, STEPS=20 (correctness runs),
#      BENCH_STEPS=6, SEQ=2048, BATCH=2, WITH_8B=auto (8B shape only when >= 200 s are left).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-480}; BUILD=${BUILD:-auto}; STEPS=${STEPS:-20}; BENCH_STEPS=${BENCH_STEPS:-6}
SEQ=${SEQ:-2048}; BATCH=${BATCH:-2}; WITH_8B=${WITH_8B:-auto}
DEV=${DEV:-cuda}; THREADS=${THREADS:-16}   # rehearsal of the stage commands on a CPU machine: DEV=cpu THREADS=1 STEPS=3
T0=$(date +%s)
LOG=$OUT/gpu_check.log; : > "$LOG"
W=$(mktemp -d /tmp/gpu_check.XXXXXX)       # run dirs, checkpoints; only $OUT comes back
REC=$W/records.jsonl; : > "$REC"
C=$REPO/gpu_carry
PREFIX=$REPO/gpu_prefix   # git-ignored and not carried: unpacked afresh on each machine
PY=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-build}   # build/ on the GPU machine (the carried tests' paths); rehearsal: elsewhere
Q=$BUILD_DIR/qforge
export GPU_CHECK_START=$(date -u +%Y-%m-%dT%H:%M:%SZ) GPU_CHECK_BUDGET=$BUDGET_S
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# record NAME STATUS RC SECONDS COMMAND NOTE [FIGURES_FILE]: one JSON line, then gpu_results.json again.
record() {
  "$PY" - "$@" >> "$REC" <<'PYEOF'
import json, sys
name, status, rc, secs, cmd, note = sys.argv[1:7]
fig = None
if len(sys.argv) > 7 and sys.argv[7]:
    try:
        txt = open(sys.argv[7]).read().strip()
        fig = json.loads(txt.splitlines()[-1]) if txt else None
    except (OSError, ValueError) as e:
        fig = {"unparsed": f"{type(e).__name__}: {e}"}
print(json.dumps({"stage": name, "status": status, "rc": None if rc == "" else int(rc), "seconds": float(secs),
                  "command": cmd, "note": note, "figures": fig}))
PYEOF
  "$PY" "$REPO/scripts/gpu_bench.py" assemble "$REC" "$OUT/gpu_results.json" > "$W/table.txt" 2>>"$LOG"
}
declare -A OK   # stage name -> 1 when it passed
# stage NAME MIN_S MAX_S NEEDS COMMAND: runs COMMAND (bash -c) under timeout min(MAX_S, left), unless a
# stage named in NEEDS (space separated) did not pass or fewer than MIN_S seconds are left. The last
# line the command prints on stdout that parses as JSON is kept as the stage's figures.
stage() {
  local name=$1 min=$2 max=$3 needs=$4 cmd=$5 n
  for n in $needs; do
    if [[ -z ${OK[$n]:-} ]]; then log "SKIP $name: needs $n"; record "$name" skipped "" 0 "$cmd" "needs $n"; return; fi
  done
  local l; l=$(left)
  if (( l < min )); then log "SKIP $name: ${l}s left < ${min}s"; record "$name" skipped "" 0 "$cmd" "budget: ${l}s left"; return; fi
  local t=$(( max < l ? max : l ))
  log "BEGIN $name (timeout ${t}s): $cmd"
  local s0 e rc; s0=$(date +%s%N)
  timeout --kill-after=10 "$t" bash -c "$cmd" > "$W/$name.out" 2> >(tee -a "$LOG" "$W/$name.err" >&2)
  rc=$?
  e=$(awk -v a="$s0" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  cat "$W/$name.out" >> "$LOG"
  grep -E '^\{.*\}$' "$W/$name.out" | tail -1 > "$W/$name.fig" || true
  local status=pass note=""
  if (( rc == 124 || rc == 137 )); then status=timeout; note="killed after ${t}s"
  elif (( rc != 0 )); then status=fail; note="rc $rc: $(cat "$W/$name.out" "$W/$name.err" 2>/dev/null | grep -v '^{' | grep -v '^\s*$' | tail -1 | cut -c1-200)"; fi
  [[ $status == pass ]] && OK[$name]=1
  log "END $name: $status rc=$rc ${e}s"
  record "$name" "$status" "$rc" "$e" "$cmd" "$note" "$W/$name.fig"
}
skip() { log "SKIP $1: $2"; record "$1" skipped "" 0 "" "$2"; }

# ---------------------------------------------------------------- environment (no GPU needed)
mkdir -p "$PREFIX"
for d in "$C"/debs/*.deb; do dpkg -x "$d" "$PREFIX" || log "dpkg -x $d failed"; done
ARCHLIB=$PREFIX/usr/lib/x86_64-linux-gnu
for pc in "$ARCHLIB"/pkgconfig/*.pc "$PREFIX"/usr/share/pkgconfig/*.pc; do
  [[ -f $pc ]] && sed -i "s|^prefix=/usr\$|prefix=$PREFIX/usr|" "$pc"
done
TORCH_CMAKE=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>>"$LOG")
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>>"$LOG")
NV_LIBS=$("$PY" -c 'import glob, os, site
ds = set()
for sp in site.getsitepackages():
    for so in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        ds.add(os.path.dirname(so))
print(":".join(sorted(ds)))' 2>>"$LOG")
export LD_LIBRARY_PATH=$ARCHLIB:$TORCH_LIB:$NV_LIBS:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$C/py${PYTHONPATH:+:$PYTHONPATH}
export PKG_CONFIG_PATH=$ARCHLIB/pkgconfig:$PREFIX/usr/share/pkgconfig
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}
mkdir -p data/corpora runs/tokenizers
[[ -f data/corpora/kjv.txt ]] || cp "$C/corpora/kjv.txt" data/corpora/ 2>>"$LOG"
[[ -f runs/tokenizers/kjv_bpe4k.model ]] || cp "$C/corpora/kjv_bpe4k.model" runs/tokenizers/ 2>>"$LOG"
if [[ $REPO != /work/main && ! -e /work/main ]]; then mkdir -p /work && ln -s "$REPO" /work/main 2>>"$LOG"; fi
export GPU_CHECK_COMMIT=$(cat "$C/bin/COMMIT" 2>/dev/null || git rev-parse HEAD 2>/dev/null)
HAVE_GPU=0; "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$LOG" && HAVE_GPU=1
log "repo $REPO, OUT $OUT, budget ${BUDGET_S}s, BUILD=$BUILD, GPU=$HAVE_GPU, torch cmake $TORCH_CMAKE"

stage env 0 60 "" "'$PY' scripts/gpu_bench.py env; nvidia-smi 2>&1 | head -15 >&2; nvcc --version 2>&1 | tail -1 >&2; \
  g++ --version 2>&1 | head -1 >&2; command -v ninja cmake clang++ >&2"

# ---------------------------------------------------------------- binaries
BINS=(qforge tests/test_quant tests/test_apps tests/test_trainer tests/test_peft tests/dist_probe bench/allreduce_bw)
TARGETS="qforge test_quant test_apps test_trainer test_peft dist_probe allreduce_bw"
use_prebuilt() {
  [[ -x $C/bin/qforge ]] || return 1
  mkdir -p "$BUILD_DIR/tests" "$BUILD_DIR/bench"
  local b; for b in "${BINS[@]}" bench/dequant_bw; do   # temp + rename: safe over a binary in use
    [[ -x $C/bin/$b ]] && { cp "$C/bin/$b" "$BUILD_DIR/$b.tmp$$" && mv -f "$BUILD_DIR/$b.tmp$$" "$BUILD_DIR/$b"; }
  done
  "$Q" --help > /dev/null 2>>"$LOG"
}
export GPU_CHECK_BINARIES=none
if [[ $BUILD != source ]] && use_prebuilt; then
  GPU_CHECK_BINARIES="carried ($(cat "$C/bin/BUILD_INFO" 2>/dev/null))"; OK[build]=1
  record build pass 0 0 "carried gpu_carry/bin" "$GPU_CHECK_BINARIES"
elif [[ $BUILD == prebuilt ]]; then
  skip build "BUILD=prebuilt but gpu_carry/bin/qforge is missing or does not start"
else
  GEN="-G Ninja"; command -v ninja >/dev/null || GEN="-G 'Unix Makefiles'"
  FUZZ_CXX=$(command -v clang++ || command -v g++)   # tests/CMakeLists.txt requires one; fuzz targets are not built
  # trainer/CMakeLists.txt takes nccl.h from .venv/lib/python3*/site-packages/nvidia/nccl/include (the
  # wheel libtorch loads); there is no .venv on the GPU machine: point that path at python3's wheel.
  if ! compgen -G ".venv/lib/python3*/site-packages/nvidia/nccl/include" > /dev/null; then
    NCCL_INC=$("$PY" -c 'import glob, os, site
print(next(iter(sorted(d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, "nvidia", "*nccl*", "include"))
                       + glob.glob(os.path.join(sp, "nvidia", "*", "include", "nccl.h")))), ""))' 2>>"$LOG")
    [[ $NCCL_INC == */nccl.h ]] && NCCL_INC=$(dirname "$NCCL_INC")
    if [[ -n $NCCL_INC ]]; then mkdir -p .venv/lib/python3/site-packages/nvidia/nccl && ln -sfn "$NCCL_INC" .venv/lib/python3/site-packages/nvidia/nccl/include
    else log "no nccl.h in python3's nvidia wheels: the configure will stop at trainer/CMakeLists.txt"; fi
  fi
  stage build 60 330 "" "cmake -S . -B $BUILD_DIR $GEN -DCMAKE_BUILD_TYPE=Release -DQFORGE_PCH=ON \
 -DCMAKE_PREFIX_PATH='$TORCH_CMAKE;$PREFIX/usr;$ARCHLIB/cmake;$PREFIX/usr/share/cmake' \
 -DCMAKE_CXX_FLAGS='-isystem $PREFIX/usr/include' -DPKG_CONFIG_EXECUTABLE=$PREFIX/usr/bin/pkgconf \
 -DQFORGE_CLANGXX=$FUZZ_CXX -DTORCH_CUDA_ARCH_LIST=9.0 -DCMAKE_CUDA_ARCHITECTURES=90 \
 -DCMAKE_CUDA_COMPILER=\$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) >&2 \
 && cmake --build $BUILD_DIR -j16 --target $TARGETS \$(cmake --build $BUILD_DIR --target help 2>/dev/null | grep -qw dequant_bw && echo dequant_bw) >&2"
  GPU_CHECK_BINARIES="built here (BUILD=$BUILD)"
fi
export GPU_CHECK_BINARIES

if (( ! HAVE_GPU )) && [[ $DEV == cuda ]]; then
  for s in gtest_cuda train_fp32 train_bf16 qlora_nf4 lora_q4_k lora_int8 qat_q4_0 eval_converted \
           bandwidth dequant_bw allreduce_nccl qat_overhead bench_qlora_1b bench_qlora_8b; do
    skip $s "no CUDA device (torch.cuda.is_available() is false)"
  done
  log "no GPU: rehearsal done"; cat "$W/table.txt" | tee -a "$LOG"; rm -rf "$W"; exit 0
fi

# ---------------------------------------------------------------- correctness on CUDA
# gtest cases with a CUDA branch (each GTEST_SKIPs without a GPU): test_quant: Cuda.Int8LtOnGpu...,
# Cuda.GgmlDequantKernelMatchesCpu, Cuda.Nf4DequantKernelMatchesCpuAndNf4LinearRunsOnGpu,
# DequantDispatchCuda.{GgmlOnGpuEqualsCpuReference,Nf4OnGpuEqualsCpuReference}; test_apps:
# Cli.NcclWorldOfOneFollowsOneProcess (ZeRO 0 and 2 through `qforge launch`). test_trainer and test_peft
# are listed with the same filter so a case added later runs too; an empty selection passes. On CUDA a
# SKIPPED case fails the stage (its CUDA branch did not run).
GT_FILTER='Cuda*:*Cuda*:*Gpu*:*Nccl*'
stage gtest_cuda 30 150 "build" "set -o pipefail; r=0; for t in test_quant test_apps test_trainer test_peft; do \
 echo \"== \$t\" >&2; $BUILD_DIR/tests/\$t --gtest_filter='$GT_FILTER' --gtest_list_tests >&2; \
 $BUILD_DIR/tests/\$t --gtest_filter='$GT_FILTER' --gtest_brief=1 --gtest_output=json:$W/gt_\$t.json >&2 || r=1; done; \
 '$PY' -c 'import json,glob,sys; d={}
for f in sorted(glob.glob(\"$W/gt_*.json\")):
  j=json.load(open(f)); cs=[c for s in j.get(\"testsuites\",[]) for c in s.get(\"testsuite\",[])]
  d[f.split(\"gt_\")[1][:-5]]={c[\"classname\"]+\".\"+c[\"name\"]:(\"FAILED\" if c.get(\"failures\") else c.get(\"result\",\"?\")) for c in cs}
print(json.dumps(d))
sys.exit(3 if \"$DEV\" == \"cuda\" and any(v == \"SKIPPED\" for t in d.values() for v in t.values()) else 0)' || r=1; exit \$r"

TR_COMMON="trainer.schedule.total_steps=1000 trainer.eval_every=0 trainer.eval_batches=1 trainer.save_every=0 trainer.log_every=1 trainer.resume=never 'sample.prompts=[]' run.threads=$THREADS"
# The demo config, fp32, on the CPU and on CUDA: same seed, same data, losses compared step by step.
stage train_fp32 30 120 "build" "set -e; for d in cpu $DEV; do $Q -q train configs/tiny_pretrain.yaml run.out_dir=$W/fp32_\$d \
 trainer.max_steps=$STEPS trainer.device=\$d $TR_COMMON >&2; done; \
 '$PY' scripts/gpu_bench.py losses $W/fp32_$DEV/metrics.jsonl $W/fp32_cpu/metrics.jsonl --tol 1e-3"
stage train_bf16 20 90 "build" "set -e; $Q -q train configs/tiny_pretrain.yaml run.out_dir=$W/bf16_cuda trainer.max_steps=$STEPS \
 trainer.device=$DEV trainer.precision=bf16 $TR_COMMON >&2; \
 '$PY' scripts/gpu_bench.py losses $W/bf16_cuda/metrics.jsonl $W/fp32_cpu/metrics.jsonl --tol 0.05"
# QLoRA (NF4 base), LoRA on llama.cpp q4_k blocks and on an LLM.int8 base, on CUDA, from random init
# (run.init_from cleared: the pretrained demo run is not carried), over the KJV corpus.
KJV="'data.sources=[{path: data/corpora/kjv.txt, format: text, split: line}]'"
for base in nf4 q4_k int8; do
  name=lora_$base; [[ $base == nf4 ]] && name=qlora_nf4
  extra=""; [[ $base == q4_k ]] && extra="model.ffn_dim=768"   # q4_k's 256-value blocks: 704 is not a multiple
  stage $name 20 90 "build" "set -e; $Q -q train configs/tiny_qlora_domain.yaml run.out_dir=$W/$name run.init_from= $KJV \
 peft.base=$base $extra trainer.max_steps=10 trainer.device=$DEV peft.save_adapter=false $TR_COMMON >&2; \
 '$PY' scripts/gpu_bench.py summary $W/$name"
done
# QAT q4_0 on CUDA with convert at the end (finalize evaluates the converted model: val_loss_converted),
# then `qforge eval` of the converted run.
stage qat_q4_0 20 120 "build" "set -e; $Q -q train configs/tiny_qat_q4_0.yaml run.out_dir=$W/qat run.init_from= trainer.max_steps=10 \
 trainer.device=$DEV trainer.schedule.total_steps=1000 trainer.eval_batches=2 trainer.save_every=0 trainer.log_every=1 trainer.resume=never 'sample.prompts=[]' run.threads=$THREADS >&2; \
 '$PY' scripts/gpu_bench.py summary $W/qat"
stage eval_converted 10 60 "qat_q4_0" "set -e; $Q eval \$(ls -d $W/qat/converted/step_* | tail -1) trainer.device=$DEV --max-batches 8"

# ---------------------------------------------------------------- speed and memory
stage bandwidth 10 60 "" "'$PY' scripts/gpu_bench.py bandwidth"
if [[ -x $BUILD_DIR/bench/dequant_bw ]]; then
  stage dequant_bw 10 60 "build" "$BUILD_DIR/bench/dequant_bw"
else
  skip dequant_bw "no build/bench/dequant_bw target in this build (qforge's NF4/q4_0/q4_K CUDA dequant GB/s needs it)"
fi
stage allreduce_nccl 10 60 "build" "set -e; BIN=$BUILD_DIR/bench/allreduce_bw BACKEND=nccl NPROC=1 MAX_MB=256 ITERS=20 OUT=$W/allreduce_nccl.jsonl bench/allreduce_bw.sh >&2; \
 '$PY' -c 'import json; print(json.dumps({\"rows\": [json.loads(l) for l in open(\"$W/allreduce_nccl.jsonl\")][1:]}))'"
# QAT overhead on CUDA at the demo shape (bench/qat_overhead.sh's two configs, 60 steps each).
stage qat_overhead 20 90 "build" "set -e; c='trainer.max_steps=${OV_STEPS:-60} quant.convert_at_end=false $TR_COMMON trainer.device=$DEV'; \
 p=\$($Q -q train configs/tiny_pretrain.yaml run.out_dir=$W/ov_plain \$c | grep -E '^== run'); \
 q=\$($Q -q train configs/tiny_qat_q4_0.yaml run.out_dir=$W/ov_qat run.init_from= \$c | grep -E '^== run'); echo \"\$p\" >&2; echo \"\$q\" >&2; \
 '$PY' -c 'import re,sys,json; t=[float(re.search(r\", ([0-9.]+) tokens/s\", s).group(1)) for s in sys.argv[1:]]; \
print(json.dumps({\"plain_tokens_per_s\": t[0], \"qat_tokens_per_s\": t[1], \"qat_step_over_plain\": t[0]/t[1]}))' \"\$p\" \"\$q\""
# QLoRA at the Llama-3.2-1B shape (random init, bench/scale/make_ckpt.py), seq SEQ x batch BATCH, bf16
# compute, activation checkpointing on both sides: qforge then the transformers+PEFT+bitsandbytes peer.
# qforge's step time: external clock on its metrics lines (median of steps >= 2, as the peer); its peak
# GPU memory: the used-memory high-water mark (NVML, every 50 ms; CUDA context included, so it
# overstates against the peer's max_memory_allocated) until train_summary.json reports a CUDA figure.
qlora_bench() {  # shape
  local s=$1 ck=$W/ckpt_$1 m="transformers"; [[ $1 == 8b ]] && m=stream
  echo "'$PY' bench/scale/make_ckpt.py $ck --shape $s --method $m --tokenizer-corpus data/corpora/kjv.txt >&2 && \
 { '$PY' scripts/gpu_bench.py clock --gpu --tokens-per-step $((SEQ * BATCH)) --metrics $W/ql_$s/metrics.jsonl -- \
 $Q -q train bench/scale/qlora.yaml model.from=$ck data.seq_len=$SEQ trainer.batch_size=$BATCH trainer.max_steps=$BENCH_STEPS \
 trainer.device=$DEV trainer.activation_checkpointing=true run.out_dir=$W/ql_$s 'data.sources=[{path: data/corpora/kjv.txt, split: line}]' \
 data.cache_dir=$W/tokens_$s run.threads=$THREADS > $W/clock_$s.json; r=\$?; \
 '$PY' scripts/gpu_bench.py peer $ck --seq $SEQ --batch $BATCH --steps $BENCH_STEPS > $W/peer_$s.json; \
 '$PY' -c 'import json; c=json.load(open(\"$W/clock_$s.json\")); p=json.load(open(\"$W/peer_$s.json\")); \
 s=json.load(open(\"$W/ql_$s/train_summary.json\")); q={\"clock\": c, \"summary\": {k: v for k, v in s.items() if not isinstance(v,(dict,list))}}; \
 print(json.dumps({\"shape\": \"$s\", \"seq\": $SEQ, \"batch\": $BATCH, \"qforge\": q, \"peer\": p, \
 \"qforge_over_peer_tokens_per_s\": c[\"tokens_per_s\"]/p[\"tokens_per_s\"], \
 \"qforge_used_peak_over_peer_peak_alloc\": c[\"gpu_used_peak_gib\"]/p[\"step_peak_alloc_gib\"]}))'; exit \$r; }"
}
if [[ $DEV != cuda ]]; then
  skip bench_qlora_1b "DEV=$DEV: the 1B/8B shapes run on CUDA only"; WITH_8B=0
else
  stage bench_qlora_1b 90 240 "build" "$(qlora_bench 1b)"
fi
if [[ $WITH_8B == 1 ]] || { [[ $WITH_8B == auto ]] && (( $(left) >= 200 )); }; then
  stage bench_qlora_8b 150 300 "build" "$(qlora_bench 8b)"
else
  skip bench_qlora_8b "WITH_8B=$WITH_8B, $(left)s left (auto needs 200)"
fi

log "done in $(( $(date +%s) - T0 ))s"
cat "$W/table.txt" | tee -a "$LOG"
rm -rf "$W"
