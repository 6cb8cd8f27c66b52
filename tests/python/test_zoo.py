"""Real models through kiln, end to end: Hugging Face BERT (the seed configuration, as the
Transformers TorchScript guide traces it), small DistilBERT, RoBERTa, GPT-2, T5 encoder and ViT,
torchvision ResNet-18, MobileNetV3-Small and EfficientNet-B0, and the TorchScript tutorial's cells.
Random weights; nothing is downloaded. Every model goes three routes, each compared to eager on
fresh random inputs:
  a. traced (and scripted where the model scripts) and run in this process with libkiln loaded,
     5 calls (the profiling executor optimizes after its profiling run); the profiler shows that
     kiln's kernels ran: kiln ops ran, no guard sent its group to the original ops, no kiln op
     fell back to them, and no layer_norm, softmax, log_softmax or rms_norm ran on its own;
  b. saved, then loaded and run 5 times in a fresh process with libkiln loaded (one process
     for all the saved files), kiln's kernels running as in a;
  c. `kiln fuse IN.pt OUT.pt`, OUT.pt loaded in a fresh process (it must hold kiln ops: fusion
     groups, attention, library calls) and run, kiln's kernels running as in a.
  d. kiln::optimize in bf16 (docs/precision.md), in this process: output dtypes kept, integer
     outputs exact, cosine similarity to float32 >= BF16_COSINE.
  (The CNNs' scripted variants go route a only.)
Per model it prints each route's max error and the share of ops kiln fuses (`kiln report`), then
a summary table. A failing route is reported (model, route, error) and the other models still
run; the exit status is non-zero if anything failed.

Tolerance (fp32): |actual - expected| <= RTOL * |expected| + ATOL * max|expected| per output
tensor, with RTOL = ATOL = 1e-4: fused kernels may round differently from eager (another order
of a chain, a transcendental within a few ulps, batch norm folded into a convolution) and deep
models carry such differences through many layers; scaling atol by the output's own magnitude
keeps the check as strict for logits in the hundreds as for features near 1e-2. Integer and bool
outputs must match exactly. The CNNs' batch norms get running statistics from random batches
first (as if trained), so that their activations are O(1) rather than vanishing through dozens
of random layers (EfficientNet-B0's output is ~1e-14 otherwise, which any error would match).

usage: test_zoo.py KILN_CLI LIBKILN [MODEL...]     (names to run a subset)
       test_zoo.py --worker LIBKILN JOBS.json   (the fresh-process side of routes b and c)
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

RTOL = 1e-4
ATOL = 1e-4
CALLS = 5
KILN_OPS = ("kiln::fusion_group", "kiln::attention", "kiln::attention_explicit", "kiln::linear", "kiln::conv2d",
            "kiln::conv2d_into_other", "kiln::conv_region")
# Library calls (GEMM / convolution with its epilogue) run ATen's ops as one of their measured
# ways, so their children say nothing about a fallback; their report says which way ran.
LIBRARY_OPS = ("kiln::linear", "kiln::conv2d", "kiln::conv2d_into_other", "kiln::conv_region")
SUBPROCESS_TIMEOUT = 600
# Route d (bf16): kiln::optimize's min_cosine on the example inputs (the bound: leading ops
# keep fp32 where it needs), and the least cosine similarity to float32 an output may have on
# fresh inputs. docs/precision.md lists each model's.
BF16_MIN_COSINE = 0.999
BF16_COSINE = 0.995


def flatten(value):
    """Every tensor in a (nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten(item)]
    if isinstance(value, dict):
        return [t for key in value for t in flatten(value[key])]
    if hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput
        return flatten(value.to_tuple())
    return []


def compare(actual, expected, what):
    """Asserts every output tensor matches eager's; returns the largest absolute difference."""
    actual, expected = flatten(actual), flatten(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} output tensors, eager gives {len(expected)}"
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (
            f"{what}: output {i} is {a.dtype}{list(a.shape)}, eager gives {e.dtype}{list(e.shape)}")
        if a.is_floating_point() or a.is_complex():
            finite = e[torch.isfinite(e)]
            scale = finite.abs().max().item() if finite.numel() else 0.0
            torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL * scale, equal_nan=True,
                                       msg=lambda m: f"{what}: output {i} (scale {scale:.3g}): {m}")
            both = torch.isfinite(a) & torch.isfinite(e)
            if both.any():
                worst = max(worst, (a[both].double() - e[both].double()).abs().max().item())
        else:
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{what}: output {i}: {m}")
    return worst


