"""The Python package `kiln` (python/kiln), under pytest: loading its library, optimize on traced
and scripted modules and on a plain nn.Module, report, save and load in this process and in a
fresh one, the executor switch, and the errors bad arguments get. ctest points KILN_LIBRARY at the
library just built and PYTHONPATH at python/, so the package tested is this checkout's."""
import os
import subprocess
import sys

import pytest
import torch

import kiln


class Block(torch.nn.Module):
    """A transformer block's elementwise and norm work around two linears."""

    def __init__(self, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x, scale: float = 0.5):
        h = torch.nn.functional.gelu(self.up(x))
        return self.norm(self.down(h) * scale + x).softmax(-1)


def fresh_input():
    return torch.randn(4, 16, 64)


def test_version_and_library_are_this_build():
    assert kiln.version() == "0.1.0"
    assert os.path.samefile(kiln.library_path(), os.environ["KILN_LIBRARY"])


@pytest.mark.parametrize("frontend", ["trace", "script", "nn.Module"])
def test_optimize_fuses_and_matches_eager(frontend):
    model = Block().eval()
    example = (fresh_input(),)
    if frontend == "trace":
        module = torch.jit.trace(model, example)
    elif frontend == "script":
        module = torch.jit.script(model)
    else:
        module = model
    fast = kiln.optimize(module, example_inputs=example)
    assert isinstance(fast, torch.jit.ScriptModule)
    report = kiln.report(fast)
    assert report["nodes_fused"] > 0
    kinds = {op for group in report["groups"] for op in group["ops"]}
    assert {"aten::linear", "aten::gelu", "aten::layer_norm"} <= kinds
    # The example run compiled and ran every group: each elementwise one moved fewer bytes fused,
    # each region or library call ran the way it measured fastest.
    for group in report["groups"]:
        assert group["calls"] > 0, group
        if group["kind"] == "elementwise":
            assert 0 < group["bytes_fused"] < group["bytes_unfused"], group
        else:
            assert group["choice"], group
    # Its linears ran in a region (both linears and what lies between them: one oneDNN Graph
    # program where that measured fastest) or as library calls.
    assert any(g["kind"] in ("conv_region", "linear") and "aten::linear" in g["ops"] for g in report["groups"]), report
    with torch.no_grad():
        x = fresh_input()
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


def test_options_reach_the_pass():
    model = torch.jit.script(Block().eval())
    default = kiln.report(kiln.optimize(model))
    large = kiln.report(kiln.optimize(model, min_group_size=100))
    # min_group_size bounds the elementwise groups; GEMMs stay library calls either way.
    elementwise = lambda report: [g for g in report["groups"] if g["kind"] == "elementwise"]  # noqa: E731
    assert elementwise(default) and not elementwise(large)


def test_saved_module_runs_in_a_fresh_process(tmp_path):
    model = Block().eval()
    x = fresh_input()
    fast = kiln.optimize(torch.jit.trace(model, (x,)), example_inputs=(x,))
    path = tmp_path / "block.kiln.pt"
    fast.save(str(path))
    torch.save(x, str(tmp_path / "x.pt"))
    with torch.no_grad():
        torch.save(model(x), str(tmp_path / "expected.pt"))
    script = (
        "import sys, torch, kiln\n"
        "m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2])\n"
        "with torch.no_grad(): out = m(x)\n"
        "torch.testing.assert_close(out, torch.load(sys.argv[3]), rtol=1e-5, atol=1e-6)\n"
        "r = kiln.report(m); assert r['groups'] and all(g['fallbacks'] == 0 for g in r['groups']), r\n"
        "print('ok', len(r['groups']))\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.pt"), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_enable_disable_and_the_executor():
    kiln.enable()
    assert kiln.enabled()
    kiln.disable()
    assert not kiln.enabled()
    kiln.disable()  # idempotent
    # Disabled: a scripted module runs unfused under the executor. (Scripted modules of one class
    # share their compiled forward and its executor: each case takes a class of its own.)
    class BlockOff(Block):
        pass

    class BlockOn(Block):
        pass

    off = torch.jit.script(BlockOff().eval())
    with torch.no_grad():
        for _ in range(3):
            off(fresh_input())
    assert kiln.report(off)["groups"] == []
    kiln.enable()
    on = torch.jit.script(BlockOn().eval())
    with torch.no_grad():
        for _ in range(3):
            on(fresh_input())
    assert kiln.report(on)["groups"], "the executor should have fused the enabled module"


