#!/usr/bin/env bash
# Stage what scripts/gpu_check.sh needs on the GPU machine into gpu_carry/ (git-ignored; the device
# tool's `carry: ["gpu_carry"]` takes it along). That machine has python3 with torch 2.11.0+cu130,
# transformers, peft, nvcc 13, cmake and ninja, but no network and none of qforge's Debian deps.
#   gpu_carry/debs/     Debian bookworm .debs (apt-get download): yaml-cpp, CLI11, nlohmann-json,
#                       sentencepiece, PCRE2, GoogleTest/GMock, gloo headers, pkgconf. gpu_check.sh
#                       unpacks them with `dpkg -x` into a prefix inside the repo copy (never into /).
#   gpu_carry/py/       bitsandbytes from .venv (the pinned 0.50.2) with only its CUDA 13.0 and CPU
#                       libraries, plus its dist-info (transformers reads the version from it).
#   gpu_carry/bin/      the binaries of this machine's build/ (same torch 2.11.0+cu130 wheel, CUDA
#                       kernels for sm_90 from nvcc 13), so the GPU time is not spent compiling;
#                       gpu_check.sh falls back to building from source when they are absent or do not
#                       start there (BUILD=auto), or always builds with BUILD=source.
#   gpu_carry/corpora/  data/corpora/kjv.txt and runs/tokenizers/kjv_bpe4k.model (ignored in git).
# Invariant: the working tree that travels (tracked files + gpu_carry) stays under the tool's 64 MiB;
# this script measures both and fails when the sum is over LIMIT_MIB (default 60, leaving headroom).
# Usage: scripts/gpu_stage.sh          (env: NO_BIN=1 to stage no binaries; LIMIT_MIB=60)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
C=gpu_carry
LIMIT_MIB=${LIMIT_MIB:-60}
die() { echo "gpu_stage: $*" >&2; exit 1; }

DEBS=(libyaml-cpp0.7 libyaml-cpp-dev libcli11-dev nlohmann-json3-dev libsentencepiece0 libsentencepiece-dev
      libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpcre2-dev libgtest-dev libgmock-dev
      libgloo-dev pkgconf pkgconf-bin libpkgconf3)
rm -rf "$C"; mkdir -p "$C/debs" "$C/py" "$C/bin" "$C/corpora"
echo "gpu_stage: apt-get download ${#DEBS[@]} packages"
( cd "$C/debs" && apt-get download "${DEBS[@]}" >/dev/null 2>"$ROOT/$C/apt.log" ) \
  || { cat "$C/apt.log" >&2; die "apt-get download failed (run apt-get update first?)"; }
rm -f "$C/apt.log"
n=$(ls "$C"/debs/*.deb | wc -l); [ "$n" -eq ${#DEBS[@]} ] || die "expected ${#DEBS[@]} .debs in $C/debs, got $n"

SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -d "$SP/bitsandbytes" ] || die "$SP/bitsandbytes missing: run scripts/setup.sh"
BNB_VER=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')
cp -r "$SP/bitsandbytes" "$C/py/"
find "$C/py/bitsandbytes" \( -name __pycache__ -o -name 'libbitsandbytes_*.so' \) -prune -exec rm -rf {} +
cp "$SP/bitsandbytes/libbitsandbytes_cuda130.so" "$SP/bitsandbytes/libbitsandbytes_cpu.so" "$C/py/bitsandbytes/"
cp -r "$SP/bitsandbytes-$BNB_VER.dist-info" "$C/py/"
rm -f "$C/py/bitsandbytes-$BNB_VER.dist-info/RECORD"   # it lists the libraries left out

cp data/corpora/kjv.txt runs/tokenizers/kjv_bpe4k.model "$C/corpora/" \
  || die "data/corpora/kjv.txt or runs/tokenizers/kjv_bpe4k.model missing: run 'make demo' (or scripts/setup.sh) first"

if [ "${NO_BIN:-0}" != 1 ]; then
  # Same relative layout as build/ (the tests have build/qforge and build/tests/dist_probe baked in).
  for b in qforge tests/test_quant tests/test_apps tests/test_trainer tests/test_peft tests/dist_probe bench/allreduce_bw; do
    [ -x "build/$b" ] || die "build/$b missing: build it first (cmake --build build --target $(basename $b))"
    mkdir -p "$C/bin/$(dirname "$b")"
    strip -o "$C/bin/$b" "build/$b"
  done
  # Optional bench binary (dequant GB/s on CUDA), staged when this build has it.
  [ -x build/bench/dequant_bw ] && strip -o "$C/bin/bench/dequant_bw" build/bench/dequant_bw
  git rev-parse HEAD > "$C/bin/COMMIT"
  echo "built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!gpu_carry' || echo ' + uncommitted changes')" > "$C/bin/BUILD_INFO"
fi

carry=$(du -sb "$C" | cut -f1)
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
untracked=$(git ls-files -z -o --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((carry + tracked + untracked))
printf 'gpu_stage: carry %.1f MiB (debs %s, py %s, bin %s, corpora %s) + tracked %.1f MiB + untracked %.1f MiB = %.1f MiB (limit %s)\n' \
  "$(bc -l <<<"$carry/1048576")" "$(du -sh $C/debs | cut -f1)" "$(du -sh $C/py | cut -f1)" "$(du -sh $C/bin | cut -f1)" \
  "$(du -sh $C/corpora | cut -f1)" "$(bc -l <<<"$tracked/1048576")" "$(bc -l <<<"$untracked/1048576")" \
  "$(bc -l <<<"$total/1048576")" "$LIMIT_MIB"
[ "$total" -le $((LIMIT_MIB * 1048576)) ] || die "what travels is over ${LIMIT_MIB} MiB: stage with NO_BIN=1 or trim"