# What a kiln op may call while its own kernel runs: allocations and views of its operands. Any
# other op under kiln::fusion_group / kiln::attention is the group's original ops, run because
# kiln failed (to parse, lower, compile or launch) and fell back.
KERNEL_CHILDREN = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::expand", "aten::as_strided",
                   "aten::view", "aten::alias", "aten::resize_", "aten::unsqueeze", "aten::squeeze",
                   "aten::permute", "aten::transpose", "aten::t", "aten::select", "aten::slice", "aten::detach"}


# Row ops kiln fuses with their neighbours (docs/reductions.md): none may run on its own.
ROW_OPS = {"aten::layer_norm", "aten::softmax", "aten::log_softmax", "aten::rms_norm"}


def under_kiln(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in KILN_OPS:
            return True
        parent = parent.cpu_parent
    return False


def kiln_events(module, inputs):
    """Runs one call under the profiler; returns (output, counts): how often each kiln op ran,
    "fell back": kiln ops that ran the original ops instead of their kernel, "rejected": guards
    that sent their group to the original ops (guards minus the groups they let run)."""
    with torch.autograd.profiler.profile() as prof:
        out = module(*inputs)
    counts, guards = {}, 0
    for event in prof.function_events:
        if event.name in ROW_OPS and not under_kiln(event):
            counts["unfused " + event.name] = counts.get("unfused " + event.name, 0) + 1
        if event.name in KILN_OPS:
            counts[event.name] = counts.get(event.name, 0) + 1
            if event.name not in LIBRARY_OPS and any(child.name not in KERNEL_CHILDREN for child in event.cpu_children):
                counts["fell back"] = counts.get("fell back", 0) + 1
        elif event.name.startswith("kiln::") and event.name.endswith("_guard"):
            guards += 1
    rejected = guards - sum(counts.get(op, 0) for op in KILN_OPS if op not in LIBRARY_OPS)
    if rejected:
        counts["rejected"] = rejected
    return out, counts


def kiln_problem(events):
    """Why this call does not show kiln at work (None when it does)."""
    ran = sum(events.get(op, 0) for op in KILN_OPS)
    if not ran:
        return f"outputs match eager, but no kiln op ran on call {CALLS} ({events_text(events)})"
    unfused = {name: count for name, count in events.items() if name.startswith("unfused ")}
    if unfused:
        return f"outputs match eager, but on call {CALLS} row ops ran on their own ({events_text(unfused)})"
    if events.get("fell back") or events.get("rejected"):
        return (f"outputs match eager, but on call {CALLS} {events.get('rejected', 0)} guards sent their group "
                f"to the original ops and {events.get('fell back', 0)} kiln ops fell back to them "
                f"({events_text(events)}; KILN_LOG=info says why; KILN_ZOO_DEBUG=1 shows the fresh processes' lines)")
    return None


def events_text(events):
    return ", ".join(f"{name.split('::')[-1]} x{count}" for name, count in sorted(events.items())) or "no kiln op ran"


def tail(text, lines=25):
    """The end of a process's stderr, where its error is."""
    text = str(text).strip().splitlines()
    return "\n".join(([f"({len(text) - lines} lines before)"] if len(text) > lines else []) + text[-lines:])


def short(text, lines=25):
    """The head of an error message: enough to see what and where, not a page of traceback."""
    text = str(text).strip().splitlines()
    return "\n".join(text[:lines] + ([f"... ({len(text) - lines} more lines)"] if len(text) > lines else []))


# ---------------------------------------------------------------------------------------------
# The fresh-process side of routes b and c.

def run_job(model_path, data_path, mode):
    result = {"max_err": 0.0, "events": {}, "error": None}
    try:
        module = torch.jit.load(model_path)
        module.eval()
        data = torch.load(data_path)
        if mode == "fused":
            graph = str(module.inlined_graph)
            result["graph_fusion_groups"] = graph.count("kiln::fusion_group(")
            result["graph_attention"] = graph.count("kiln::attention(") + graph.count("kiln::attention_explicit(")
            result["graph_library_calls"] = graph.count("kiln::linear(") + graph.count("kiln::conv2d(") + graph.count("kiln::conv2d_into_other(")
            assert any(op + "(" in graph for op in KILN_OPS), "the fused file's graph holds no kiln op"
        with torch.no_grad():
            for call, (inputs, expected) in enumerate(zip(data["inputs"], data["outputs"])):
                if call == len(data["inputs"]) - 1:
                    out, result["events"] = kiln_events(module, inputs)
                else:
                    out = module(*inputs)
                result["max_err"] = max(result["max_err"], compare(out, expected, f"call {call + 1}"))
    except Exception as error:  # reported to the parent, which names the model and route
        result["error"] = f"{type(error).__name__}: {error}"
    return result


def worker(libkiln, jobs_path):
    """Runs each job (a file, its inputs and eager's outputs) in turn, in this one fresh process;
    a line per job before and after, so that the parent knows which one a crash hit."""
    torch.ops.load_library(libkiln)
    with open(jobs_path) as f:
        jobs = json.load(f)
    for job in jobs:
        print(f"ZOO-START {job['id']}", flush=True)
        result = run_job(job["model"], job["data"], job["mode"])
        print(f"ZOO-RESULT {job['id']} {json.dumps(result)}", flush=True)


if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# The models. Each: build() -> eager module; inputs(gen) -> a fresh tuple of inputs;
# specs: --input SHAPE:DTYPE list for `kiln report` (None where its random values would be
# invalid input for the model); script: whether torch.jit.script takes the model too.

warnings.filterwarnings("ignore")  # tracer warnings about Python values taken as constants
import torchvision  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def hf_inputs(vocab, batch, seq, with_mask=True, token_types=False):
    def make(gen):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        inputs = {"input_ids": ids}
        if token_types:
            inputs["token_type_ids"] = torch.randint(0, 2, (batch, seq), generator=gen)
        if with_mask:
            mask = torch.ones(batch, seq, dtype=torch.long)
            for b in range(1, batch):  # later rows padded at the end by a random amount
                pad = int(torch.randint(1, seq // 2, (1,), generator=gen))
                mask[b, seq - pad:] = 0
            inputs["attention_mask"] = mask
        return inputs
    return make


class MyDecisionGate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        else:
            return -x


class MyCell(torch.nn.Module):
    def __init__(self, dg):
        super().__init__()
        self.dg = dg
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, h):
        new_h = torch.tanh(self.dg(self.linear(x)) + h)
        return new_h, new_h


class MyRNNLoop(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, xs):
        h, y = torch.zeros(3, 4), torch.zeros(3, 4)
        for i in range(xs.size(0)):
            y, h = self.cell(xs[i], h)
        return y, h


class WrapRNN(torch.nn.Module):
    def __init__(self, loop):
        super().__init__()
        self.loop = loop

    def forward(self, xs):
        y, h = self.loop(xs)
        return torch.relu(y)


def tutorial_models():
    """The TorchScript tutorial (Introduction to TorchScript): MyDecisionGate's data-dependent
    `if`; MyCell calling a scripted gate (which keeps its `if` when the cell is traced); the
    scripted MyRNNLoop over a traced cell; WrapRNN traced around a scripted loop. Each is built as
    the tutorial builds it, and compared with the same classes run purely in Python (same
    weights), so that no TorchScript (and no kiln) runs in the reference."""
    x0, h0 = torch.rand(3, 4), torch.rand(3, 4)

    def cell():
        torch.manual_seed(0)
        return MyCell(torch.jit.script(MyDecisionGate()))

    def loop():
        return MyRNNLoop(torch.jit.trace(cell(), (x0, h0), check_trace=False))

    def reference(module):
        """The pure-Python twin of a tutorial module, with its weights."""
        twin = {"MyCell": lambda: MyCell(MyDecisionGate()),
                "MyRNNLoop": lambda: MyRNNLoop(MyCell(MyDecisionGate())),
                "WrapRNN": lambda: WrapRNN(MyRNNLoop(MyCell(MyDecisionGate())))}[type(module).__name__]()
        twin.load_state_dict(module.state_dict())
        return twin.eval()

    cell_inputs = lambda gen: (torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen))  # noqa: E731
    xs_inputs = lambda gen: (torch.randn(10, 3, 4, generator=gen),)  # noqa: E731
    return [
        # randn, not the tutorial's rand, so that the gate takes both branches across calls.
        dict(name="tutorial.MyCell", build=cell, reference=reference, inputs=cell_inputs,
             specs=["3,4:float32", "3,4:float32"], script=True),
        # The tutorial scripts this one only (tracing would unroll the loop).
        dict(name="tutorial.MyRNNLoop", build=loop, reference=reference, inputs=xs_inputs,
             specs=["10,3,4:float32"], script=True, trace=False),
        # The tutorial traces this one around torch.jit.script(MyRNNLoop()); scripted too here.
        dict(name="tutorial.WrapRNN", build=lambda: WrapRNN(torch.jit.script(loop())), reference=reference,
             inputs=xs_inputs, specs=["10,3,4:float32"], script=True),
    ]


def hf(name, cls, config, make_inputs, specs):
    """Traced with keyword inputs, so that BERT's second input is token_type_ids (the guide's
    positional call would bind it to attention_mask)."""
    def build():
        torch.manual_seed(0)
        return cls(config()).eval()
    return dict(name=name, build=build, inputs=make_inputs, specs=specs, script=False, kwargs=True)


def vision(name, fn, size, nothing_to_fuse=()):
    def build():
        torch.manual_seed(0)
        model = getattr(torchvision.models, fn)(weights=None)
        # Batch-norm statistics of random batches (a cumulative average), as training would set.
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(4, 3, size, size))
        return model.eval()
    # Scripted too, in this process; only the traced file goes on to routes b and c (time).
    return dict(name=name, build=build, inputs=lambda gen: (torch.randn(1, 3, size, size, generator=gen),),
                specs=[f"1,3,{size},{size}:float32"], script=True, files=("traced",),
                nothing_to_fuse=nothing_to_fuse)


