"""kiln from Python: fuse TorchScript models ahead of time, or let the executor fuse them.

Importing the package loads its own ``libkiln.so`` into torch (the ``torch.ops.kiln`` operators
and the executor pass). Then::

    import kiln
    traced = torch.jit.trace(model.eval(), example)
    fast = kiln.optimize(traced, example_inputs=example)   # frozen, fused, kernels compiled
    print(kiln.report(fast))                                # what was fused, bytes moved
    fast.save("model.kiln.pt")                              # loads wherever libkiln.so is loaded

or ``kiln.enable()`` to have TorchScript's executor fuse every module it optimizes from then on.
Everything runs through the operators of the C++ library (``torch.ops.kiln._optimize`` and kin),
so the package is plain Python beside the library.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch

__all__ = ["optimize", "report", "enable", "disable", "enabled", "version", "library_path"]

_LIBRARY_ENV = "KILN_LIBRARY"


def _find_library() -> Path:
    """The libkiln.so this package loads: $KILN_LIBRARY, else the one installed beside it."""
    override = os.environ.get(_LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ImportError(f"kiln: {_LIBRARY_ENV}={override} is not a file")
        return path
    here = Path(__file__).resolve().parent
    for candidate in (here / "lib" / "libkiln.so", here / "libkiln.so"):
        if candidate.is_file():
            return candidate
    raise ImportError(
        f"kiln: libkiln.so is not installed beside {here} (reinstall with `pip install .` from the "
        f"repository, or set {_LIBRARY_ENV} to a built libkiln.so)")


def _already_loaded() -> Optional[str]:
    """The path of a libkiln.so this process loaded before (by torch.ops.load_library), if any."""
    try:
        torch.ops.kiln.fusion_group  # noqa: B018 - resolves only when the library is registered
    except (AttributeError, RuntimeError):
        return None
    for path in getattr(torch.ops, "loaded_libraries", set()):
        if os.path.basename(path).startswith("libkiln"):
            return path
    return "(loaded by the host process)"


def _load() -> str:
    loaded = _already_loaded()
    if loaded is not None:
        return loaded
    path = str(_find_library())
    torch.ops.load_library(path)
    return path


_library = _load()


def library_path() -> str:
    """The path of the libkiln.so serving this process."""
    return _library


def version() -> str:
    """kiln's version string, as the loaded library reports it."""
    return torch.ops.kiln._version()


def enable() -> None:
    """Registers kiln's pass with TorchScript's executor (idempotent).

    Graphs the executor optimizes from now on are fused; graphs it already optimized stay as they
    are. The library enables itself when loaded unless KILN_DISABLE=1 is set.
    """
    torch.ops.kiln._enable()


def disable() -> None:
    """Unregisters the pass (idempotent); graphs already fused keep running fused."""
    torch.ops.kiln._disable()


def enabled() -> bool:
    """Whether the executor pass is registered."""
    return bool(torch.ops.kiln._enabled())


Inputs = Union[torch.Tensor, Sequence[Any]]


