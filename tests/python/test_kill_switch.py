"""KILN_DISABLE=1 is a kill switch for modules already fused: a file written by `kiln fuse`, run
with libkiln loaded and KILN_DISABLE=1, runs its original ops (the profiler shows guards, no fused
kernels) with the same results; without it, the fused kernels run."""
import os
import subprocess
import sys
import tempfile

import torch

kiln_cli, libkiln = sys.argv[1], sys.argv[2]

RUN = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
m = torch.jit.load(sys.argv[2])
x = torch.load(sys.argv[3])
for _ in range(3):
    m(x)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    y = m(x)
names = [e.name for e in prof.events()]
torch.save(y, sys.argv[4])
print(names.count("kiln::fusion_guard"), names.count("kiln::fusion_group"))
"""


class Child(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x * 2.0 + 1.0) * torch.sigmoid(x)


class Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.child = Child()

    def forward(self, x):
        return self.child(x) - 0.5


with tempfile.TemporaryDirectory() as tmp:
    x = torch.randn(64, 32)
    module = torch.jit.trace(Parent().eval(), x)
    expected = module(x)
    path, fused, inputs = f"{tmp}/m.pt", f"{tmp}/m.fused.pt", f"{tmp}/x.pt"
    module.save(path)
    torch.save(x, inputs)
    subprocess.run([kiln_cli, "fuse", path, fused], check=True, capture_output=True)
    for disabled in (False, True):
        env = dict(os.environ)
        env.pop("KILN_DISABLE", None)
        if disabled:
            env["KILN_DISABLE"] = "1"
        out = subprocess.run([sys.executable, "-c", RUN, libkiln, fused, inputs, f"{tmp}/y.pt"], env=env,
                             check=True, capture_output=True, text=True).stdout.split()
        guards, groups = int(out[0]), int(out[1])
        torch.testing.assert_close(torch.load(f"{tmp}/y.pt"), expected, rtol=1e-5, atol=1e-5)
        assert guards > 0, out
        assert (groups == 0) if disabled else (groups > 0), (disabled, out)
        print(f"KILN_DISABLE={int(disabled)}: {guards} guards, {groups} fused kernels ran, results match")
