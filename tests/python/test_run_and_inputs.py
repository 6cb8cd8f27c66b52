"""kiln run and --inputs, end to end: a model that reads token ids (which random --input values
would send out of range) runs from a list of tensors saved with torch.save; `kiln run` reports
the time to first result and each call; a second process on the same cache loads every CPU
kernel and compiles none; KILN_BACKGROUND_COMPILE=1 gives the same results; `kiln report` and
`kiln compile --arch host` take --inputs, and compile shows its progress (kernel i of N) on a
terminal only, never with --json or into a pipe; a missing or malformed inputs file, --input with
--inputs, and --calls 0 are one-line usage errors (exit 2); `kiln fuse --precision bf16` reports
each output's accuracy and --max-error refuses to write a model past it; --min-cosine keeps the
leading ops of a model with an ill-conditioned front in fp32 and says which; `kiln bench
--precision` adds the converted-weights route and, with --min-cosine, the plan."""
import json
import os
import pty
import subprocess
import sys
import tempfile

import torch

kiln = sys.argv[1]


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, ids, scale):
        h = self.fc(self.embed(ids)) * scale
        return torch.sigmoid(h) * torch.tanh(h - 0.25) + h.clamp(-1.0, 1.0)


class CentredFront(torch.nn.Module):
    """Its first linear's outputs sit near 1000 and are centred by their mean: in bf16 the rounding
    there is as large as the signal, in fp32 nothing is lost; the rest is well-conditioned."""
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 24)
        self.third = torch.nn.Linear(24, 8)
        with torch.no_grad():
            self.first.bias.fill_(1000.0)

    def forward(self, x):
        a = self.first(x)
        return self.third(torch.nn.functional.gelu(self.second(a - a.mean(-1, keepdim=True))))


