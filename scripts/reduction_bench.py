#!/usr/bin/env python3
"""The row-reduction patterns of bench/reduction_patterns.py (bench/reduction_bench.cpp runs them
too) in one process: eager, torch.compile and kiln (libkiln's pass on the scripted function),
with GB/s and % of a copy's bandwidth.

Patterns: residual add + layer_norm, scale + softmax, scale + mask + softmax, rms_norm as T5 and
LLaMA write it, log_softmax; shapes 1024x768, 8192x4096, 32x65536; float32 and bfloat16. Bytes
moved: each [rows, cols] input read once and the output written once. Median of --repeats
timings (CUDA events on a GPU). --device cpu runs the same on the CPU (torch.compile there needs
a C++ compiler and is skipped with --no-compile). --json FILE writes the rows.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from reduction_patterns import (add_layer_norm, log_softmax, rms_norm, scale_mask_softmax,  # noqa: E402
                                scale_softmax)

warnings.filterwarnings("ignore")

SHAPES = ((1024, 768), (8192, 4096), (32, 65536))

PATTERNS = {  # name: (function, [rows, cols] tensors moved: inputs read + output written)
    "add_layer_norm": (add_layer_norm, 3),
    "scale_softmax": (scale_softmax, 2),
    "scale_mask_softmax": (scale_mask_softmax, 3),
    "rms_norm": (rms_norm, 2),
    "log_softmax": (log_softmax, 2),
}

def timer(device, repeats):
    def measure(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)
    return measure


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--library", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build",
                                                          "lib", "libkiln.so"))
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--shapes", default="all", help="'small' for 1024x768 only (a quick dry run)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("reduction_bench: no CUDA device")
    torch.ops.load_library(args.library)  # registers kiln's pass with TorchScript's executor
    measure = timer(args.device, args.repeats)
    shapes = SHAPES[:1] if args.shapes == "small" else SHAPES
    rows = []
    with torch.no_grad():
        source = torch.randn(8192, 4096, device=args.device)
        target = torch.empty_like(source)
        copy_rate = 2 * source.numel() * 4 / measure(lambda: target.copy_(source))
        del source, target
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"device {name}, torch {torch.__version__}, copy {copy_rate / 1e9:.1f} GB/s")
        print(f"{'case':38s} {'eager':>8s} {'compile':>8s} {'kiln':>8s}  (GB/s)  kiln %copy  kiln/eager  kiln/compile")
        for pattern, (function, tensors) in PATTERNS.items():
            for dtype in (torch.float32, torch.bfloat16):
                for rows_, cols in shapes:
                    options = dict(device=args.device, dtype=dtype)
                    inputs = (torch.randn(rows_, cols, **options), torch.randn(rows_, cols, **options),
                              torch.randn(cols, **options), torch.randn(cols, **options))
                    moved = tensors * inputs[0].numel() * inputs[0].element_size()
                    eager = measure(lambda: function(*inputs))
                    compiled_time = None
                    if not args.no_compile:
                        compiled = torch.compile(function, dynamic=False)
                        compiled_time = measure(lambda: compiled(*inputs))
                    script = torch.jit.script(function)
                    kiln_time = measure(lambda: script(*inputs))
                    expected = function(*inputs).float()
                    error = (script(*inputs).float() - expected).abs().max().item()
                    row = {"pattern": pattern, "dtype": str(dtype).replace("torch.", ""), "rows": rows_, "cols": cols,
                           "bytes": moved, "eager_s": eager, "compile_s": compiled_time, "kiln_s": kiln_time,
                           "copy_bytes_per_s": copy_rate, "kiln_max_abs_error": error}
                    rows.append(row)
                    rate = lambda t: f"{moved / t / 1e9:8.1f}" if t else f"{'-':>8s}"
                    vs_compile = f"{compiled_time / kiln_time:11.2f}x" if compiled_time else f"{'-':>12s}"
                    print(f"{pattern + ' ' + row['dtype'] + f' {rows_}x{cols}':38s} {rate(eager)} {rate(compiled_time)} "
                          f"{rate(kiln_time)}          {100 * moved / kiln_time / copy_rate:5.0f}%  "
                          f"{eager / kiln_time:9.2f}x {vs_compile}   err {error:.1e}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
