"""`kiln bench MODEL.pt`: every variant runs in one process and reports its time, speed-up and
difference from the default executor's outputs; kiln's groups are timed; progress shows on a
terminal and nowhere else; bad usage is one line.

Usage: test_bench.py KILN_CLI"""
import json
import os
import pty
import subprocess
import sys
import tempfile

import torch

kiln = sys.argv[1]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 128)
        self.norm = torch.nn.LayerNorm(128)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc(x))
        return self.norm(h + x) * 0.5


with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, "block.pt")
    torch.jit.trace(Block().eval(), torch.randn(4, 128)).save(model)
    args = [kiln, "bench", model, "--input", "64,128:float32", "--rounds", "2"]

    done = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no progress into a pipe
    result = json.loads(done.stdout)
    names = [v["name"] for v in result["variants"]]
    assert names == ["torchscript", "freeze_optimize_for_inference", "onednn_graph", "kiln_executor", "kiln_optimize"], names
    for variant in result["variants"]:
        assert variant["ok"], variant
        assert variant["median_ms"] > 0 and variant["calls"] >= 2, variant
        assert variant["max_abs_error"] is not None and variant["max_abs_error"] < 1e-4, variant
    assert result["variants"][0]["speedup"] == 1.0
    groups = result["kiln_groups"]["groups"]
    assert groups and all(g["ns_per_call"] > 0 and g["calls"] > 0 and g["fallbacks"] == 0 for g in groups), groups

    # The table, and progress on a terminal.
    primary, secondary = pty.openpty()
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=secondary, text=True, timeout=600)
    os.close(secondary)
    progress = b""
    try:
        while True:
            chunk = os.read(primary, 65536)
            if not chunk:
                break
            progress += chunk
    except OSError:
        pass
    os.close(primary)
    assert done.returncode == 0
    assert "kiln::optimize" in done.stdout and "vs TorchScript" in done.stdout and "reference" in done.stdout, done.stdout
    text = progress.decode(errors="replace")
    assert "kiln bench: preparing oneDNN Graph fuser (frozen) (3 of 5)" in text, text
    assert "round 2 of 2: kiln::optimize" in text, text

    # Usage errors: one line, exit 2.
    for bad, fragment in ((["bench", model], "needs the model's inputs"),
                          (["bench", model, "--input", "64,128:float32", "--rounds", "0"], "--rounds"),
                          (["bench", model, "--input", "3,7:float32"], "rejects these inputs")):
        done = subprocess.run([kiln, *bad], capture_output=True, text=True, timeout=600)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], (bad, done.returncode, done.stderr)

print("kiln bench: five variants, groups timed, progress on a terminal only, usage errors: ok")
