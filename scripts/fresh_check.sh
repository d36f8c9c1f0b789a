#!/usr/bin/env bash
# `make fresh-check`: what a user who never ran qforge gets. A fresh clone of this repository's
# HEAD in a temporary directory, a temporary HOME, empty pip / wheel / qforge-wheel caches, pip's
# machine-wide find-links dropped, ccache off; then the README's two commands (`make test`, then
# `make demo`), then set-up and build again (the second run must do no set-up work and build nothing). Prints each
# phase's wall time; exits non-zero on the first failure (the clone is kept for inspection).
# System packages (apt) are the machine's, not a cache: set-up installs the missing ones as it would
# for a user, and the Python interpreter is the machine's python3.
# Usage: scripts/fresh_check.sh [--keep] [--skip-demo] [--build-only]     (KEEP=1 also keeps the clone on success)
# --build-only: set-up and build from the fresh clone (`make setup`, `make build`), no tests, no demo:
# the check for a change to CMake lists or set-up whose tests already ran elsewhere.
set -uo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
KEEP=${KEEP:-0}; DEMO=1; TESTS=1
for a in "$@"; do
  case "$a" in
    --keep) KEEP=1 ;;
    --skip-demo) DEMO=0 ;;
    --build-only) DEMO=0; TESTS=0 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "fresh-check: unknown argument '$a' (expected --keep, --skip-demo or --build-only)" >&2; exit 2 ;;
  esac
done
# The interpreter a user has on PATH, resolved before HOME changes (pyenv shims read $HOME).
PY=$(python3 -c 'import sys; print(sys.executable)') || { echo "fresh-check: python3 not found" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qforge-fresh.XXXXXX")
REPORT="$WORK/fresh-check.txt"
echo "[fresh-check] clone of $(git -C "$SRC" rev-parse --short HEAD) in $WORK (HOME=$WORK/home, empty caches, ccache off)"
[ -z "$(git -C "$SRC" status --porcelain --untracked-files=no)" ] ||
  echo "[fresh-check] note: uncommitted changes in $SRC are NOT part of the check (it clones HEAD)"

phase() {  # name, command...: runs it in the clone, records wall time, stops on failure
  local name=$1; shift
  local t0=$(date +%s) rc
  echo "[fresh-check] == $name: $* =="
  ( cd "$WORK/${DIR:-qforge}" && env -i PATH="$(dirname "$PY"):/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      HOME="$WORK/home" USER="${USER:-root}" LANG=C.UTF-8 TERM=dumb PYTHON="$PY" \
      XDG_CACHE_HOME="$WORK/home/.cache" PIP_CACHE_DIR="$WORK/home/.cache/pip" PIP_FIND_LINKS= \
      PIP_CERT="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" PIP_DEFAULT_TIMEOUT=180 \
      QFORGE_WHEEL_CACHE="$WORK/home/.cache/qforge-wheels" CCACHE_DISABLE=1 TMPDIR="$WORK/tmp" \
      "$@" ) 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  printf "%-22s %5dm%02ds  rc=%d\n" "$name" $((dt / 60)) $((dt % 60)) "$rc" | tee -a "$REPORT"
  if [ "$rc" != 0 ]; then
    echo "[fresh-check] FAILED in phase '$name' (log: $WORK/$name.log; clone kept in $WORK/qforge)" >&2
    cat "$REPORT"; exit "$rc"
  fi
}

mkdir -p "$WORK/home" "$WORK/tmp"
t_all=$(date +%s)
DIR=. phase clone git clone -q "$SRC" "$WORK/qforge"
if [ "$TESTS" = 1 ]; then phase make-test make test; else phase make-setup make setup; phase make-build make build; fi
[ "$DEMO" = 1 ] && phase make-demo make demo
# Second runs: set-up must be a no-op (nothing installed, created or built again).
phase setup-again make setup
if grep -E '^\[setup\] (installing|creating|building|overlay|extracting|collecting)' "$WORK/setup-again.log"; then
  echo "[fresh-check] FAILED: the second set-up did set-up work (above)" >&2; exit 1
fi
phase build-again make build
grep -q 'no work to do' "$WORK/build-again.log" || { echo "[fresh-check] FAILED: the second build rebuilt something" >&2; exit 1; }
dt=$(( $(date +%s) - t_all ))
printf "%-22s %5dm%02ds\n" "total" $((dt / 60)) $((dt % 60)) | tee -a "$REPORT"
echo "[fresh-check] ok on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
cat "$REPORT"
[ "$KEEP" = 1 ] && echo "[fresh-check] kept $WORK" || rm -rf "$WORK"