def run(*args, env, code=0):
    result = subprocess.run([kiln, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == code, (args, result.returncode, result.stderr)
    return result


def one_line(result, fragment):
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln") and fragment in lines[0], result.stderr
    return lines[0]


with tempfile.TemporaryDirectory() as scratch:
    env = dict(os.environ, KILN_CACHE_DIR=os.path.join(scratch, "cache"))
    torch.manual_seed(0)
    model = torch.jit.script(Tagger().eval())
    path = os.path.join(scratch, "tagger.pt")
    fused = os.path.join(scratch, "tagger.kiln.pt")
    model.save(path)
    inputs = os.path.join(scratch, "inputs.pt")
    torch.save([torch.randint(0, 100, (4, 14)), torch.rand(4, 14, 1) + 0.5], inputs)
    run("fuse", path, fused, env=env)

    cold = json.loads(run("run", fused, "--inputs", inputs, "--calls", "3", "--json", env=env).stdout)
    assert len(cold["call_ms"]) == 3 and cold["kiln_groups"] > 0, cold
    assert abs(cold["first_result_ms"] - cold["load_ms"] - cold["call_ms"][0]) < 0.01, cold
    assert cold["kernel_cache"]["misses"] > 0 and cold["kernel_cache"]["stores"] == cold["kernel_cache"]["misses"], cold
    warm = json.loads(run("run", fused, "--inputs", inputs, "--json", env=env).stdout)
    assert warm["kernel_cache"] == {"hits": cold["kernel_cache"]["stores"], "misses": 0, "stores": 0}, warm
    text = run("run", fused, "--inputs", inputs, env=env).stdout
    assert "first result after" in text, text

    background_env = dict(env, KILN_BACKGROUND_COMPILE="1", KILN_CACHE_DIR=os.path.join(scratch, "cache2"))
    run("run", fused, "--inputs", inputs, "--calls", "5", env=background_env)

    report = json.loads(run("report", path, "--inputs", inputs, "--json", env=env).stdout)
    assert report["groups"] and all(g["bytes_fused"] > 0 for g in report["groups"] if g["kind"] == "elementwise"), report
    host = json.loads(run("compile", path, "--inputs", inputs, "--arch", "host", "--json", env=env).stdout)
    assert host["kernels"] and all(k["status"] == "cached" for k in host["kernels"]), host

    # Progress on a terminal: kernel i of N on stderr; none into a pipe (above) or with --json.
    def on_terminal(*args):
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(kiln, [kiln, *args], dict(env, KILN_CACHE_DIR=os.path.join(scratch, "cache3")))
        output = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, output
        return output.decode()
    shown = on_terminal("compile", path, "--inputs", inputs, "--arch", "host")
    count = len(host["kernels"])
    assert f"kernel {count} of {count} for host" in shown, shown
    assert "kernel " not in on_terminal("compile", path, "--inputs", inputs, "--arch", "host", "--json"), "progress with --json"
    assert "kernel 1 of" not in run("compile", path, "--inputs", inputs, "--arch", "host", env=env).stderr

    one_line(run("run", fused, "--inputs", os.path.join(scratch, "missing.pt"), env=env, code=2),
             "cannot read --inputs")
    not_tensors = os.path.join(scratch, "not_tensors.pt")
    torch.save([torch.zeros(2), 3], not_tensors)
    one_line(run("run", fused, "--inputs", not_tensors, env=env, code=2), "expected tensors")
    a_dict = os.path.join(scratch, "dict.pt")
    torch.save({"ids": torch.zeros(2)}, a_dict)
    one_line(run("run", fused, "--inputs", a_dict, env=env, code=2), "expected a list or tuple of tensors")
    one_line(run("run", fused, "--inputs", inputs, "--input", "4,14:int64", env=env, code=2), "not both")
    one_line(run("run", fused, "--inputs", inputs, "--calls", "0", env=env, code=2), "--calls")
    one_line(run("run", fused, env=env, code=2), "--inputs")

    # Reduced precision: an accuracy line per floating output; --max-error refuses to write.
    low = os.path.join(scratch, "tagger.bf16.pt")
    result = run("fuse", path, low, "--inputs", inputs, "--precision", "bf16", "--max-error", "0.1", env=env)
    lines = [line for line in result.stderr.splitlines() if "in bf16: max abs error" in line]
    assert len(lines) == 1 and "cosine 0.99" in lines[0], result.stderr
    torch.ops.load_library(os.path.join(os.path.dirname(kiln), "..", "lib", "libkiln.so"))
    loaded_low = torch.jit.load(low)
    ids, scale = torch.load(inputs)
    with torch.no_grad():
        out = loaded_low(ids, scale)
        assert out.dtype == torch.float32 and torch.nn.functional.cosine_similarity(
            out.flatten(), model(ids, scale).flatten(), dim=0) > 0.999
    strict = os.path.join(scratch, "tagger.strict.pt")
    refused = run("fuse", path, strict, "--inputs", inputs, "--precision", "bf16", "--max-error", "1e-9", env=env, code=1)
    assert "output 0's relative error" in refused.stderr and "exceeds --max-error" in refused.stderr, refused.stderr
    assert not os.path.exists(strict)
    one_line(run("fuse", path, strict, "--inputs", inputs, "--precision", "int8", env=env, code=2), "--precision")
    one_line(run("fuse", path, strict, "--precision", "bf16", env=env, code=2), "needs example inputs")
    one_line(run("fuse", path, strict, "--inputs", inputs, "--max-error", "0.1", env=env, code=2), "--max-error")
    bench = json.loads(run("bench", path, "--inputs", inputs, "--rounds", "1", "--precision", "bf16", "--json", env=env).stdout)
    names = [v["name"] for v in bench["variants"]]
    assert "torchscript_low_precision" in names and names[-1] == "kiln_optimize", names
    assert all(v["ok"] for v in bench["variants"]), bench

    # --min-cosine: the leading ops keep fp32 as far as the bound needs, and the line says which.
    centred = torch.jit.trace(CentredFront().eval(), (torch.randn(64, 16),))
    centred_path = os.path.join(scratch, "centred.pt")
    centred.save(centred_path)
    centred_inputs = os.path.join(scratch, "centred.inputs.pt")
    torch.save([torch.randn(64, 16)], centred_inputs)
    mixed = os.path.join(scratch, "centred.bf16.pt")
    result = run("fuse", centred_path, mixed, "--inputs", centred_inputs, "--precision", "bf16", "--min-cosine", "0.999",
                 env=env)
    plan = [line for line in result.stderr.splitlines() if "kept float32" in line]
    assert len(plan) == 1 and "(1 of 3 GEMMs and convolutions)" in plan[0] and "through aten::sub" in plan[0], result.stderr
    x = torch.randn(5, 16)
    with torch.no_grad():
        out, expected = torch.jit.load(mixed)(x), centred(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.999
    all_low = run("fuse", centred_path, mixed, "--inputs", centred_inputs, "--precision", "bf16", env=env)
    cosine = [line for line in all_low.stderr.splitlines() if "in bf16: max abs error" in line]
    assert len(cosine) == 1 and float(cosine[0].split("cosine ")[1]) < 0.99, all_low.stderr
    one_line(run("fuse", centred_path, strict, "--inputs", centred_inputs, "--min-cosine", "0.9", env=env, code=2),
             "--min-cosine goes with --precision")
    one_line(run("fuse", centred_path, strict, "--inputs", centred_inputs, "--precision", "bf16", "--min-cosine", "0",
                 env=env, code=2), "--min-cosine takes a number")
    one_line(run("fuse", centred_path, strict, "--inputs", centred_inputs, "--precision", "bf16", "--min-cosine", "1",
                 env=env, code=2), "--min-cosine takes a number above 0 and below 1")
    bench = json.loads(run("bench", centred_path, "--inputs", centred_inputs, "--rounds", "1", "--precision", "bf16",
                           "--min-cosine", "0.999", "--json", env=env).stdout)
    assert bench["precision_plan"]["library_calls_float32"] == 1 and bench["precision_plan"]["cosine"] >= 0.999, bench

print("ok")
