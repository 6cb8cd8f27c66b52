#!/usr/bin/env python3
"""torch.compile (Inductor/Triton) on the elementwise chains of bench/elementwise_cuda_bench.cpp
(bench/elementwise_chains.py).

Same chains, shapes and byte counts as the C++ suite (x is 256 MiB: [16384, 4096] float32 or
[32768, 4096] bfloat16; y is x's shape or a [4096] row broadcast), with eager and a
device-to-device copy measured in the same process for reference. Median of CUDA-event timings.
Prints one line per case and, with --json FILE, writes the rows there. Needs a CUDA device.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from elementwise_chains import arith2, arith4, arith8  # noqa: E402  the chains the C++ suites run


COLUMNS = 4096
TENSOR_BYTES = 256 << 20


def seconds(fn, repeats):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("elementwise_torch_compile: no CUDA device")
    torch.manual_seed(0)
    source = torch.empty(TENSOR_BYTES // 4, device="cuda").uniform_()
    target = torch.empty_like(source)
    copy_rate = 2 * TENSOR_BYTES / seconds(lambda: target.copy_(source), args.repeats)
    del source, target
    rows = []
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {copy_rate / 1e9:.0f} GB/s")
    print(f"{'case':34s} {'eager GB/s':>10s} {'compile GB/s':>12s} {'compile %copy':>13s}")
    with torch.no_grad():
        for broadcast in (0, 1):
            for dtype in (torch.float32, torch.bfloat16):
                for ops, fn in ((2, arith2), (4, arith4), (8, arith8)):
                    element = torch.tensor([], dtype=dtype).element_size()
                    x = torch.randn(TENSOR_BYTES // element // COLUMNS, COLUMNS, device="cuda", dtype=dtype)
                    y = torch.randn(COLUMNS if broadcast else (x.shape[0], COLUMNS), device="cuda", dtype=dtype)
                    moved = (2 * x.numel() + y.numel()) * element
                    compiled = torch.compile(fn, dynamic=False)
                    # Inductor computes a bfloat16 chain in float32 and rounds once: compare with
                    # the float32 chain rounded once, not with eager's rounding after every op.
                    expected = fn(x.float(), y.float()).to(dtype)
                    torch.testing.assert_close(compiled(x, y), expected, rtol=2e-2, atol=2e-2)
                    eager = moved / seconds(lambda: fn(x, y), args.repeats)
                    inductor = moved / seconds(lambda: compiled(x, y), args.repeats)
                    name = f"ops:{ops}/bf16:{int(dtype == torch.bfloat16)}/bcast:{broadcast}"
                    print(f"{name:34s} {eager / 1e9:10.0f} {inductor / 1e9:12.0f} {100 * inductor / copy_rate:12.1f}%")
                    rows.append({"case": name, "eager_GBps": eager / 1e9, "torch_compile_GBps": inductor / 1e9,
                                 "copy_GBps": copy_rate / 1e9})
                    del x, y, expected
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
