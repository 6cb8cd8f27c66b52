#!/usr/bin/env bash
# The GPU check in one call on the GPU machine, with binaries built here and carried there. Here:
#   scripts/pack-device.sh              packs .device/ (payload.tar.gz, about 35 MiB; ignored by git)
#   scripts/device-check.sh --dry-run   the whole check against that payload, without a GPU
# then one call on the GPU machine (6 to 8 minutes):
#   run(command="scripts/device-check.sh", carry=[".device"], timeout_s=540)
# Stages, each under `timeout` with its own limit, all within KILN_DEVICE_BUDGET_S (480 s):
#   unpack     60 s  unpacks the payload and checks it against its manifest; nvidia-smi; checks that
#                    the carried binaries load with that machine's python3 torch (`kiln env`, ...)
#   build     300 s  only where they do not load, or no payload came: the old route, building there
#                    against .deps (scripts/pack-device-deps.sh here; carry `.deps/debs` in place of
#                    `.device`: the two together pass the 64 MiB a call takes). It probably does not
#                    fit in the time, and leaves the later stages what is left of the budget.
#   gpu_tests 180 s  kiln_gpu_tests, every `gpu` test, in KILN_GPU_SHARDS (8) gtest shards side by
#                    side, KILN_GPU_QUICK=1, a fresh kernel cache
#   demo       45 s  `kiln demo --device cuda` on a fresh kernel cache, cold then warm
#   bench     330 s  kiln_bench: the elementwise _Cuda benchmarks, then kiln, flash, cuDNN attention
#                    and the unfused graph at S = 512, 1k, 4k, then kiln::linear's cuBLASLt GELU_BIAS against
#                    at::_addmm_activation (KILN_BENCH_FILTER=_Cuda runs every _Cuda benchmark instead);
#                    scripts/precision_gpu_check.py (BERT-base-shaped, 8 x 512, fp32 → kiln fp16);
#                    tests/python/test_hf_architectures.py --device cuda on 12 architectures
#                    (KILN_GPU_MODELS), and 5 in float16; scripts/reduction_bench.py, kiln and
#                    eager (KILN_REDUCTION_COMPILE=1 adds torch.compile);
#                    scripts/elementwise_torch_compile.py
# summary.md is written after every stage, so a run cut short still leaves one, and printed last.
# Results under $OUT (build-device-check/ where OUT is unset), at most 8 files: summary.md,
# gpu-tests.log, gpu-tests.xml, bench.json, rest.tar.gz (every other log and result).
#
# Usage: scripts/device-check.sh [--dry-run | --check-pack [BUILD_DIR]]
#   --dry-run      here, without a GPU: checks .device's size, then every stage against its payload,
#                  unpacked into a temp folder the same way, this machine's .venv torch standing in
#                  for the GPU machine's python3. The GPU tests skip, the benchmarks and the demo run
#                  CPU variants with tiny limits (or report no device); checks the result files.
#   --check-pack   packs BUILD_DIR (default build) into a temp folder, unpacks it, checks its
#                  manifest and size and that its binaries load with the carried library path
#                  (ctest device_check_pack; exits 77 where BUILD_DIR lacks one of the binaries).
# shellcheck disable=SC2317,SC2154  # stage_* run through `bash -c`; bin, lib, ld_path come from route.env
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 1
# shellcheck source=scripts/device-env.sh
source scripts/device-env.sh

mode=gpu
case ${1:-} in
  "") ;;
  --dry-run) mode=dry ;;
  --check-pack) mode=check ;;
  -h | --help) sed -n '2,/^set -uo/{/^# shellcheck/d;/^set -uo/d;s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  *) echo "usage: scripts/device-check.sh [--dry-run | --check-pack [BUILD_DIR]]  (--help says more)" >&2; exit 2 ;;
esac
if [[ $mode == gpu ]]; then
  py=${KILN_PYTHON:-python3}
