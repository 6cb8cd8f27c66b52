"""The elementwise chains of both elementwise benchmark suites: bench/elementwise_bench.cpp (CPU)
and bench/elementwise_cuda_bench.cpp (GPU) compile them as TorchScript (everything from the first
`def` on, embedded at build time); scripts/elementwise_torch_compile.py imports them for
torch.compile. One definition for every suite."""
import torch


def arith2(x, y):
    return x * y + y


def arith4(x, y):
    return ((x * y + y) - 0.5) * 1.5


def arith8(x, y):
    a = x * y + y
    b = (a - 0.5) * 1.5
    c = b / 3.0 + x
    return c * c - y


# TorchScript only: there torch.gelu is aten::gelu; Python spells it torch.nn.functional.gelu.
def transcendental4(x, y):
    return torch.gelu(torch.sigmoid(torch.tanh(torch.exp(x * 0.1))))