T = transformers
MODELS = [
    # The guide: BertConfig(vocab_size_or_config_json_file=32000, hidden_size=768,
    # num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, torchscript=True)
    # and the 14 tokens of "[CLS] Who was Jim Henson ? [SEP] Jim Henson was a puppeteer [SEP]"
    # with their segment ids; here random ids of those shapes. kiln report gets no --input: its
    # random int64 inputs go up to 7, past BERT's two token types.
    hf("bert-base", T.BertModel,
       lambda: T.BertConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, torchscript=True),
       hf_inputs(32000, 1, 14, with_mask=False, token_types=True), None),
    hf("distilbert", T.DistilBertModel,
       lambda: T.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=256,
                                  max_position_embeddings=64, torchscript=True),
       hf_inputs(1000, 2, 16), ["2,16:int64", "2,16:int64"]),
    hf("roberta", T.RobertaModel,
       lambda: T.RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=66, torchscript=True),
       hf_inputs(1000, 2, 16), ["2,16:int64", "2,16:int64"]),
    hf("gpt2", T.GPT2Model,
       lambda: T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                            torchscript=True),
       hf_inputs(1000, 2, 16), ["2,16:int64", "2,16:int64"]),
    # T5 v1.1 / Flan-T5's gated-GELU feed-forward (gelu_new: tanh and x**3), RMS norm.
    hf("t5-encoder", T.T5EncoderModel,
       lambda: T.T5Config(vocab_size=1000, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2,
                          feed_forward_proj="gated-gelu", torchscript=True),
       hf_inputs(1000, 2, 16), ["2,16:int64", "2,16:int64"]),
    hf("vit", T.ViTModel,
       lambda: T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           image_size=32, patch_size=8, torchscript=True),
       lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}, ["2,3,32,32:float32"]),
    # Scripted and not frozen, ResNet-18 has nothing kiln fuses: every batch_norm reads its
    # `training` flag from the module at run time (fusible only when it is a constant False), and
    # the in-place add_ / relu_ are not proven safe to make functional (the same graph writes
    # module state, num_batches_tracked.add_ under `if self.training`). Traced, or frozen through
    # kiln fuse, its batch_norm + add + relu fuse.
    vision("resnet18", "resnet18", 64, nothing_to_fuse=("scripted",)),
    vision("mobilenet_v3_small", "mobilenet_v3_small", 96),
    vision("efficientnet_b0", "efficientnet_b0", 64),
] + tutorial_models()


