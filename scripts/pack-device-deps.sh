#!/usr/bin/env bash
# Downloads the Debian packages the GPU machine lacks (GoogleTest, Google Benchmark, LLVM 16 dev
# files, SLEEF) into .deps/debs/ (about 59 MB: name `.deps/debs` in the device call's carry) and
# unpacks them here too, so the device build's configure can be checked on this machine.
# scripts/device-check.sh unpacks them on the GPU machine. Run here, once.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs
(cd .deps/debs && apt-get download libgtest-dev libbenchmark-dev libbenchmark1debian llvm-16-dev libllvm16 \
  libsleef-dev libsleef3 > /dev/null)
scripts/unpack-device-deps.sh
