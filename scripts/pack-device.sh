#!/usr/bin/env bash
# Packs what a GPU check carries to the GPU machine into .device/ (ignored by git): payload.tar.gz
# holds stripped copies of kiln, kiln_gpu_tests, kiln_bench and libkiln.so from a build made here
# (RUNPATH $ORIGIN/../lib in place of this machine's paths), the shared libraries they need that
# the GPU machine lacks (read off ldd: what is neither glibc, libstdc++, libgcc, the CUDA driver
# nor the torch wheels), MANIFEST.txt and BUILD-INFO.txt (copied beside it). The GPU machine has
# the same torch, 2.11.0; scripts/device-check.sh runs the binaries there against it.
# Prints the payload's size and what a call would copy (working tree + DEST), and fails when that
# is over KILN_DEVICE_LIMIT_MIB (60; a call takes 64 MiB). Exits 77 where the build lacks one of the
# binaries (a tree built without the benchmarks or the GPU tests has nothing to pack).
# Usage: scripts/pack-device.sh [--build DIR] [--dest DIR]      (defaults: build, .device)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=$repo/build
dest=$repo/.device
while (($#)); do
  case $1 in
    --build) build=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 2 ;;
  esac
done
limit_mib=${KILN_DEVICE_LIMIT_MIB:-60}
py=${PYTHON:-$repo/.venv/bin/python}
[[ -x $py ]] || py=python3
# shellcheck source=scripts/device-env.sh
source "$repo/scripts/device-env.sh"
fail() { echo "pack-device: $*" >&2; exit 1; }

build=$(cd "$build" 2> /dev/null && pwd) || { echo "pack-device: no build folder: skipped"; exit 77; }
for file in "${KILN_PAYLOAD_BINARIES[@]}" "$KILN_PAYLOAD_LIBRARY"; do
  [[ -e $build/$file ]] || { echo "pack-device: $build has no $file: nothing to pack"; exit 77; }
done
for tool in strip ldd gzip tar sha256sum; do command -v "$tool" > /dev/null || fail "needs $tool"; done
torch_path=$(torch_library_path "$py") || fail "no torch for $py"
site=${torch_path%%:*}
site=${site%/torch/lib}

stage=$(mktemp -d)
trap 'rm -rf "$stage" "$stage.manifest"' EXIT
chmod 755 "$stage"
mkdir -p "$stage/bin" "$stage/lib/system"
info=$stage/BUILD-INFO.txt
kept_runpath=""
commit=$(git -C "$repo" rev-parse --short HEAD 2> /dev/null || echo unknown)
[[ -n $(git -C "$repo" status --porcelain --untracked-files=no 2> /dev/null) ]] && commit="$commit (with uncommitted changes)"
{
  echo "packed:     $(date -u '+%F %T UTC') on $(uname -n)"
  echo "commit:     $commit"
  echo "build:      $build ($(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$build/CMakeCache.txt" 2> /dev/null))"
  echo "torch:      $(sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$site/torch/version.py" 2> /dev/null) ($site)"
} > "$info"

