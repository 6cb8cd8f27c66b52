#!/usr/bin/env bash
# Unpacks .deps/debs/*.deb into .deps/ (dpkg -x, or ar + tar where dpkg is absent), then gives
# LLVM's CMake package what it checks for: Debian splits LLVM over many packages, and
# LLVMExports fails unless every tool and library of all of them exists. kiln's build uses only
# the static libraries and headers of llvm-16-dev, so empty stand-ins satisfy the check.
# Run by scripts/pack-device-deps.sh here and by scripts/device-check.sh on the GPU machine.
set -euo pipefail
deps=$(cd "$(dirname "$0")/.." && pwd)/.deps
[[ -d $deps/debs ]] || { echo "unpack-device-deps: no $deps/debs (run scripts/pack-device-deps.sh)" >&2; exit 1; }
for deb in "$deps"/debs/*.deb; do
  if command -v dpkg > /dev/null; then
    dpkg -x "$deb" "$deps"
  else
    work=$(mktemp -d)
    (cd "$work" && ar x "$deb" && tar -xf data.tar.* -C "$deps")
    rm -rf "$work"
  fi
done
llvm=$deps/usr/lib/llvm-16
grep -ho '"${_IMPORT_PREFIX}/[^"]*"' "$llvm"/lib/cmake/llvm/LLVMExports-*.cmake | sed 's/"${_IMPORT_PREFIX}\///; s/"$//' |
  sort -u | while read -r file; do
    [[ -e $llvm/$file ]] || { mkdir -p "$(dirname "$llvm/$file")"; : > "$llvm/$file"; }
  done
echo "unpacked $(ls "$deps"/debs | wc -l) packages into $deps"
