#!/usr/bin/env bash
# Installs what kiln's build needs, idempotently: Debian packages, a project-local .venv with
# torch==2.11.0 (the version on the GPU machines), and the models the Python tests trace
# (torchvision, transformers). Each missing prerequisite that cannot be installed fails here with
# one line saying what and how to get it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
# torchvision 0.26 is the release built against torch 2.11 (pip keeps torch as it is).
# transformers: 5.x removed TorchScript support (huggingface/transformers#41688), and from 4.54 on
# GPT-2 builds its causal mask with torch.vmap, which torch.jit.trace cannot trace; 4.53.3 is the
# newest release that traces every model tests/python/test_zoo.py uses.
TORCHVISION_VERSION=0.26.0
TRANSFORMERS_VERSION=4.53.3
DEB_PACKAGES=(cmake ninja-build g++ python3-venv libgtest-dev libbenchmark-dev llvm-16-dev
              libsleef-dev ccache zlib1g-dev libzstd-dev libedit-dev libxml2-dev
              graphviz librsvg2-bin)  # the last two: kiln report --dot/--roofline pictures

fail() { echo "kiln setup: $*" >&2; exit 1; }

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    fail "missing Debian packages: ${missing[*]} (install them: apt-get install ${missing[*]})"
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "kiln setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -q >/dev/null || fail "apt-get update failed (no network to Debian's mirror?)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi

python3 -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null \
  || fail "python3 >= 3.9 is required (apt-get install python3)"

stamp=.venv/.torch-$TORCH_VERSION
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv || fail "cannot create .venv (apt-get install python3-venv)"
  echo "kiln setup: installing torch==$TORCH_VERSION into .venv (large download, once)" >&2
  .venv/bin/pip install -q --progress-bar off "torch==$TORCH_VERSION" numpy \
    || fail "pip install torch==$TORCH_VERSION failed (is PyPI reachable?)"
  touch "$stamp"
fi

zoo_stamp=.venv/.zoo-torchvision-$TORCHVISION_VERSION-transformers-$TRANSFORMERS_VERSION
if [ ! -f "$zoo_stamp" ]; then
  echo "kiln setup: installing torchvision==$TORCHVISION_VERSION transformers==$TRANSFORMERS_VERSION into .venv" >&2
  # torch is named too so that pip can never swap it for another build.
  .venv/bin/pip install -q --progress-bar off "torch==$TORCH_VERSION" \
      "torchvision==$TORCHVISION_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    || fail "pip install torchvision==$TORCHVISION_VERSION transformers==$TRANSFORMERS_VERSION failed (is PyPI reachable?)"
  touch "$zoo_stamp"
fi

# The Python package's build backend (pyproject.toml; `make build` installs the package into
# .venv), pytest for its tests, matplotlib for the roofline plots (scripts/roofline.py).
tools_stamp=.venv/.tools-scikit-build-core-pytest-matplotlib
if [ ! -f "$tools_stamp" ]; then
  echo "kiln setup: installing scikit-build-core, pytest and matplotlib into .venv" >&2
  .venv/bin/pip install -q --progress-bar off "torch==$TORCH_VERSION" "scikit-build-core>=0.10" pytest matplotlib \
    || fail "pip install scikit-build-core pytest matplotlib failed (is PyPI reachable?)"
  touch "$tools_stamp"
fi

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "kiln setup: no CUDA toolkit at $CUDA_HOME (set CUDA_HOME); building the CPU paths only" >&2
fi
