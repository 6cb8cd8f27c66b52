#!/usr/bin/env bash
# Installs kiln from the build tree into a prefix, builds examples/app against it with
# find_package(kiln), and runs it on the demo's encoder layer saved as a TorchScript file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
work=$build/example-app
rm -rf "$work" && mkdir -p "$work"
cmake --install "$build" --prefix "$work/install" >/dev/null
torch_prefix=$("$root/.venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S "$root/examples/app" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$work/install;$torch_prefix" -DPython3_EXECUTABLE="$root/.venv/bin/python" >/dev/null
cmake --build "$work/build" >/dev/null
"$build/bin/kiln" demo --save "$work/encoder.pt" --json >/dev/null
"$work/build/kiln_example_app" "$work/encoder.pt" 2,16,768 2,1,1,16