def _as_tuple(example_inputs: Inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(
        "kiln.optimize: example_inputs must be a tensor or a list/tuple of the forward's arguments, "
        f"got {type(example_inputs).__name__}")


def _script(module: Any, example: Optional[tuple]) -> torch.jit.ScriptModule:
    if isinstance(module, torch.jit.ScriptModule):
        return module
    if isinstance(module, torch.nn.Module):
        module = module.eval()
        if example is None:
            try:
                return torch.jit.script(module)
            except Exception as error:  # noqa: BLE001 - re-raised with what to do
                raise TypeError(
                    "kiln.optimize: this nn.Module does not script; pass example_inputs to trace it "
                    f"instead ({type(error).__name__}: {str(error).splitlines()[0]})") from error
        return torch.jit.trace(module, example)
    raise TypeError(
        f"kiln.optimize: expected a torch.jit.ScriptModule or torch.nn.Module, got {type(module).__name__}")


def optimize(module: Union[torch.jit.ScriptModule, torch.nn.Module], example_inputs: Optional[Inputs] = None, *,
             min_group_size: int = 2, fast_math: bool = False, cpu_parallel_grain: int = 32768,
             check: bool = True, precision: str = "fp32",
             max_error: Optional[float] = None, min_cosine: Optional[float] = None) -> torch.jit.ScriptModule:
    """Freezes an eval-mode copy of ``module``, fuses its graph and returns it, ready to save.

    Args:
        module: a scripted or traced module; a plain ``nn.Module`` is traced on ``example_inputs``
            (or scripted when there are none).
        example_inputs: the forward's arguments (a tensor, or a list/tuple). When given, the fused
            module runs on them, so kiln compiles its kernels and measures its library calls now
            (or finds them in the disk cache) instead of on the first call, ``report`` can say
            how many bytes each group moves, and in fp32 a model with convolution regions is
            timed with them and without, the faster kept (docs/library-calls.md).
        min_group_size: the fewest fusible ops worth a kernel (default 2).
        fast_math: approximate transcendental math in generated kernels.
        cpu_parallel_grain: below this many elements a CPU kernel runs on the calling thread.
        check: with example inputs, compare the fused module's outputs with the original's and
            raise ``RuntimeError`` naming the first output that differs beyond the dtype's
            tolerance (in fp32; see ``precision`` for the others).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: weights converted once, the
            activations in that dtype, the module's inputs and outputs in their own
            (docs/precision.md). Needs ``example_inputs``; ``accuracy(...)`` of the result is
            then stored as the module's ``kiln_accuracy`` attribute.
        max_error: with a reduced ``precision``, raise ``RuntimeError`` naming the output whose
            relative error (max abs error over the output's largest magnitude) exceeds it.
        min_cosine: with a reduced ``precision``, keep the graph's leading ops in float32 as far
            as needed for every floating output on ``example_inputs`` to reach this cosine
            similarity to the float32 module's (0 < min_cosine < 1: a fused module is not bit-identical to the model even in fp32); what was kept is stored as
            the module's ``kiln_precision_plan`` attribute (a dict), and ``RuntimeError`` is
            raised, naming the output, when the fused module still falls below it.

    Returns:
        A ``torch.jit.ScriptModule``; the original module is left unchanged.
    """
    if not isinstance(min_group_size, int) or isinstance(min_group_size, bool) or min_group_size < 1:
        raise ValueError(f"kiln.optimize: min_group_size must be an int >= 1, got {min_group_size!r}")
    if not isinstance(cpu_parallel_grain, int) or isinstance(cpu_parallel_grain, bool) or cpu_parallel_grain < 1:
        raise ValueError(f"kiln.optimize: cpu_parallel_grain must be an int >= 1, got {cpu_parallel_grain!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"kiln.optimize: precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    reduced = precision != "fp32"
    if reduced and example_inputs is None:
        raise ValueError(f"kiln.optimize: precision={precision!r} needs example_inputs, to report the accuracy")
    if max_error is not None and not reduced:
        raise ValueError("kiln.optimize: max_error goes with precision='bf16' or 'fp16'")
    if min_cosine is not None:
        if not reduced:
            raise ValueError("kiln.optimize: min_cosine goes with precision='bf16' or 'fp16'")
        if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or not 0 < min_cosine < 1:
            raise ValueError(f"kiln.optimize: min_cosine must be a number above 0 and below 1, got {min_cosine!r}")
    example = None if example_inputs is None else _as_tuple(example_inputs)
    scripted = _script(module, example)
    plan = None
    if min_cosine is not None or example is not None:
        # With example inputs kiln::optimize also times the model with convolution regions and
        # without (fp32) and keeps the faster.
        fused_c, plan_json = torch.ops.kiln._optimize_for(scripted._c, example, min_group_size, bool(fast_math),
                                                         cpu_parallel_grain, precision, float(min_cosine or 0.0))
        fused = torch.jit._recursive.wrap_cpp_module(fused_c)
        plan = json.loads(plan_json) if min_cosine is not None else None
    else:
        fused = torch.jit._recursive.wrap_cpp_module(
            torch.ops.kiln._optimize(scripted._c, min_group_size, bool(fast_math), cpu_parallel_grain, precision))
    if example is not None:
        # Each run on its own copy of the inputs: a module may change its inputs in place.
        with torch.no_grad():
            actual = fused(*_copy(example))
            expected = scripted(*_copy(example))
        if reduced:
            fused.kiln_accuracy = _accuracy(actual, expected)
            worst = max(fused.kiln_accuracy, key=lambda entry: entry["max_rel"], default=None)
            if max_error is not None and worst is not None and not worst["max_rel"] <= max_error:
                raise RuntimeError(f"kiln.optimize: {worst['output']}'s relative error {worst['max_rel']:.3g} in "
                                   f"{precision} exceeds max_error {max_error:g}")
            if plan is not None:
                fused.kiln_precision_plan = plan
                for entry in fused.kiln_accuracy:
                    if not entry["cosine"] >= min_cosine:
                        raise RuntimeError(f"kiln.optimize: {entry['output']}'s cosine {entry['cosine']:.6f} to fp32 "
                                           f"is below min_cosine {min_cosine:g}")
        elif check:
            _check_outputs(actual, expected, _computed_dtypes(scripted))
    return fused


def _copy(value: Any) -> Any:
    """The tensors of ``value`` (in tuples, lists and dicts) cloned, the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copy(item) for item in value)
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return value


def _accuracy(actual: Any, expected: Any) -> list:
    """Per floating output: max abs error, max rel error (over the output's largest magnitude)
    and cosine similarity of the reduced-precision output against the float32 one."""
    result = []
    for (name, a), (_, e) in zip(_flatten(actual), _flatten(expected)):
        if not e.is_floating_point() or a.shape != e.shape:
            continue
        a, e = a.double().flatten(), e.double().flatten()
        max_abs = (a - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        norms = (a.norm() * e.norm()).item()
        result.append({"output": name, "max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs,
                       "cosine": (a.dot(e).item() / norms) if norms > 0 else float(max_abs == 0)})
    return result


def _flatten(value: Any, prefix: str = "output") -> list:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _flatten(v, f"{prefix}[{i}]")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}[{k!r}]")]
    return []


# How far a fused output may be from the unfused one, by the least precise dtype it was computed in.
_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}
# c10::ScalarType's numbers for the floating dtypes, as a graph's `dtype` arguments hold them.
_SCALAR_TYPES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16}


def _computed_dtypes(module: torch.jit.ScriptModule) -> set:
    """The floating dtypes ``module``'s forward computes in, as far as its graph says: the types a
    trace records on its values, and constant ``dtype`` arguments (``x.float()``, ``softmax(...,
    dtype=...)``). A float64 model that computes its norms in float32 (Hugging Face's LLaMA,
    ConvNeXt) is checked with float32's tolerance."""
    found = set()
    try:
        graph = module.inlined_graph
    except (AttributeError, RuntimeError):
        return found

    names: Dict[str, list] = {}  # argument names by schema text

    def argument_names(schema: str) -> list:
        if schema not in names:
            try:
                names[schema] = [argument.name for argument in torch._C.parse_schema(schema).arguments]
            except RuntimeError:  # "(no schema)", or one this torch cannot parse back
                names[schema] = []
        return names[schema]

    def visit(block) -> None:
        for node in block.nodes():
            for value in node.outputs():
                kind = value.type()
                if isinstance(kind, torch._C.TensorType) and kind.dtype() in _TOLERANCE:
                    found.add(kind.dtype())
            for name, value in zip(argument_names(node.schema()), node.inputs()):
                if name == "dtype" and value.node().kind() == "prim::Constant":
                    number = value.toIValue()
                    if isinstance(number, int) and number in _SCALAR_TYPES:
                        found.add(_SCALAR_TYPES[number])
            for inner in node.blocks():
                visit(inner)

    visit(graph)
    return found


def _check_outputs(actual: Any, expected: Any, computed: Iterable[torch.dtype] = ()) -> None:
    """Raises where a fused output differs from the unfused one beyond the tolerance of its dtype,
    or of the least precise of ``computed`` (the dtypes the module computes in) where that is larger."""
    floor = max((_TOLERANCE[dtype] for dtype in computed if dtype in _TOLERANCE), default=0.0)
    for (name, a), (_, e) in zip(_flatten(actual), _flatten(expected)):
        if a.shape != e.shape or a.dtype != e.dtype:
            raise RuntimeError(f"kiln.optimize: {name} is {a.dtype}{list(a.shape)} fused, "
                               f"{e.dtype}{list(e.shape)} unfused")
        if a.is_floating_point():
            # Relative to each element and to the output's largest magnitude: a fused kernel sums
            # in another order than ATen (folded batch_norm, oneDNN's blocking), an error that
            # scales with the output, not with the element (an element near 0 in an output of
            # magnitude 1e3 moves by about 1e3 ulps of float32).
            tolerance = max(_TOLERANCE.get(a.dtype, 1e-4), floor)
            finite = e[e.isfinite()]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            if not torch.allclose(a.double(), e.double(), rtol=tolerance, atol=tolerance * scale, equal_nan=True):
                error = (a.double() - e.double()).abs().nan_to_num(float("inf")).max().item()
                raise RuntimeError(f"kiln.optimize: {name} differs from the unfused module's by {error:g} "
                                   f"(tolerance {tolerance:g} of each element and of the output's largest "
                                   f"magnitude {scale:g}, {a.dtype}); please report this model")
        elif not torch.equal(a, e):
            raise RuntimeError(f"kiln.optimize: {name} differs from the unfused module's ({a.dtype})")


def report(module: torch.jit.ScriptModule) -> Dict[str, Any]:
    """What kiln fused in ``module``'s forward, as a dict.

    Keys: ``nodes_total``, ``nodes_fused`` and ``groups``, a list of dicts with ``name``, ``kind``
    (``"elementwise"``, ``"attention"``, ``"linear"`` or ``"conv2d"``), ``ops``, ``inputs``,
    ``outputs``, ``bytes_fused`` and ``bytes_unfused`` (per call, measured on the last run; -1
    before any), ``calls``, ``fallbacks``, ``ns_per_call`` (mean wall time of a fused call on the
    CPU; -1 when none was timed, as on CUDA) and ``choice`` (linear and conv2d: the way the last
    call ran, measured fastest: ``"onednn"``, ``"aten_transposed"``, ``"aten"``, ...). A module from ``optimize`` (or a fused file) is reported as it is; any other
    module by the graph the executor last optimized for it (kiln enabled, run at least once;
    run it under ``torch.no_grad()``: with autograd on, the executor may keep the ops in
    differentiable subgraphs that the report does not look into).
    """
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"kiln.report: expected a torch.jit.ScriptModule, got {type(module).__name__}")
    return json.loads(torch.ops.kiln._report(module._c))
