#!/usr/bin/env bash
# Unpacks the Debian packages the GPU machine lacks (GoogleTest, Google Benchmark, LLVM 16 dev
# files, SLEEF) into .deps/, which the device call carries. Run here, once.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
mkdir -p .deps/debs && cd .deps/debs
apt-get download libgtest-dev libbenchmark-dev libbenchmark1debian llvm-16-dev libllvm16 \
  libsleef-dev libsleef3 >/dev/null
for deb in *.deb; do dpkg -x "$deb" ..; done
echo "unpacked into .deps/: $(ls)"
