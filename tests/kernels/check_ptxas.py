"""Every instantiation of the CUDA attention kernel compiles for sm_80 and sm_90 with no register
spills and no stack frame: nvcc -cubin with ptxas -v, the report parsed per kernel."""
import re
import subprocess
import sys
import tempfile

nvcc, source, include = sys.argv[1], sys.argv[2], sys.argv[3]
expected = {(dtype, dim) for dtype in ("__half", "__nv_bfloat16") for dim in (32, 64, 96, 128)}
for arch in ("sm_80", "sm_90"):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        run = subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas=-v",
                              "--expt-relaxed-constexpr", "-I", include, source, "-o", cubin.name],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "warning" not in log.lower(), log
    seen = set()
    # ptxas reports each entry as "Compiling entry function 'NAME' for 'ARCH'", then its frame.
    for name, body in re.findall(r"Compiling entry function '([^']+)' for '" + arch + r"'\n(.*?)(?=ptxas info    : Compiling|\Z)",
                                 log, re.S):
        match = re.search(r"flashAttentionKernelI(6__half|13__nv_bfloat16)Li(\d+)E", name)
        assert match, name
        dtype, dim = match.group(1).lstrip("0123456789"), int(match.group(2))
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        registers = re.search(r"Used (\d+) registers", body)
        assert frame and registers, body
        assert frame.groups() == ("0", "0", "0"), (arch, dtype, dim, frame.group(0))
        assert int(registers.group(1)) <= 255
        seen.add((dtype, dim))
        print(f"{arch} {dtype:14} head_dim {dim:3}: {registers.group(1)} registers, no spills")
    assert seen == expected, (arch, sorted(expected - seen))