# ---------------------------------------------------------------------------------------------
# The routes.

def as_tuple(inputs):
    return tuple(inputs.values()) if isinstance(inputs, dict) else tuple(inputs)


def eager_call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def detach_all(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(detach_all(v) for v in value)
    if isinstance(value, dict):
        return {k: detach_all(v) for k, v in value.items()}
    return value


def route_in_process(module, model, calls):
    """Route a: `calls` calls with fresh inputs, each against eager; the last under the profiler."""
    worst, events = 0.0, {}
    with torch.no_grad():
        for call, inputs in enumerate(calls):
            expected = eager_call(model, inputs)
            if call == len(calls) - 1:
                out, events = kiln_events(module, as_tuple(inputs))
            else:
                out = module(*as_tuple(inputs))
            worst = max(worst, compare(out, expected, f"call {call + 1}"))
    return worst, events


def run_workers(libkiln, jobs, tmp):
    """Runs the jobs in a fresh process; returns {job id: result}. A job whose process dies
    (a crash, a timeout) gets an error with the end of its stderr, and the jobs after it go on in
    another fresh process."""
    results, pending = {}, list(jobs)
    while pending:
        jobs_path = f"{tmp}/jobs.json"
        with open(jobs_path, "w") as f:
            json.dump(pending, f)
        started = None
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", libkiln, jobs_path],
                                  capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT * len(pending))
            if os.environ.get("KILN_ZOO_DEBUG"):  # the fresh process's kiln lines (with KILN_LOG=info)
                sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if "kiln " in line))
            stdout, stderr, status = proc.stdout, proc.stderr, f"exited {proc.returncode}"
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            stderr = timeout.stderr.decode() if isinstance(timeout.stderr, bytes) else (timeout.stderr or "")
            status = f"timed out after {timeout.timeout} s"
        for line in stdout.splitlines():
            if line.startswith("ZOO-START "):
                started = line.split()[1]
            elif line.startswith("ZOO-RESULT "):
                _, job_id, payload = line.split(" ", 2)
                results[job_id] = json.loads(payload)
                started = None
        if started is not None:  # the process died inside this job
            results[started] = {"error": f"the fresh process {status} while running it:\n{tail(stderr, 30)}"}
        elif len(results) < len(jobs) and not any(job["id"] in results for job in pending):
            # Died before its first job (e.g. libkiln failed to load): every pending job fails.
            for job in pending:
                results[job["id"]] = {"error": f"the fresh process {status} before its first file:\n{tail(stderr, 8)}"}
        pending = [job for job in pending if job["id"] not in results]
    return results


