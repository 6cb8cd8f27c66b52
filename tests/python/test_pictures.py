"""The pictures: `kiln report --roofline` (SVG drawn by kiln, PNG through rsvg-convert), `kiln report
--dot` rendered by Graphviz, and scripts/roofline.py on Google Benchmark JSON. Each output is
checked for what it must show (a point per group, the copy roof, the title), and each way to fail
is one line and an exit code.

Usage: test_pictures.py KILN_CLI"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

kiln = sys.argv[1]
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x, y):
        h = self.norm(x + y)
        return torch.softmax(h * 0.5, -1), torch.sigmoid(x) * y + 1.0


def run(*args):
    return subprocess.run([kiln, *args], capture_output=True, text=True, timeout=600)


def one_line(result, code, fragment):
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, "block.pt")
    torch.jit.script(Block().eval()).save(model)
    inputs = ["--input", "64,512,256:float32", "--input", "64,512,256:float32"]

    # The SVG: one point per group that ran, the copy roof, the title naming model and CPU.
    svg_path = os.path.join(tmp, "roof.svg")
    done = run("report", model, *inputs, "--roofline", svg_path)
    assert done.returncode == 0, done.stderr
    svg = open(svg_path).read()
    report = json.loads(run("report", model, *inputs, "--json").stdout)
    ran = [g for g in report["groups"] if g["kind"] == "elementwise"]
    assert len(ran) == 2, report
    assert svg.count("<circle") == len(ran) + 1, svg  # + the legend's marker
    assert "<polyline" in svg and "copy of as many bytes" in svg
    assert "kiln groups in block.pt" in svg
    rates = [float(r) for r in re.findall(r"fusion_group_\d+: ([0-9.]+) GB/s", svg)]
    assert len(rates) == 2 and all(r > 0 for r in rates), rates
    # The report's own timing, beside the bytes.
    assert all(g["ns_per_call"] > 0 for g in ran), report

    # PNG through rsvg-convert, or one line saying what to install.
    png_path = os.path.join(tmp, "roof.png")
    done = run("report", model, *inputs, "--roofline", png_path)
    if shutil.which("rsvg-convert"):
        assert done.returncode == 0, done.stderr
        assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        one_line(done, 1, "needs rsvg-convert")
        assert not os.path.exists(png_path)

    one_line(run("report", model, *inputs, "--roofline", os.path.join(tmp, "roof.jpg")), 2, "give a .svg or .png file")
    one_line(run("report", model, "--roofline", svg_path), 2, "--roofline needs the model's inputs")

    # --dot: DOT text, or rendered by Graphviz.
    dot_path = os.path.join(tmp, "graph.dot")
    assert run("report", model, "--dot", dot_path).returncode == 0
    assert open(dot_path).read().startswith("digraph")
    rendered = os.path.join(tmp, "graph.svg")
    done = run("report", model, "--dot", rendered)
    if shutil.which("dot"):
        assert done.returncode == 0, done.stderr
        text = open(rendered).read()
        assert "<svg" in text and "fusion_group_0" in text, text[:300]
    else:
        one_line(done, 1, "needs Graphviz")

    # scripts/roofline.py on Google Benchmark JSON: the copy line and a point per benchmark.
    bench = {"context": {"num_cpus": 2, "mhz_per_cpu": 2000, "date": "today"}, "benchmarks": [
        {"name": f"{family}/{n}/real_time", "run_name": f"{family}/{n}/real_time", "run_type": "iteration",
         "real_time": n / rate * 1e6, "time_unit": "us", "label": "Float", "bytes_per_second": rate * 1e9}
        for family, rate in (("Baseline_Copy", 40.0), ("Kiln_add_layer_norm", 30.0), ("Baseline_Eager_add_layer_norm", 12.0))
        for n in (2 ** 20, 2 ** 24)]}
    bench_path = os.path.join(tmp, "bench.json")
    json.dump(bench, open(bench_path, "w"))
    out = os.path.join(tmp, "bench.svg")
    done = subprocess.run([sys.executable, os.path.join(repo, "scripts", "roofline.py"), bench_path, "-o", out],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(6 benchmarks)" in done.stdout
    text = open(out).read()
    assert "kiln add_layer_norm Float" in text and "eager add_layer_norm Float" in text and "copy Float" in text
    json.dump({"benchmarks": [{"name": "x", "real_time": 1, "time_unit": "ns"}]}, open(bench_path, "w"))
    done = subprocess.run([sys.executable, os.path.join(repo, "scripts", "roofline.py"), bench_path, "-o", out],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no benchmark" in done.stderr, done.stderr

print("roofline SVG and PNG, dot rendering and the benchmark plotter: ok")
