#!/usr/bin/env bash
# PTQ / QAT quality table: FP, RTN, GPTQ, AWQ, QAT, GPTQ->QAT at q4_0, int4 g128 and int3 g128 on
# the demo model and on a Llama built by transformers (see bench/ptq_quality.py). Perplexities,
# not timings: it does not wait for a quiet machine. Writes bench/results/ptq_quality.{json,md}.
# Usage: bench/ptq_quality.sh [--qat-steps 100] [--steps-b 400] [--only A|B]   (needs `make build`;
# uses runs/demo/pretrain from `make demo`, pretraining it first when missing; ~25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/qforge ] || { echo "bench/ptq_quality.sh: build/qforge is missing; run 'make build' first" >&2; exit 1; }
exec .venv/bin/python bench/ptq_quality.py "$@"
