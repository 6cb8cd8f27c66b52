# shellcheck shell=bash
# Sourced by scripts/pack-device.sh and scripts/device-check.sh: the carried payload's layout, the
# library path its binaries run with, and the check that they load. The payload
# (.device/payload.tar.gz) unpacks to bin/ (kiln, kiln_gpu_tests, kiln_bench; RUNPATH
# $ORIGIN/../lib), lib/ (libkiln.so.0 and the libraries the GPU machine lacks), lib/system/ (base
# system libraries, used only where the machine has none of that name), MANIFEST.txt (sha256sum -c)
# and BUILD-INFO.txt. torch comes from the machine itself: the same version (2.11.0) here and there.

# The payload's binaries and the library the Python benchmarks load.
# shellcheck disable=SC2034  # used by the scripts that source this file
KILN_PAYLOAD_BINARIES=(bin/kiln bin/kiln_gpu_tests bin/kiln_bench)
KILN_PAYLOAD_LIBRARY=lib/libkiln.so.0

# torch_library_path PYTHON: PYTHON's torch/lib and the nvidia wheels' lib folders beside it,
# ':'-joined (the binaries link libcudart.so.13 directly, which lives in nvidia/cu13/lib). Finds
# the package without importing torch.
torch_library_path() {
  "$1" -c '
import glob, importlib.util, os
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    raise SystemExit("no torch package for this python")
torch_dir = spec.submodule_search_locations[0]
site = os.path.dirname(torch_dir)
dirs = [os.path.join(torch_dir, "lib")] + sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))'
}

# have_system_library SONAME: whether the dynamic loader finds SONAME without LD_LIBRARY_PATH.
have_system_library() {
  local ldconfig dir
  ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
  if [[ -x $ldconfig ]] && "$ldconfig" -p 2> /dev/null | awk -v name="$1" '$1 == name { found = 1 } END { exit !found }'; then
    return 0
  fi
  for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64; do
    [[ -e $dir/$1 ]] && return 0
  done
  return 1
}

# carried_library_path PAYLOAD PYTHON: LD_LIBRARY_PATH for the payload's binaries: its lib/ first,
# then PYTHON's torch, then what the environment had (the driver's folder, where it is set so),
# then lib/system where the machine lacks one of those libraries (a folder on LD_LIBRARY_PATH
# comes before the system's own, so it is named only when needed).
carried_library_path() {
  local payload=$1 torch lib system=""
  torch=$(torch_library_path "$2") || return 1
  for lib in "$payload"/lib/system/*; do
    [[ -e $lib ]] || continue
    have_system_library "$(basename "$lib")" || system=$payload/lib/system
  done
  echo "$payload/lib:$torch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}${system:+:$system}"
}

# unpack_payload DEVICE_DIR DEST: DEVICE_DIR/payload.tar.gz into DEST, then checks it against its
# manifest.
unpack_payload() {
  mkdir -p "$2" && tar -xzf "$1/payload.tar.gz" -C "$2" && (cd "$2" && sha256sum --quiet -c MANIFEST.txt)
}

# check_carried_loads PAYLOAD PYTHON LOG: each carried binary starts and libkiln.so loads into
# PYTHON's torch (as the Python benchmarks load it), with the carried library path; output to LOG.
check_carried_loads() {
  local payload=$1 py=$2 log=$3 path rc=0
  path=$(carried_library_path "$payload" "$py") || { echo "no torch for $py" >> "$log"; return 1; }
  echo "LD_LIBRARY_PATH=$path" >> "$log"
  LD_LIBRARY_PATH=$path "$payload/bin/kiln" env >> "$log" 2>&1 || { echo "kiln env failed" >> "$log"; rc=1; }
  LD_LIBRARY_PATH=$path "$payload/bin/kiln_gpu_tests" --gtest_list_tests > /dev/null 2>> "$log" ||
    { echo "kiln_gpu_tests --gtest_list_tests failed" >> "$log"; rc=1; }
  LD_LIBRARY_PATH=$path "$payload/bin/kiln_bench" --benchmark_list_tests > /dev/null 2>> "$log" ||
    { echo "kiln_bench --benchmark_list_tests failed" >> "$log"; rc=1; }
  LD_LIBRARY_PATH=$path "$py" -c 'import sys, torch; torch.ops.load_library(sys.argv[1]); print("torch", torch.__version__)' \
    "$payload/lib/libkiln.so" >> "$log" 2>&1 || { echo "torch.ops.load_library(libkiln.so) failed" >> "$log"; rc=1; }
  return $rc
}

# travel_bytes REPO DIR...: bytes of what a call to the GPU machine would copy: the working tree
# (tracked files and untracked files that git does not ignore) and each carried DIR.
travel_bytes() {
  local repo=$1 tree carried=0 dir
  shift
  tree=$(cd "$repo" && git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1)
  for dir in "$@"; do carried=$((carried + $(du -sb "$dir" | cut -f1))); done
  echo "$((${tree:-0} + carried)) ${tree:-0}"
}

# mib BYTES: BYTES in MiB with one decimal.
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