else
  py=${KILN_PYTHON:-$repo/.venv/bin/python}
  [[ -x $py ]] || py=python3
fi
limit_mib=${KILN_DEVICE_LIMIT_MIB:-60}

# ---- --check-pack: pack a build into a temp folder, unpack it as the GPU machine does, load it ----
if [[ $mode == check ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  PYTHON=$py scripts/pack-device.sh --build "${2:-$repo/build}" --dest "$tmp/device"
  rc=$?
  ((rc == 0)) || exit "$rc"  # 77: nothing to pack in this build tree (ctest: skipped)
  unpack_payload "$tmp/device" "$tmp/payload" || { echo "device-check: the payload does not unpack or match its manifest"; exit 1; }
  if ! check_carried_loads "$tmp/payload" "$py" "$tmp/loads.log"; then
    cat "$tmp/loads.log"
    echo "device-check: the carried binaries do not load with the carried library path"
    exit 1
  fi
  grep -E '^(torch |kiln )' "$tmp/loads.log"
  echo "device-check: the payload packs under $limit_mib MiB, unpacks, matches its manifest and loads"
  exit 0
fi

# ---- a check on the GPU machine, or its dry run here ----
# The dry run first checks what would travel: the payload, and its size with the working tree.
if [[ $mode == dry ]]; then
  [[ -f .device/payload.tar.gz ]] || { echo "device-check: no .device/payload.tar.gz: run scripts/pack-device.sh first" >&2; exit 1; }
  read -r total tree < <(travel_bytes "$repo" .device)
  echo "payload: $(mib "$(stat -c %s .device/payload.tar.gz)") MiB; a call copies $(mib "$total") MiB" \
    "(working tree $(mib "$tree") MiB + .device) of $limit_mib MiB allowed"
  ((total <= limit_mib * 1048576)) || { echo "device-check: over the $limit_mib MiB limit" >&2; exit 1; }
  for file in "${KILN_PAYLOAD_BINARIES[@]}" "$KILN_PAYLOAD_LIBRARY"; do
    [[ build/$file -nt .device/payload.tar.gz ]] && echo "warning: build/$file is newer than the payload (run scripts/pack-device.sh again)"
  done
fi

out=${OUT:-$repo/build-device-check}
[[ -z ${OUT:-} ]] && rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-device-check.XXXXXX")
mkdir -p "$work/logs" "$work/notes"
budget=${KILN_DEVICE_BUDGET_S:-480}
reserve=20  # seconds kept for the last summary and archive
started=$(date +%s)
export repo mode py work

# note TEXT: a line for the current stage's row in summary.md.
note() { echo "$*" >> "$work/notes/$KILN_STAGE"; echo "note: $*"; }

# step NAME LIMIT OUTPUT COMMAND...: COMMAND under its own limit, cut to the stage's end; stdout to
# OUTPUT, stderr to logs/NAME.err; a row in summary.md. In the dry run, a command that finds no CUDA
# device is reported so, not as a failure.
step() {
  local name=$1 limit=$2 output=$3 left begin rc status
  shift 3
  left=$((KILN_STAGE_END - $(date +%s) - 2))
  ((limit > left)) && limit=$left
  if ((limit < 2)); then
    printf '%s\t%s\tskipped: no time left\t0\t0\t\n' "$KILN_STAGE" "$name" >> "$work/steps.tsv"
    return 1
  fi
  begin=$(date +%s)
  timeout --foreground -k 5 "$limit" "$@" > "$output" 2> "$work/logs/$name.err"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  if ((rc != 0)) && [[ $mode == dry ]] && grep -qi 'no CUDA device' "$output" "$work/logs/$name.err"; then
    status="no device"
    rc=0
  fi
  printf '%s\t%s\t%s\t%d\t%d\t%s\n' "$KILN_STAGE" "$name" "$status" $(($(date +%s) - begin)) "$limit" \
    "${output#"$work"/}" >> "$work/steps.tsv"
  echo "$name: $status"
  return "$rc"
}

# write_route ROUTE BIN LIB LD_PATH: what the later stages run (route.env, sourced by them).
write_route() { printf 'route=%q\nbin=%q\nlib=%q\nld_path=%q\n' "$@" > "$work/route.env"; }

stage_unpack() {
  date -u
  uname -srm
  # The carried binaries need glibc 2.36 or newer (BUILD-INFO.txt's "needs" line).
  echo "$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2> /dev/null), glibc" \
    "$(ldd --version 2> /dev/null | head -1 | awk '{ print $NF }'), $(nproc) CPU threads" | tee "$work/system.txt"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi > "$work/nvidia-smi.txt" 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$work/gpu.txt" 2>&1
    cat "$work/gpu.txt"
  else
    echo "no nvidia-smi here" | tee "$work/nvidia-smi.txt"
  fi
  local payload=$work/payload path
  [[ -f $repo/.device/payload.tar.gz ]] || { note "no .device/payload.tar.gz came with the call"; return 1; }
  unpack_payload "$repo/.device" "$payload" || { note "the payload does not unpack or match its manifest"; return 1; }
  cp "$payload/BUILD-INFO.txt" "$work/"
  cat "$payload/BUILD-INFO.txt"
  if ! check_carried_loads "$payload" "$py" "$work/logs/loads.log"; then
    cat "$work/logs/loads.log"
    note "the carried binaries do not load here (logs/loads.log)"
    return 1
  fi
  path=$(carried_library_path "$payload" "$py")
  write_route carried "$payload/bin" "$payload/lib" "$path"
  LD_LIBRARY_PATH=$path "$payload/bin/kiln" env --json > "$work/env.json"
  cat "$work/logs/loads.log"
  note "the carried binaries load with $(grep -m1 '^torch ' "$work/logs/loads.log")" \
    "$([[ $path == */lib/system* ]] && echo "and lib/system")"
}

# The old route: build there against the Debian packages of .deps (GoogleTest, Google Benchmark,
# LLVM 16, SLEEF), which must have come with the call (`.deps/debs`).
stage_build() {
  local deps=$repo/.deps torch prefix
  [[ -d $deps/debs ]] || { note "no .deps/debs came with the call either: nothing to build with"; return 1; }
  [[ -d $deps/usr ]] || "$repo/scripts/unpack-device-deps.sh" || return 1
  torch=$(torch_library_path "$py") || return 1
  prefix="$deps/usr;$deps/usr/lib/x86_64-linux-gnu/cmake;$("$py" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
  cmake -S "$repo" -B "$repo/build-device" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$py")" \
    -DCMAKE_PREFIX_PATH="$prefix" -DLLVM_DIR="$deps/usr/lib/llvm-16/lib/cmake/llvm" \
    -DSLEEF_INCLUDE_DIR="$deps/usr/include" -DSLEEF_LIBRARY="$deps/usr/lib/x86_64-linux-gnu/libsleef.so" || return 1
  cmake --build "$repo/build-device" -j "$(nproc)" --target kiln kiln_cli kiln_gpu_tests kiln_bench || return 1
  write_route built "$repo/build-device/bin" "$repo/build-device/lib" \
    "$repo/build-device/lib:$torch:$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  LD_LIBRARY_PATH=$torch:$deps/usr/lib/x86_64-linux-gnu "$repo/build-device/bin/kiln" env --json > "$work/env.json"
  note "built kiln, kiln_gpu_tests and kiln_bench here"
}

# Every gpu-labelled gtest (the ctest label `gpu` is kiln_gpu_tests'), in gtest shards side by side,
# each process with its own log and XML; one GPU holds them all.
stage_gpu_tests() {
  # shellcheck source=/dev/null
  source "$work/route.env"
  local shards=${KILN_GPU_SHARDS:-8} dir=$work/gpu-tests index pids=() rc=0
  [[ $mode == dry ]] && shards=2
  mkdir -p "$dir/cache"
  export LD_LIBRARY_PATH=$ld_path KILN_GPU_QUICK=1 KILN_CACHE_DIR=$dir/cache
  "$bin/kiln_gpu_tests" --gtest_list_tests > "$dir/list.txt" || return 1
  for ((index = 0; index < shards; index++)); do
    (cd "$dir" && GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$index exec "$bin/kiln_gpu_tests" \
      --gtest_output="xml:$dir/shard-$index.xml" > "$dir/shard-$index.log" 2>&1) &
    pids+=($!)
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}" || { echo "shard $index failed"; rc=1; }
  done
  note "$shards shards"
  return "$rc"
}

stage_bench() {
  # shellcheck source=/dev/null
  source "$work/route.env"
  local dir=$work/bench rc=0 elementwise attention compile=(--no-compile)
  mkdir -p "$dir/cache"
  export LD_LIBRARY_PATH=$ld_path KILN_CACHE_DIR=$dir/cache PYTHONUNBUFFERED=1
  if [[ $mode == dry ]]; then
    step kiln_bench_cuda 20 "$dir/kiln_bench_cuda.txt" "$bin/kiln_bench" --benchmark_filter=_Cuda || rc=1
    step kiln_bench_cpu 30 "$dir/kiln_bench_cpu.txt" "$bin/kiln_bench" --benchmark_filter='^(Kiln|Baseline_Eager)_arith2/1048576/' \
      --benchmark_min_time=0.01 --benchmark_out="$dir/kiln_bench_cpu.json" --benchmark_out_format=json || rc=1
    step reductions 60 "$dir/reductions.txt" "$py" scripts/reduction_bench.py --device cpu --no-compile --shapes small \
      --repeats 3 --library "$lib/libkiln.so" --json "$dir/reductions.json" || rc=1
    step torch_compile 30 "$dir/torch_compile.txt" "$py" scripts/elementwise_torch_compile.py --repeats 3 \
      --json "$dir/torch_compile.json" || rc=1
    step precision 30 "$dir/precision.txt" "$py" scripts/precision_gpu_check.py "$lib/libkiln.so" --device cpu \
      --batch 2 --seq 32 --layers 2 --rounds 3 --json "$dir/precision.json" --profile "$dir/precision-profile.txt" || rc=1
    step models 120 "$dir/models.txt" "$py" tests/python/test_hf_architectures.py "$lib/libkiln.so" --device cpu \
      bert_classifier resnet18_scripted || rc=1
    note "no device: kiln_bench's _Cuda set is empty; CPU variants instead"
    return "$rc"
  fi
  # Benchmarks carry their own MinTime (0.05 s of GPU time in windows of 10 calls; attention 0.2 s);
  # --benchmark_min_time shortens the rest. stdbuf: a run cut short keeps its console lines (its
  # JSON is written at the end).
  if [[ -n ${KILN_BENCH_FILTER:-} ]]; then
    step kiln_bench 100 "$dir/kiln_bench.txt" stdbuf -oL "$bin/kiln_bench" --benchmark_filter="$KILN_BENCH_FILTER" \
      --benchmark_min_time=0.05 --benchmark_out="$dir/kiln_bench.json" --benchmark_out_format=json || rc=1
  else
    elementwise='^(Kiln_Cuda|Baseline_Eager_Cuda|Baseline_TorchFuser_Cuda|Baseline_Copy_Cuda|Kiln_LaunchOverhead_Cuda|Baseline_EagerLaunch_Cuda)(/|$)'
    attention='^(Kiln_Attention|Baseline_Sdpa_Flash|Baseline_Sdpa_Cudnn|Baseline_Unfused)_Cuda/S:(512|1024|4096)/D:64/bf16:0/'
    step kiln_bench_elementwise 50 "$dir/kiln_bench_elementwise.txt" stdbuf -oL "$bin/kiln_bench" \
      --benchmark_filter="$elementwise" --benchmark_min_time=0.05 \
      --benchmark_out="$dir/kiln_bench_elementwise.json" --benchmark_out_format=json || rc=1
    step kiln_bench_attention 55 "$dir/kiln_bench_attention.txt" stdbuf -oL "$bin/kiln_bench" \
      --benchmark_filter="$attention" --benchmark_out="$dir/kiln_bench_attention.json" --benchmark_out_format=json || rc=1
    # Issue 11's GPU target: kiln::linear's cuBLASLt GELU_BIAS against at::_addmm_activation.
    step kiln_bench_library 40 "$dir/kiln_bench_library.txt" stdbuf -oL "$bin/kiln_bench" \
      --benchmark_filter='^(Kiln_LinearBiasGelu|Baseline_AddmmActivation|Baseline_Eager_LinearGelu)_Cuda/' \
      --benchmark_min_time=0.05 --benchmark_out="$dir/kiln_bench_library.json" --benchmark_out_format=json || rc=1
  fi
  # Issue 12's GPU target: a BERT-base-shaped fp32 model at 8 x 512 through kiln::optimize in fp16
  # against TorchScript's fp32 executor, kiln's attention inside (profiler).
  step precision 60 "$dir/precision.txt" "$py" scripts/precision_gpu_check.py "$lib/libkiln.so" --device cuda \
    --batch 8 --seq 512 --rounds 10 --json "$dir/precision.json" --profile "$dir/precision-profile.txt" || rc=1
  # Real architectures on CUDA through every route (tests/python/test_hf_architectures.py: optimize,
  # another shape, saved and loaded, the executor pass), in float32 then float16; a subset sized to
  # the step (KILN_GPU_MODELS names others). That machine's Transformers is its own version: a
  # failure before kiln runs says so.
  local models
  read -r -a models <<< "${KILN_GPU_MODELS:-bert_classifier deberta_v2 llama gpt_neox t5 bart clip_vision swin convnext resnet18_scripted mobilenet_v3_large_scripted vit_b_32}"
  step models 100 "$dir/models.txt" "$py" tests/python/test_hf_architectures.py "$lib/libkiln.so" --device cuda \
    "${models[@]}" || rc=1
  step models_fp16 60 "$dir/models-fp16.txt" "$py" tests/python/test_hf_architectures.py "$lib/libkiln.so" \
    --device cuda --dtype float16 bert_classifier llama swin convnext resnet18_scripted || rc=1
  [[ ${KILN_REDUCTION_COMPILE:-0} == 1 ]] && compile=()
  step reductions 35 "$dir/reductions.txt" "$py" scripts/reduction_bench.py --library "$lib/libkiln.so" --repeats 20 \
    "${compile[@]}" --json "$dir/reductions.json" || rc=1
  step torch_compile 40 "$dir/torch_compile.txt" "$py" scripts/elementwise_torch_compile.py --repeats 20 \
    --json "$dir/torch_compile.json" || rc=1
  return "$rc"
}

stage_demo() {
  # shellcheck source=/dev/null
  source "$work/route.env"
  local dir=$work/demo device=cuda rc=0
  mkdir -p "$dir/cache"
  export LD_LIBRARY_PATH=$ld_path KILN_CACHE_DIR=$dir/cache
  if [[ $mode == dry ]]; then
    step demo_cuda 15 "$dir/demo-cuda.json" "$bin/kiln" demo --device cuda --json  # no device: exits 2
    device=cpu
    note "no device: the CPU demo instead"
  fi
  step demo_cold 25 "$dir/demo-cold.json" "$bin/kiln" demo --device "$device" --json || rc=1
  step demo_warm 20 "$dir/demo-warm.json" "$bin/kiln" demo --device "$device" --json || rc=1
  return "$rc"
}

# write_results [--final]: summary.md and the other files under $out, from what the stages left;
# a bare summary where python3 fails.
write_results() {
  local rc
  "$py" "$repo/scripts/device_check_summary.py" --work "$work" --out "$out" --mode "$mode" \
    --started "$started" --budget "$budget" "$@" 2> "$work/logs/summary.err"
  rc=$?
  ((rc == 3)) && return 1  # --final: a result file breaks the limits (summary.md says which)
  if ((rc != 0)); then
    { echo "# kiln GPU check (the summary script failed: logs/summary.err)"; echo; cat "$work/stages.tsv"; } > "$out/summary.md"
    tar -C "$work" -czf "$out/rest.tar.gz" --exclude=payload --exclude=cache . 2> /dev/null
  fi
  return 0
}

export -f note step write_route stage_unpack stage_build stage_gpu_tests stage_bench stage_demo \
  torch_library_path have_system_library carried_library_path unpack_payload check_carried_loads

current_stage=""
stage_pid=""
stage_began=0
failed=0
# run_stage NAME LIMIT: stage_NAME in a shell of its own under `timeout`, its limit cut so that the
# run ends within the budget; its status and seconds go to stages.tsv, then the results are rewritten.
run_stage() {
  local name=$1 limit=$2 left begin rc status
  left=$((started + budget - reserve - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    printf '%s\tskipped\t0\t0\n' "$name" >> "$work/stages.tsv"
    echo "== $name: skipped, no time left"
    failed=1
    write_results
    return 1
  fi
  echo "== $name (limit $limit s)"
  begin=$(date +%s)
  current_stage=$name
  stage_began=$begin
  # In the background, so that a signal to this script stops the stage at once (on_signal).
  KILN_STAGE=$name KILN_STAGE_END=$((begin + limit)) timeout -k 5 "$limit" bash -c "stage_$name" > "$work/logs/$name.log" 2>&1 &
  stage_pid=$!
  wait "$stage_pid"
  rc=$?
  current_stage=""
  stage_pid=""
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  ((rc == 0)) || failed=1
  printf '%s\t%s\t%d\t%d\n' "$name" "$status" $(($(date +%s) - begin)) "$limit" >> "$work/stages.tsv"
  echo "   $status in $(($(date +%s) - begin)) s"
  write_results
  return "$rc"
}

# The summary is written however the run ends.
finish() {
  local rc=$?
  trap - EXIT
  [[ -n $current_stage ]] && printf '%s\tinterrupted\t%d\t\n' "$current_stage" $(($(date +%s) - stage_began)) >> "$work/stages.tsv"
  write_results --final || { echo "device-check: a result file breaks the limits of what comes back"; rc=1; }
  echo
  # The call's reply keeps the output's last 12,000 characters: long benchmark tables stay in the file.
  if (($(wc -c < "$out/summary.md") > 11000)); then
    sed '/^## Benchmarks/,$d' "$out/summary.md"
    echo "(the benchmark tables and the list of files are in summary.md)"
  else
    cat "$out/summary.md"
  fi
  [[ $mode == dry ]] && rm -rf "$work"
  exit "$rc"
}
# A signal stops the stage in flight (timeout passes it on to the stage's processes), then finish.
on_signal() {
  [[ -n $stage_pid ]] && kill -TERM "$stage_pid" 2> /dev/null && wait "$stage_pid"
  exit 143
}
trap finish EXIT
trap on_signal TERM INT

run_stage unpack 60
if [[ ! -f $work/route.env && $mode == gpu ]]; then
  run_stage build 300
fi
if [[ -f $work/route.env ]]; then
  run_stage gpu_tests 180
  run_stage demo 45  # before the benchmarks: short, and a check rather than a measurement
  run_stage bench 330
else
  failed=1
fi
echo "device-check: done in $(($(date +%s) - started)) s (results in $out)"
exit "$failed"
