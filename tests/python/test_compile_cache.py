"""kiln compile and kiln cache, end to end with no GPU: the demo's encoder layer saved as a file is
compiled for sm_90 into a fresh cache (every kernel compiled), then again (every kernel found in
the cache); cache info counts the files; a corrupt file is recompiled; cache clear empties it; an
unknown arch and missing inputs are usage errors (exit 2). The same for the host CPU
(--arch host): its object code is cached too, and a demo run on a warmed cache compiles nothing."""
import json
import os
import subprocess
import sys
import tempfile

kiln = sys.argv[1]


def run(*args, env, check=True):
    result = subprocess.run([kiln, *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


with tempfile.TemporaryDirectory() as scratch:
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(scratch, "cache"))
    model = os.path.join(scratch, "layer.pt")
    run("demo", "--save", model, env=env)
    # The demo compiled its CPU kernels into the cache: start from an empty one.
    run("cache", "clear", env=env)
    compile_args = ["compile", model, "--input", "8,128,768:float32", "--input", "8,1,1,128:float32",
                    "--arch", "sm_90", "--json"]

    cold = json.loads(run(*compile_args, env=env).stdout)
    assert cold["arch"] == "sm_90", cold
    assert cold["kernels"], "no kernels recorded"
    assert all(k["status"] == "compiled" for k in cold["kernels"]), cold
    assert all(k["compile_ms"] > 0 and k["registers"] > 0 and k["spill_bytes"] == 0 for k in cold["kernels"]), cold
    assert os.stat(env["KILN_CACHE_DIR"]).st_mode & 0o777 == 0o700

    warm = json.loads(run(*compile_args, env=env).stdout)
    assert [k["name"] for k in warm["kernels"]] == [k["name"] for k in cold["kernels"]], (cold, warm)
    assert all(k["status"] == "cached" for k in warm["kernels"]), warm

    # Every kernel is a file; so is each choice kiln::attention measured on the way (it times
    # ATen's SDPA against its kernel once per shape class and remembers the faster).
    info = json.loads(run("cache", "info", "--json", env=env).stdout)
    assert info["files"] >= len(cold["kernels"]) and info["bytes"] > 0, info

    # Corrupt one cached kernel: it is detected and compiled again, the others stay cached.
    victim = os.path.join(env["KILN_CACHE_DIR"], cold["kernels"][0]["cache_key"] + ".kbin")
    with open(victim, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"corrupted!")
    repaired = json.loads(run(*compile_args, env=env).stdout)
    statuses = {k["name"]: k["status"] for k in repaired["kernels"]}
    assert statuses[cold["kernels"][0]["name"]] == "compiled", repaired
    assert list(statuses.values()).count("cached") == len(statuses) - 1, repaired

    cleared = json.loads(run("cache", "clear", "--json", env=env).stdout)
    assert cleared["removed"] == info["files"], (cleared, info)
    assert json.loads(run("cache", "info", "--json", env=env).stdout)["files"] == 0

    # The host CPU: compiled in parallel (two jobs), then every kernel found in the cache.
    host_args = ["compile", model, "--input", "8,128,768:float32", "--input", "8,1,1,128:float32",
                 "--arch", "host", "--jobs", "2", "--json"]
    host_cold = json.loads(run(*host_args, env=env).stdout)
    assert host_cold["kernels"] and host_cold["failed"] == 0 and host_cold["jobs"] == 2, host_cold
    assert all(k["status"] == "compiled" and k["compile_ms"] > 0 for k in host_cold["kernels"]), host_cold
    assert host_cold["compiler"].startswith("llvm "), host_cold
    host_warm = json.loads(run(*host_args, env=env).stdout)
    assert all(k["status"] == "cached" for k in host_warm["kernels"]), host_warm
    assert sorted(k["cache_key"] for k in host_warm["kernels"]) == sorted(k["cache_key"] for k in host_cold["kernels"])
    # A demo run on the warmed cache loads every CPU kernel it needs and compiles none.
    demo = json.loads(run("demo", "--json", env=env).stdout)
    assert demo["match"] and demo["kernel_cache"]["misses"] == 0 and demo["kernel_cache"]["hits"] > 0, demo
    bad_jobs = run("compile", model, "--input", "8,128,768:float32", "--arch", "host", "--jobs", "0", env=env,
                   check=False)
    assert bad_jobs.returncode == 2 and "--jobs" in bad_jobs.stderr, bad_jobs

    bad_arch = run("compile", model, "--input", "8,128,768:float32", "--arch", "sm_1", env=env, check=False)
    assert bad_arch.returncode == 2 and "unknown --arch" in bad_arch.stderr, bad_arch
    no_input = run("compile", model, "--arch", "sm_90", env=env, check=False)
    assert no_input.returncode == 2 and "--input" in no_input.stderr, no_input

print("ok")