# Stripped copies; each binary finds lib/ beside it, and torch only through LD_LIBRARY_PATH.
for file in "${KILN_PAYLOAD_BINARIES[@]}" "$KILN_PAYLOAD_LIBRARY"; do
  strip --strip-unneeded -o "$stage/$file" "$(realpath "$build/$file")" || fail "strip $file"
  # shellcheck disable=SC2016  # $ORIGIN is for the dynamic loader
  runpath='$ORIGIN/../lib'
  # shellcheck disable=SC2016
  [[ $file == lib/* ]] && runpath='$ORIGIN'
  "$py" "$repo/scripts/elf_runpath.py" "$stage/$file" "$runpath" > /dev/null || kept_runpath+=" $file"
done
ln -s libkiln.so.0 "$stage/lib/libkiln.so"

# What the copies need, with lib/ and torch first as on the GPU machine: "name path" per library.
needs() {
  local file
  for file in "$stage"/bin/* "$stage/$KILN_PAYLOAD_LIBRARY"; do
    LD_LIBRARY_PATH=$stage/lib:$torch_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$file"
  done | awk '$2 == "=>" { print $1, ($3 == "not" ? "-" : $3) }' | sort -u
}
# Where each needed library comes from there: this payload, the machine's torch, its system, or
# carried (lib/, or lib/system/ for base libraries every distribution has).
origin() {
  case $1 in
    libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | libutil.so.* | libresolv.so.* | \
      ld-linux*.so.* | libstdc++.so.* | libgcc_s.so.*) echo system; return ;;
    libcuda.so* | libnvidia-*) echo driver; return ;;
  esac
  case $2 in
    -) echo missing ;;
    "$stage"/*) echo payload ;;
    "$site"/*) echo torch ;;
    *) case $1 in libz.so.* | libzstd.so.* | libtinfo.so.* | liblzma.so.* | libbz2.so.* | libffi.so.*) echo lib/system ;; *) echo lib ;; esac ;;
  esac
}
while read -r name path; do
  where=$(origin "$name" "$path")
  case $where in
    lib | lib/system) cp -L "$path" "$stage/$where/$name" || fail "copy $path" ;;
    missing) fail "nothing here provides $name (ldd)" ;;
  esac
done < <(needs)
# Again with the copies in place: each library resolves, and none from this machine's build.
{
  echo "libraries (besides glibc, libstdc++, libgcc and torch's; where the GPU machine finds them):"
  while read -r name path; do
    where=$(origin "$name" "$path")
    [[ $where == missing ]] && fail "nothing provides $name"
    [[ $path == "$build"/* ]] && fail "$name still resolves into $build"
    [[ $where == torch || $where == system ]] && continue
    echo "  $name: $where"
  done < <(needs)
  [[ -n $kept_runpath ]] && echo "runpath:   $kept_runpath keep the build's RUNPATH (elf_runpath.py refused)"
  echo "  (and $(needs | awk '{ print $2 }' | grep -c "^$site/") libraries from torch's wheels)"
  for file in "$stage"/bin/* "$stage"/lib/*.so* "$stage"/lib/system/*; do
    [[ -f $file && ! -L $file ]] && readelf -V -W "$file" 2> /dev/null | grep -o 'GLIBC_[0-9.]*\|GLIBCXX_[0-9.]*'
  done | sort -u -V | awk -F_ '{ last[$1] = $0 } END { print "needs:      " last["GLIBC"] ", " last["GLIBCXX"] " or newer" }'
  echo "files (bytes, gzip'ed bytes):"
  (cd "$stage" && find bin lib -type f | sort) | while read -r file; do
    printf '  %-28s %10d %10d\n' "$file" "$(stat -c %s "$stage/$file")" "$(gzip -6 -c "$stage/$file" | wc -c)"
  done
} >> "$info"

# The manifest, then one archive; BUILD-INFO.txt and MANIFEST.txt also beside it.
(cd "$stage" && find . -type f | sort | sed 's#^\./##' | xargs sha256sum > "$stage.manifest") || fail "sha256sum"
mv "$stage.manifest" "$stage/MANIFEST.txt"
mkdir -p "$dest" || fail "cannot create $dest"
rm -f "$dest/payload.tar.gz" "$dest/MANIFEST.txt" "$dest/BUILD-INFO.txt"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | gzip -6 > "$dest/payload.tar.gz.part" ||
  fail "tar | gzip"
mv "$dest/payload.tar.gz.part" "$dest/payload.tar.gz"
cp "$stage/MANIFEST.txt" "$stage/BUILD-INFO.txt" "$dest/"

cat "$dest/BUILD-INFO.txt"
payload=$(stat -c %s "$dest/payload.tar.gz")
read -r total tree < <(travel_bytes "$repo" "$dest")
echo "payload:    $dest/payload.tar.gz, $(mib "$payload") MiB"
echo "travels:    $(mib "$total") MiB (working tree $(mib "$tree") MiB + $(basename "$dest") $(mib $((total - tree))) MiB) of $limit_mib MiB allowed"
((total <= limit_mib * 1048576)) || fail "$(mib "$total") MiB would travel: over the $limit_mib MiB limit"
