#!/usr/bin/env bash
# The whole GPU check in one call on the GPU machine: build against that machine's python torch,
# run every test (gpu label included), run the benchmarks, print a summary table last.
# Usage there: scripts/device-check.sh [all|build|test|bench]   (default all; results under $OUT
# when set, else build-device/). Each stage fits one 10-minute call; build-device/ is kept between
# calls when carried or left in place.
# That machine has no GoogleTest / Google Benchmark / LLVM dev files: scripts/pack-device-deps.sh
# downloads their Debian packages here into .deps/debs; name `.deps/debs` in the device call's
# carry, and this script unpacks them there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-device}
mkdir -p "$out"
deps=$PWD/.deps
if [[ ! -d $deps/usr ]]; then scripts/unpack-device-deps.sh > "$out/deps.log" 2>&1 || { cat "$out/deps.log"; exit 1; }; fi
py=$(command -v python3)
prefix="$deps/usr;$deps/usr/lib/x86_64-linux-gnu/cmake;$($py -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
stage=${1:-all}
if [[ $stage == all || $stage == build ]]; then
  cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py" \
    -DCMAKE_PREFIX_PATH="$prefix" -DLLVM_DIR="$deps/usr/lib/llvm-16/lib/cmake/llvm" \
    -DSLEEF_INCLUDE_DIR="$deps/usr/include" -DSLEEF_LIBRARY="$deps/usr/lib/x86_64-linux-gnu/libsleef.so" \
    > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  cmake --build build-device -j 16 > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  grep -A2 "flashAttentionKernel" "$out/build.log" | grep -E "registers|spill" | sort | uniq -c > "$out/ptxas.txt"
fi
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
tests_rc=0
if [[ $stage == all || $stage == test ]]; then
  # GPU tests first (their log is the one that matters here), then everything else.
  # -j: the fuzz shards and op tests spread NVRTC's compiles over the cores; one GPU holds them all.
  (cd build-device && ctest -L gpu --output-on-failure -j 8 > "../$out/ctest-gpu.log" 2>&1) || tests_rc=1
  (cd build-device && ctest -LE gpu --output-on-failure -j 8 > "../$out/ctest.log" 2>&1) || tests_rc=1
  build-device/bin/kiln env | tee "$out/env.txt"
  build-device/bin/kiln demo --device cuda --json > "$out/demo.json" 2> "$out/demo.err"
fi
if [[ $stage == all || $stage == bench ]]; then
  build-device/bin/kiln_bench --benchmark_filter='_Cuda' --benchmark_format=console \
    --benchmark_out="$out/bench.json" --benchmark_out_format=json > "$out/bench.txt" 2>&1
  # torch.compile on the same elementwise chains (Python only), eager and copy beside it.
  $py scripts/elementwise_torch_compile.py --json "$out/torch_compile.json" > "$out/torch_compile.txt" 2>&1
  # Row reductions: eager, torch.compile and kiln with % of copy bandwidth.
  $py scripts/reduction_bench.py --library build-device/lib/libkiln.so --json "$out/reductions.json" \
    > "$out/reductions.txt" 2>&1
fi
echo "== summary ($(date -u +%F), $(head -2 "$out/gpu.txt" | tail -1)) =="
for log in "$out/ctest-gpu.log" "$out/ctest.log"; do
  [[ -f $log ]] && echo "$(basename "$log"): $(grep -E "tests passed|tests failed" "$log")"
done
[[ -f $out/ptxas.txt ]] && cat "$out/ptxas.txt"
[[ -f $out/bench.txt ]] && grep -E "^(Baseline|Kiln)_" "$out/bench.txt" |
  awk '{rate=""; for (i = 1; i <= NF; i++) if ($i ~ /TFLOP\/s=|bytes_per_second=|peak_MiB=|GB\/s=|pct_copy=/) rate = rate " " $i;
        printf "%-64s %10s %s%s\n", $1, $2, $3, rate}'
[[ -f $out/torch_compile.txt ]] && tail -15 "$out/torch_compile.txt"
[[ -f $out/reductions.txt ]] && cat "$out/reductions.txt"
[[ -f $out/demo.json ]] && cat "$out/demo.json"
exit $tests_rc
