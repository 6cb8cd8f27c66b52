"""kiln on TorchScript files saved from Python, traced and scripted, in fresh processes:
`kiln report` finds the groups, `kiln fuse` writes a file that Python (with libkiln loaded) runs
with the original's results."""
import json
import subprocess
import sys
import tempfile

import torch

kiln_cli, libkiln = sys.argv[1], sys.argv[2]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc(x) * 0.5 + 1.0)
        h = torch.sigmoid(h) * torch.tanh(h - 0.25)
        return self.norm(h) + x.sum(-1, keepdim=True).relu()


class Cell(torch.nn.Module):
    """The TorchScript tutorial's cell: Linear + tanh, a data-dependent gate, a scripted loop."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, h):
        for _ in range(3):
            new_h = torch.tanh(self.linear(x) + h)
            if bool(new_h.sum() > 0):
                h = new_h * 0.5 + 0.1
            else:
                h = torch.relu(new_h - 0.2) * 2.0
        return h


torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    block = Block().eval()
    x = torch.randn(8, 32)
    cell = Cell().eval()
    cx, ch = torch.randn(3, 4), torch.randn(3, 4)
    models = {
        "traced": (torch.jit.trace(block, x), (x,), ["8,32:float32"]),
        "scripted": (torch.jit.script(block), (x,), ["8,32:float32"]),
        "cell": (torch.jit.script(cell), (cx, ch), ["3,4:float32", "3,4:float32"]),
    }
    for name, (module, inputs, specs) in models.items():
        path, fused_path = f"{tmp}/{name}.pt", f"{tmp}/{name}.fused.pt"
        module.save(path)
        args = [kiln_cli, "report", path, "--json", "--dot", f"{tmp}/{name}.dot"]
        for spec in specs:
            args += ["--input", spec]
        report = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
        assert report["groups"], (name, report)
        ran = [g for g in report["groups"] if g["calls"] > 0 and g["kind"] == "elementwise"]
        assert ran and all(g["bytes_fused"] < g["bytes_unfused"] for g in ran), report
        # GEMMs and convolutions ran as library calls, each the way it measured fastest.
        library = [g for g in report["groups"] if g["kind"] in ("linear", "conv2d")]
        assert all(g["calls"] > 0 and g["choice"] for g in library), report
        assert "cluster_g0" in open(f"{tmp}/{name}.dot").read()
        subprocess.run([kiln_cli, "fuse", path, fused_path], check=True, capture_output=True)
        expected = module(*inputs)
        torch.ops.load_library(libkiln)
        fused = torch.jit.load(fused_path)
        assert "kiln::fusion_group" in str(fused.graph), name
        for _ in range(3):
            actual = fused(*inputs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        print(f"{name}: {len(report['groups'])} groups, fused file matches")