def kiln_report(kiln_cli, path, specs):
    args = [kiln_cli, "report", path, "--json"]
    for spec in specs or []:
        args += ["--input", spec]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"kiln report exited {proc.returncode}: {tail(proc.stderr, 20)}")
    return json.loads(proc.stdout)


class Model:
    """One model's results: each route's state and max error, what kiln fuses, what failed."""

    def __init__(self, name, failures):
        self.name, self.failures = name, failures
        self.routes, self.max_err, self.fused = {}, 0.0, "-"

    def fail(self, route, error):
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.routes[route] = "FAIL"
        self.failures.append((self.name, route, message))
        print(f"  {self.name} [{route}] FAILED: {short(message)}", flush=True)

    def ok(self, route, err, extra=""):
        self.routes[route] = "ok"
        self.max_err = max(self.max_err, err)
        print(f"  {self.name} [{route}] ok, max |err| {err:.3g}{extra}", flush=True)


def route_a_and_files(spec, kiln_cli, tmp, failures, jobs):
    """Builds the model; route a for each variant; saves each variant with eager's results on
    fresh inputs and fuses it with `kiln fuse` (the jobs of routes b and c); runs `kiln report`."""
    start = time.time()
    name = spec["name"]
    row = Model(name, failures)
    print(f"== {name}", flush=True)
    try:
        model = spec["build"]()
        reference = spec["reference"](model) if "reference" in spec else model
    except Exception as error:
        row.fail("build", error)
        return row
    gen = torch.Generator().manual_seed(1234)
    example = spec["inputs"](gen)
    variants = {}
    if spec.get("trace", True):
        try:
            if spec.get("kwargs"):
                variants["traced"] = torch.jit.trace(model, example_kwarg_inputs=example, check_trace=False)
            else:
                variants["traced"] = torch.jit.trace(model, example, check_trace=False)
        except Exception as error:
            row.fail("trace", error)
    if spec["script"]:
        try:
            variants["scripted"] = torch.jit.script(model)
        except Exception as error:
            row.fail("script", error)

    for how, module in variants.items():
        # Route a: in this process, the kiln pass inside the profiling executor.
        route = f"a.{how}"
        try:
            calls = [spec["inputs"](gen) for _ in range(CALLS)]
            err, events = route_in_process(module, reference, calls)
            problem = kiln_problem(events)
            if how in spec.get("nothing_to_fuse", ()):
                # Said so in MODELS: no kiln op may run, and none may fall back either.
                problem = None if not events else f"expected nothing fused, saw {events_text(events)}"
            if problem:
                # Every model here has an elementwise chain for kiln (bias-add + GELU, the
                # activations after convolutions, tanh(gate + h)): a call with no kiln op means
                # the pass did not fuse or the guards sent every group to its fallback.
                # ResNet-18's are all in place (out += identity, then ReLU(inplace=True): 8
                # add_ + relu_ pairs on fresh convolution outputs, plus 9 more relu_), fusible
                # where alias analysis proves that nothing else sees the tensor they overwrite.
                # With fixed shapes every group compiles: a guard that rejects or a group that
                # falls back is kiln failing quietly (an unparsable group, an unsupported constant).
                raise AssertionError(problem)
            row.ok(route, err, f"; call {CALLS}: {events_text(events)}")
        except Exception as error:
            row.fail(route, error)

        # Route d: reduced precision (kiln::optimize in bf16, docs/precision.md) in this process,
        # on the first variant, with the bound as min_cosine on example inputs: outputs
        # keep their dtypes, integer outputs are exact, every floating output reaches the bound on
        # the example inputs (the leading ops kept fp32 where it needs, the plan printed) and
        # stays close to float32's on fresh ones.
        if how == next(iter(variants)):
            route = f"d.{how}.bf16"
            try:
                example = as_tuple(spec["inputs"](gen))
                low_c, plan_json = torch.ops.kiln._optimize_for(module._c, example, 2, False, 32768, "bf16", BF16_MIN_COSINE)
                low, plan = torch.jit._recursive.wrap_cpp_module(low_c), json.loads(plan_json)
                cosines = []
                for inputs in (example, as_tuple(spec["inputs"](gen))):
                    with torch.no_grad():
                        expected, actual = flatten(module(*inputs)), flatten(low(*inputs))
                    assert len(expected) == len(actual), "the outputs differ in number"
                    worst = 1.0
                    for e, a in zip(expected, actual):
                        assert a.dtype == e.dtype and a.shape == e.shape, f"{a.dtype}{list(a.shape)} for {e.dtype}{list(e.shape)}"
                        if e.is_floating_point():
                            worst = min(worst, torch.nn.functional.cosine_similarity(
                                a.double().flatten(), e.double().flatten(), dim=0).item())
                        else:
                            assert torch.equal(a, e), "an integer output changed"
                    cosines.append(worst)
                assert cosines[0] >= BF16_MIN_COSINE, f"cosine {cosines[0]:.6f} on the example inputs (bound {BF16_MIN_COSINE}); {plan}"
                assert cosines[1] >= BF16_COSINE, f"cosine {cosines[1]:.6f} on fresh inputs (bound {BF16_COSINE}); {plan}"
                kept = (f"; fp32 kept: {plan['ops_float32']}/{plan['ops_total']} ops through {plan['last_float32_op']}"
                        if plan["ops_float32"] else "")
                row.ok(route, 0.0, f"; worst cosine to float32 {cosines[0]:.6f} (example), {cosines[1]:.6f} (fresh){kept}")
            except Exception as error:
                row.fail(route, error)

        if how not in spec.get("files", ("traced", "scripted")):
            continue
        stem = f"{tmp}/{name}.{how}"
        try:
            module.save(f"{stem}.pt")
            calls = [spec["inputs"](gen) for _ in range(CALLS)]
            torch.save({"inputs": [as_tuple(c) for c in calls],
                        "outputs": [detach_all(eager_call(reference, c)) for c in calls]}, f"{stem}.data.pt")
        except Exception as error:
            row.fail(f"save.{how}", error)
            continue
        jobs.append({"id": f"{name}/b.{how}", "model": f"{stem}.pt", "data": f"{stem}.data.pt", "mode": "saved"})

        # Route c, first half: kiln fuse (kiln::optimize) writes the file.
        try:
            proc = subprocess.run([kiln_cli, "fuse", f"{stem}.pt", f"{stem}.fused.pt"], capture_output=True,
                                  text=True, timeout=SUBPROCESS_TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"kiln fuse exited {proc.returncode}: {tail(proc.stderr, 20)}")
            jobs.append({"id": f"{name}/c.{how}", "model": f"{stem}.fused.pt", "data": f"{stem}.data.pt",
                         "mode": "fused"})
        except Exception as error:
            row.fail(f"c.{how}", error)

        # What kiln fuses, from kiln report (once per model, on the first variant).
        if row.fused == "-":
            try:
                report = kiln_report(kiln_cli, f"{stem}.pt", spec["specs"])
                total, fused = report["nodes_total"], report["nodes_fused"]
                kinds = {}
                for group in report["groups"]:
                    kinds[group["kind"]] = kinds.get(group["kind"], 0) + 1
                row.fused = f"{fused}/{total} ({100.0 * fused / total:.0f}%)" if total else "0/0"
                print(f"  {name} [report] kiln fuses {fused} of {total} ops ({how}) in {len(report['groups'])} "
                      f"groups ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})", flush=True)
            except Exception as error:
                row.fail("report", error)
    print(f"  ({time.time() - start:.0f} s)", flush=True)
    return row


