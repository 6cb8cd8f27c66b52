"""The row-reduction patterns of bench/reduction_bench.cpp (compiled as TorchScript: everything
from the first `def` on, embedded at build time) and scripts/reduction_bench.py (eager,
torch.compile and kiln). One definition for every suite. Each takes (x, y, w, b): x and y are
[rows, cols], w and b are [cols]."""
import torch


def add_layer_norm(x, y, w, b):
    return torch.layer_norm(x + y, [x.size(-1)], w, b, 1e-12)


def scale_softmax(x, y, w, b):
    return torch.softmax(x * 0.125, -1)


def scale_mask_softmax(x, y, w, b):
    return torch.softmax(x * 0.125 + y, -1)


def rms_norm(x, y, w, b):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def log_softmax(x, y, w, b):
    return torch.log_softmax(x + b, -1)
