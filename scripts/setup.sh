#!/usr/bin/env bash
# Installs what kiln's build needs, idempotently: Debian packages, a project-local .venv with
# torch==2.11.0 (the version on the GPU machines). Each missing prerequisite that cannot be
# installed fails here with one line saying what and how to get it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
DEB_PACKAGES=(cmake ninja-build g++ python3-venv libgtest-dev libbenchmark-dev llvm-16-dev
              libsleef-dev ccache zlib1g-dev libzstd-dev libedit-dev libxml2-dev)

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

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "kiln setup: no CUDA toolkit at $CUDA_HOME (set CUDA_HOME); building the CPU paths only" >&2
fi