def test_bad_arguments_name_what_is_wrong():
    model = Block().eval()
    with pytest.raises(TypeError, match="expected a torch.jit.ScriptModule or torch.nn.Module, got int"):
        kiln.optimize(3)
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a list/tuple"):
        kiln.optimize(model, example_inputs="x")
    with pytest.raises(ValueError, match="min_group_size must be an int >= 1, got 0"):
        kiln.optimize(model, min_group_size=0)
    with pytest.raises(ValueError, match="cpu_parallel_grain must be an int >= 1"):
        kiln.optimize(model, cpu_parallel_grain=-5)
    with pytest.raises(TypeError, match="kiln.report: expected a torch.jit.ScriptModule, got Block"):
        kiln.report(model)

    class Unscriptable(torch.nn.Module):
        def forward(self, x):
            return x * len(getattr(x, "shape_names", "ab"))  # getattr with a default does not script

    with pytest.raises(TypeError, match="does not script; pass example_inputs to trace it"):
        kiln.optimize(Unscriptable())
    # The wrong inputs for the model: the model's own error, unchanged.
    with pytest.raises(RuntimeError):
        kiln.optimize(torch.jit.script(model), example_inputs=(torch.randn(3, 5),))


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_missing_library_is_one_clear_import_error():
    done = run_python("import kiln", KILN_LIBRARY="/nonexistent/libkiln.so")
    assert done.returncode != 0
    assert "KILN_LIBRARY=/nonexistent/libkiln.so is not a file" in done.stderr


def test_a_library_loaded_before_is_not_loaded_twice():
    library = os.environ["KILN_LIBRARY"]
    done = run_python(f"import torch; torch.ops.load_library({library!r}); import kiln; print(kiln.library_path())",
                      KILN_LIBRARY="")
    assert done.returncode == 0, done.stderr
    assert os.path.samefile(done.stdout.strip(), library)


MEASURE_ONCE = """
import sys, torch, kiln
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(40, 56), torch.nn.ReLU(), torch.nn.Linear(56, 24)).eval()
fast = kiln.optimize(torch.jit.trace(model, torch.randn(6, 40)))
with torch.no_grad():
    x = torch.randn(6, 40)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
print(sorted(g["choice"] for g in kiln.report(fast)["groups"]))
"""