def main():
    start = time.time()
    kiln_cli, libkiln = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3:])
    unknown = only - {spec["name"] for spec in MODELS}
    assert not unknown, f"unknown models {unknown}"
    torch.ops.load_library(libkiln)  # registers kiln's pass with the executor for route a
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}; "
          f"fp32 tolerance: rtol {RTOL}, atol {ATOL} x max|expected|", flush=True)
    failures, rows, jobs = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in MODELS:
            if only and spec["name"] not in only:
                continue
            try:
                rows[spec["name"]] = route_a_and_files(spec, kiln_cli, tmp, failures, jobs)
            except Exception as error:  # a bug of this test's own: still report and go on
                failures.append((spec["name"], "test", traceback.format_exc()))
                print(f"  [test] FAILED: {error}", flush=True)

        # Routes b and c: every saved file in one fresh process, every fused file in another.
        for mode, title in (("saved", "b: saved files"), ("fused", "c: kiln fuse's files")):
            batch = [job for job in jobs if job["mode"] == mode]
            print(f"== route {title}, in a fresh process with libkiln loaded ({len(batch)} files)", flush=True)
            batch_start = time.time()
            results = run_workers(libkiln, batch, tmp)
            for job in batch:
                name, route = job["id"].split("/")
                result, row = results[job["id"]], rows[name]
                if result.get("error"):
                    row.fail(route, result["error"])
                elif kiln_problem(result["events"]):
                    row.fail(route, kiln_problem(result["events"]))
                else:
                    extra = ""
                    if mode == "fused":
                        extra = (f"; the file holds {result['graph_fusion_groups']} fusion groups, "
                                 f"{result['graph_attention']} attention ops")
                    row.ok(route, result["max_err"], f"{extra}; call {CALLS}: {events_text(result['events'])}")
            print(f"  ({time.time() - batch_start:.0f} s)", flush=True)

    print("\nmodel                 routes (a: in process, b: saved, c: kiln fuse, d: bf16)max |err|   ops kiln fuses")
    for row in rows.values():
        routes = " ".join(f"{route}:{state}" for route, state in row.routes.items())
        print(f"{row.name:<21} {routes:<53} {row.max_err:<11.3g} {row.fused}")
    print(f"({time.time() - start:.0f} s)")
    if failures:
        print(f"\n{len(failures)} failures:")
        for name, route, message in failures:
            print(f"--- {name} [{route}]\n{short(message, 40)}")
        sys.exit(1)
    print(f"\nall {len(rows)} models match eager on every route")


if __name__ == "__main__":
    main()
