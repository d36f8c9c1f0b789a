#!/usr/bin/env bash
# Idempotent set-up for qforge on Debian (run as root): system packages, the project venv with the
# pinned torch wheel (libtorch), and the embedded corpora. Re-running does only what is missing.
# Usage: scripts/setup.sh            (called by `make build|demo|test`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Every failure names the step that failed and what to rerun.
STEP="start"
step() { STEP="$1"; }
trap 'rc=$?; echo "[setup] FAILED at step: $STEP (exit $rc). Fix the cause shown above, then rerun: scripts/setup.sh (or the make target you ran); finished steps are not redone." >&2' ERR
# Build-time dependencies of what is built from source are pinned (PIP_CONSTRAINT also reaches
# pip's isolated build environments): the result must not depend on what pip's cache holds.
BUILD_PINS="$ROOT/scripts/build-constraints.txt"
APT_PKGS=(build-essential cmake ninja-build pkg-config ccache git python3-venv
          libyaml-cpp-dev libcli11-dev nlohmann-json3-dev libsentencepiece-dev sentencepiece
          libpcre2-dev googletest libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
          bible-kjv bible-kjv-text python3.11-doc
          libgloo-dev)  # gloo headers only: the torch wheel ships c10d's ProcessGroupGloo.hpp and gloo's
                        # code, not gloo's headers; Debian's (2022) compile against the 2.11 wheel (tested)

step "Debian packages (apt-get install)"
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Project venv with pinned wheels; a stamp keyed on requirements.txt makes this a no-op once done.
step "project venv .venv (pip install -r requirements.txt)"
PY=${PYTHON:-python3}
STAMP=.venv/.qforge-req-$(sha256sum requirements.txt | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  echo "[setup] creating .venv with $(grep -v '^#' requirements.txt | tr '\n' ' ')"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python - <<'PYEOF'
import torch
print(f"[setup] torch {torch.__version__} cuda {torch.version.cuda} cxx11abi {torch._C._GLIBCXX_USE_CXX11_ABI}")
assert torch.__version__.startswith("2.11.0"), torch.__version__
PYEOF
  rm -f .venv/.qforge-req-*; touch "$STAMP"
fi

# llama.cpp itself, for tests/interop to run the GGUF files qforge writes: llama-cpp-python built
# from its sdist (CPU; ggml's SIMD levels pinned so SOURCE_DATE_EPOCH cannot drop them), once: the
# wheel is cached in ~/.cache/qforge-wheels (about 7 minutes on 2 cores the first time).
step "llama-cpp-python sdist build"
LLCP_VERSION=0.3.36
if ! .venv/bin/python -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$LLCP_VERSION')" 2>/dev/null; then
  WHEELS="${QFORGE_WHEEL_CACHE:-$HOME/.cache/qforge-wheels}"
  mkdir -p "$WHEELS"
  wheel=$(ls "$WHEELS"/llama_cpp_python-$LLCP_VERSION-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "[setup] building llama-cpp-python $LLCP_VERSION from its sdist (CPU only; cached in $WHEELS)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
      PIP_CONSTRAINT="$BUILD_PINS" .venv/bin/pip wheel -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python -w "$WHEELS" \
      "llama-cpp-python==$LLCP_VERSION"
    wheel=$(ls "$WHEELS"/llama_cpp_python-$LLCP_VERSION-*.whl | head -1)
  fi
  .venv/bin/pip install -q --disable-pip-version-check "$wheel"
fi

# The GPTQ and compressed-tensors loaders transformers uses, for tests/interop to load what
# `qforge export --format gptq | compressed-tensors` writes: optimum + gptqmodel (sdist only: built
# without CUDA kernels - torch here is a +cu130 build without a GPU - and without build isolation,
# so it keeps the venv's torch; its CPU kernel is TorchQuantLinear) and compressed-tensors (0.14
# is the first that loads packed int4 everywhere). They live in an overlay venv, .venv-gptq, that
# sees .venv's packages through a .pth file: installed into .venv, gptqmodel 4.2.5 makes peft 0.21
# refuse to load any adapter (peft requires gptqmodel >= 7 once it is importable).
step "overlay venv .venv-gptq (gptqmodel/optimum/compressed-tensors)"
if .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gptqmodel') is None)" 2>/dev/null; then
  .venv/bin/pip uninstall -q -y gptqmodel optimum compressed-tensors >/dev/null 2>&1 || true
fi
if ! .venv-gptq/bin/python -c "import sys, importlib.metadata as m; sys.exit(not (m.version('gptqmodel') == '4.2.5' and m.version('compressed-tensors') == '0.14.0.1' and m.version('optimum') == '2.0.0'))" 2>/dev/null; then
  echo "[setup] overlay venv .venv-gptq: optimum 2.0.0, gptqmodel 4.2.5 (CPU) and compressed-tensors 0.14.0.1"
  rm -rf .venv-gptq
  "$PY" -m venv .venv-gptq
  SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$SITE" > "$(.venv-gptq/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/qforge_base.pth"
  # Exact pins: a venv is born with setuptools 65.5, which a range like "<82" accepts, and
  # gptqmodel's setup.py needs setuptools.command.bdist_wheel (setuptools >= 70.1).
  .venv-gptq/bin/pip install -q --disable-pip-version-check -c "$BUILD_PINS" setuptools wheel
  BUILD_CUDA_EXT=0 .venv-gptq/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation gptqmodel==4.2.5
  .venv-gptq/bin/pip install -q --disable-pip-version-check --no-deps optimum==2.0.0 compressed-tensors==0.14.0.1 \
    device-smi==0.4.1 logbar==0.0.4 threadpoolctl==3.8.0 tokenicer==0.0.14 random_word==1.0.13 hf_transfer==0.1.9 \
    maturin==1.16.0 pydantic==2.14.3 pydantic_core==2.50.4 loguru==0.7.3 annotated-types==0.8.0 typing-inspection==0.4.5
fi

# Embedded corpora (real text from Debian packages), generated into data/corpora/ (git-ignored).
step "embedded corpora (data/corpora)"
mkdir -p data/corpora
if [ ! -s data/corpora/kjv.txt ]; then
  echo "[setup] extracting the King James Bible text from bible-kjv"
  bible -f "Gen1:1-Rev22:21" | sed -E 's/^[0-9A-Za-z]+[0-9]+:[0-9]+ //' > data/corpora/kjv.txt.tmp
  mv data/corpora/kjv.txt.tmp data/corpora/kjv.txt
fi
if [ ! -d data/corpora/python-docs ]; then
  echo "[setup] collecting Python 3.11 documentation sources (.rst) from python3.11-doc"
  rm -rf data/corpora/python-docs.tmp && mkdir -p data/corpora/python-docs.tmp
  (cd /usr/share/doc/python3.11/html/_sources && find . -name '*.rst.txt' -print0 | \
     xargs -0 -I{} sh -c 'd=$0/$(dirname "{}"); mkdir -p "$d"; cp "{}" "$d/"' "$ROOT/data/corpora/python-docs.tmp")
  mv data/corpora/python-docs.tmp data/corpora/python-docs
fi
echo "[setup] ok"
