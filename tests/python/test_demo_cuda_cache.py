"""`kiln demo --device cuda` twice on one fresh disk cache: the first process compiles every CUDA
kernel the encoder layer needs and stores it, the second loads every one from the cache and
compiles none; both match eager. Exits 77 (ctest: skipped) where no GPU is visible."""
import json
import os
import subprocess
import sys
import tempfile

kiln_cli = sys.argv[1]
env = json.loads(subprocess.run([kiln_cli, "env", "--json"], check=True, capture_output=True, text=True).stdout)
if env.get("gpu_count", 0) == 0:
    print("no CUDA device: skipped")
    sys.exit(77)

with tempfile.TemporaryDirectory() as cache:
    runs = []
    for _ in range(2):
        result = subprocess.run([kiln_cli, "demo", "--device", "cuda", "--json"], capture_output=True, text=True,
                                env=dict(os.environ, KILN_CACHE_DIR=cache))
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout))
    cold, warm = runs
    for run in runs:
        assert run["match"], run
        ran = [g for g in run["report"]["groups"] if g["kind"] == "elementwise" and g["calls"] > 0]
        assert ran, run["report"]
    assert cold["kernel_cache"]["misses"] > 0 and cold["kernel_cache"]["stores"] == cold["kernel_cache"]["misses"], cold
    assert warm["kernel_cache"]["misses"] == 0, warm["kernel_cache"]
    # Every lookup of the cold run hits in the warm one; groups sharing a kernel hit already cold.
    lookups = cold["kernel_cache"]["hits"] + cold["kernel_cache"]["misses"]
    assert warm["kernel_cache"]["hits"] == lookups, (cold["kernel_cache"], warm["kernel_cache"])
    print(f"cold: {cold['kernel_cache']}, warm: {warm['kernel_cache']}, fused {warm['fused_ms']:.3f} ms vs "
          f"unfused {warm['unfused_ms']:.3f} ms")