def test_library_calls_settle_after_three_processes(tmp_path):
    """The first process measures each GEMM's ways and stores the choice in the cache directory;
    the next two processes on the same machine measure again (one measurement taken while the
    machine was loaded does not decide), and from the fourth on the choice is read and nothing is
    measured."""
    env = dict(os.environ, KILN_CACHE_DIR=str(tmp_path / "cache"), KILN_LOG="info")
    runs = [subprocess.run([sys.executable, "-c", MEASURE_ONCE], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(4)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    for count, run in enumerate(runs[:3], start=1):
        measured = [line for line in run.stderr.splitlines() if line.startswith("kiln info: linear") and " runs " in line]
        assert len(measured) == 2, run.stderr
        times = "(measured 1 time)" if count == 1 else f"(measured {count} times)"
        assert all(line.endswith(times) for line in measured), run.stderr
    assert not [line for line in runs[3].stderr.splitlines() if " runs " in line], runs[3].stderr
    assert runs[3].stdout == runs[2].stdout


def test_attention_calls_written_before_heads_last_still_run(tmp_path):
    """A module saved before kiln::attention took heads_last calls it with six arguments; the
    argument's default keeps such a file loading and running."""

    @torch.jit.script
    def old_call(q, k, v, mask):
        return torch.ops.kiln.attention(q, k, v, mask, 0.125, True)

    path = str(tmp_path / "old_call.pt")
    old_call.save(path)
    loaded = torch.jit.load(path)
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    mask = torch.rand(1, 1, 1, 11) < 0.9
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask & torch.ones(9, 11, dtype=torch.bool).tril(), scale=0.125)
    out = loaded(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()


def test_reduced_precision_reports_accuracy_and_refuses_past_max_error():
    model = Block().eval()
    x = fresh_input()
    low = kiln.optimize(model, example_inputs=(x,), precision="bf16", max_error=0.05)
    assert low.kiln_accuracy and all(entry["cosine"] > 0.999 for entry in low.kiln_accuracy), low.kiln_accuracy
    with torch.no_grad():
        out = low(fresh_input())
    assert out.dtype == torch.float32
    with pytest.raises(RuntimeError, match="output's relative error .* exceeds max_error"):
        kiln.optimize(model, example_inputs=(x,), precision="bf16", max_error=1e-9)
    with pytest.raises(ValueError, match="needs example_inputs"):
        kiln.optimize(model, precision="bf16")
    with pytest.raises(ValueError, match="precision must be"):
        kiln.optimize(model, example_inputs=(x,), precision="int8")


class CentredFront(torch.nn.Module):
    """Its first linear's outputs sit near 1000 and are centred by their mean: rounded to bf16
    there the signal is lost, in fp32 it is not; the rest is well-conditioned."""
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.first.bias.fill_(1000.0)

    def forward(self, x):
        a = self.first(x)
        return self.second(a - a.mean(-1, keepdim=True))


def test_min_cosine_keeps_the_front_in_fp32_and_says_so():
    torch.manual_seed(0)
    model = CentredFront().eval()
    x = torch.randn(32, 16)
    low = kiln.optimize(model, example_inputs=(x,), precision="bf16", min_cosine=0.999)
    plan = low.kiln_precision_plan
    assert plan["library_calls_float32"] == 1 and plan["library_calls_total"] == 2, plan
    assert plan["cosine"] >= 0.999 > plan["cosine_all_low"] and plan["last_float32_op"].startswith("aten::sub (") and "test_package.py:" in plan["last_float32_op"], plan
    with torch.no_grad():
        fresh = torch.randn(7, 16)
        out = low(fresh)
        assert torch.nn.functional.cosine_similarity(out.flatten(), model(fresh).flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="min_cosine goes with"):
        kiln.optimize(model, example_inputs=(x,), min_cosine=0.999)
    with pytest.raises(ValueError, match="min_cosine must be"):
        kiln.optimize(model, example_inputs=(x,), precision="bf16", min_cosine=0)


def test_the_fused_output_check_scales_with_the_output():
    # An element near 0 in an output of magnitude 1e3 moves by about 1e3 float32 ulps when a fused
    # kernel sums in another order: within tolerance; an error of 5e-4 of the output's scale is not.
    expected = torch.tensor([1000.0, -800.0, 0.0])
    kiln._check_outputs(torch.tensor([1000.02, -800.0, 0.05]), expected)
    with pytest.raises(RuntimeError, match="differs from the unfused module's by 0.5"):
        kiln._check_outputs(torch.tensor([1000.0, -800.0, 0.5]), expected)
    kiln._check_outputs(torch.tensor([1e-5, float("nan")]), torch.tensor([0.0, float("nan")]))
    with pytest.raises(RuntimeError, match="differs"):
        kiln._check_outputs(torch.tensor([1e-3]), torch.tensor([0.0]))


class Float32Norm(torch.nn.Module):
    """An RMS norm computed in float32 whatever the input's dtype, as Hugging Face's LLaMA has it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(32, dtype=torch.float64))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * y.to(x.dtype)


def test_a_float64_model_that_computes_in_float32_is_checked_at_float32s_tolerance():
    # The check's tolerance follows the least precise dtype the module computes in: a float64
    # output from float32 arithmetic differs by float32's rounding, not a kiln error.
    x = torch.randn(4, 32, dtype=torch.float64)
    traced = torch.jit.trace(Float32Norm(), x)
    assert kiln._computed_dtypes(traced) == {torch.float32, torch.float64}
    assert torch.float32 in kiln._computed_dtypes(torch.jit.script(Float32Norm()))
    expected = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    off_by_float32 = expected * (1 + 3e-7)
    kiln._check_outputs(off_by_float32, expected, {torch.float32, torch.float64})
    with pytest.raises(RuntimeError, match="tolerance 1e-10"):
        kiln._check_outputs(off_by_float32, expected, {torch.float64})
    with torch.no_grad():
        fused = kiln.optimize(traced, (x,))
        fresh = torch.randn(4, 32, dtype=torch.float64)
        torch.testing.assert_close(fused(fresh), traced(fresh),
                                   rtol=1e-5, atol=1e-5)


class GeluTimesTwo(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x) * 2.0


def test_gelu_at_the_extremes_is_what_this_cpus_eager_gives():
    # Eager's float32 gelu at +-inf and near the largest float depends on the CPU (through oneDNN
    # on AVX-512: NaN at +inf, 3e38 overflows to inf; on an AVX2-only CPU: inf, and 3e38 stays
    # finite); kiln's kernel gives what eager gives on the CPU it runs on.
    x = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38, 2e38, 1.0, -1.0, float("nan")] * 8)
    traced = torch.jit.trace(GeluTimesTwo(), x)
    with torch.no_grad():
        fused = kiln.optimize(traced, (x,))
        assert [group["kind"] for group in kiln.report(fused)["groups"]] == ["elementwise"]
        torch.testing.assert_close(fused(x), traced(x), equal_nan=True, rtol=1e-6, atol=0)


def test_a_traced_python_number_promotes_as_a_number(tmp_path):
    # Tracing freezes `a * 0.5` as a 0-dim double tensor marked as a wrapped number: an int tensor
    # times it is float32, as in eager, not float64 (a 0-dim double tensor's own promotion). Saved
    # and loaded, the tensor loses its mark; TorchScript's executor then reads it as a number, and
    # so must kiln.
    class M(torch.nn.Module):
        def forward(self, a, x):
            return (a * 0.5 + x, ((a > 0) * 0.5 + 1).exp(), (a.sum(-1) * 0.5 + 1).exp())

    a, x = torch.randint(-50, 50, (4, 16)), torch.randn(4, 16)
    traced = torch.jit.trace(M(), (a, x))
    traced.save(str(tmp_path / "m.pt"))
    for module in (traced, torch.jit.load(str(tmp_path / "m.pt"))):
        fused = kiln.optimize(module, example_inputs=(a, x))
        fused.save(str(tmp_path / "m.kiln.pt"))
        a2, x2 = torch.randint(-50, 50, (4, 16)), torch.randn(4, 16)
        with torch.no_grad():
            for run in (fused, torch.jit.load(str(tmp_path / "m.kiln.pt"))):
                for got, want in zip(run(a2, x2), M()(a2, x2)):
                    assert got.dtype == want.dtype == torch.float32
                    torch.testing.assert_close(got, want)
        assert any(group["kind"] == "elementwise" for group in kiln.report(fused)["groups"])


def test_rnn_weights_convert_to_bf16():
    # The frozen graph holds an RNN's weights as one list constant.
    class Wrap(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    for cls in (torch.nn.LSTM, torch.nn.GRU):
        model = Wrap(cls(16, 32, batch_first=True)).eval()
        traced = torch.jit.trace(model, (torch.randn(2, 10, 16),))
        low = kiln.optimize(traced, example_inputs=(torch.randn(2, 10, 16),), precision="bf16")
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            out, expected = low(x), model(x)
        assert out.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.999, cls


def test_a_module_that_changes_its_input_is_checked_on_copies():
    class M(torch.nn.Module):
        def forward(self, x):
            x.add_(1)
            return (x * 2).sigmoid()

    example = torch.randn(4, 8)
    before = example.clone()
    fused = kiln.optimize(torch.jit.trace(M(), (example.clone(),)), example_inputs=(example,))
    assert torch.equal(example, before), "kiln.optimize changed the example inputs"
    x = torch.randn(4, 8)
    x1, x2 = x.clone(), x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fused(x1), M()(x2))
    assert torch.equal(x1, x2)


def test_min_cosine_holds_for_the_fused_module():
    # The bound is searched on the converted graph unfused, then checked on the fused module (kiln's
    # kernels round a little differently): whatever the bound, the module returned meets it on the
    # example inputs, keeping more in fp32 where the fused module needs it, else raises nothing.
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=1000, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2,
                                   feed_forward_proj="gated-gelu", torchscript=True)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 1000, (2, 16))
    traced = torch.jit.trace(model, (ids,), check_trace=False)
    for bound in (0.9999, 0.99999, 0.999999):
        low = kiln.optimize(traced, example_inputs=(ids,), precision="bf16", min_cosine=bound)
        plan = low.kiln_precision_plan
        assert plan["cosine"] >= bound and all(entry["cosine"] >= bound for entry in low.kiln_accuracy), plan
