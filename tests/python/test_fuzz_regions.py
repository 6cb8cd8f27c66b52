"""A fuzzer of convolution regions: random CNNs built from the blocks real networks are made of
(convolution + batch_norm + activation, residual adds in and out of place, depthwise and grouped
convolutions, pooling, squeeze-excite through linears or 1x1 convolutions, ShuffleNet's channel
shuffle with sizes read from the tensor and its chunk, Inception branches and their cat, ConvNeXt
blocks with permutes, layer_norm and an MLP, patchify stems and 2x2 patch downsamplers, heads through adaptive pooling or mean, flatten and
linear), with random channels, kernels, strides and activations. Some return an intermediate
feature map or a size besides the head. Each is traced (every other one scripted too),
optimized by kiln.optimize on an example input, and run with each way a region has forced (aten,
kiln, onednn_graph, onednn_graph_as_given) and with the measured choice, on fresh inputs: the
example's shape, another batch and size, and a channels-last one. Every output must match eager's
values (float32 tolerance relative to the output's scale), with eager's sizes and strides. The test fails if fewer than half the modules made a region, so it cannot pass by
making none.

Environment: KILN_FUZZ_SEED (default: random, printed first), KILN_FUZZ_MODULES (default 40).
Every failure prints the seed, the module's index and its structure.

usage: test_fuzz_regions.py LIBKILN
"""
import os
import random
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ["KILN_LIBRARY"] = sys.argv[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import kiln  # noqa: E402

SEED = int(os.environ.get("KILN_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
MODULES = int(os.environ.get("KILN_FUZZ_MODULES", "40"))
WAYS = ["aten", "kiln", "onednn_graph", "onednn_graph_as_given", ""]
RTOL, ATOL = 1e-4, 1e-4


def activation(rng):
    return rng.choice([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.Sigmoid(), nn.Tanh(),
                       nn.Identity()])


def batch_norm(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.normal_(0, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0, 0.2)
    return bn


class ConvBnAct(nn.Module):
    def __init__(self, rng, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=rng.random() < 0.5)
        self.bn = batch_norm(cout) if rng.random() < 0.7 else nn.Identity()
        self.act = activation(rng)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.a = ConvBnAct(rng, c, c)
        self.b = nn.Conv2d(c, c, 3, 1, 1, groups=rng.choice([1, c]))
        self.in_place = rng.random() < 0.5

    def forward(self, x):
        y = self.b(self.a(x))
        if self.in_place:
            y += x
            return torch.relu_(y)
        return torch.relu(y + x)


class RepVgg(nn.Module):
    """RepVGG's and RepViT's training-time block: 3x3 and 1x1 convolutions of x, plus x itself (one
    oneDNN Graph partition that reads its input twice)."""

    def __init__(self, rng, c):
        super().__init__()
        groups = rng.choice([1, c])
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=groups, bias=False), batch_norm(c))
        self.b = nn.Conv2d(c, c, 1, 1, 0, groups=groups)
        self.norm = batch_norm(c) if rng.random() < 0.5 else nn.Identity()

    def forward(self, x):
        return self.norm(self.a(x) + self.b(x) + x)


class Ghost(nn.Module):
    """GhostNet's module: a convolution and a cheap depthwise one of its result, concatenated,
    sliced back to the width, the residual added (in place half the time)."""

    def __init__(self, rng, c):
        super().__init__()
        half = (c + 1) // 2
        self.primary = ConvBnAct(rng, c, half, kernel=1)
        self.cheap = nn.Conv2d(half, half, 3, 1, 1, groups=half)
        self.c = c
        self.in_place = rng.random() < 0.5

    def forward(self, x):
        y = self.primary(x)
        out = torch.cat([y, self.cheap(y)], 1)[:, :self.c, :, :]
        if self.in_place:
            out += x
            return out
        return out + x


class SqueezeExcite(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        squeezed = max(1, c // 4)
        self.linear = rng.random() < 0.5
        if self.linear:
            self.fc1, self.fc2 = nn.Linear(c, squeezed), nn.Linear(squeezed, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, squeezed, 1), nn.Conv2d(squeezed, c, 1)
        self.gate = rng.choice([nn.Sigmoid(), nn.Hardsigmoid()])

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        if self.linear:
            b, c, _, _ = x.size()
            s = self.gate(self.fc2(torch.relu(self.fc1(s.flatten(1))))).view(b, c, 1, 1)
        else:
            s = self.gate(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class Shuffle(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.branch = ConvBnAct(rng, c // 2, c // 2, kernel=rng.choice([1, 3]))

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        p, q = x.chunk(2, dim=1)
        return torch.cat([p, self.branch(q)], dim=1)


class Inception(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.a = ConvBnAct(rng, c, c // 2, kernel=1)
        self.b = ConvBnAct(rng, c, c // 2, kernel=3)
        self.c = nn.Conv2d(c, c - 2 * (c // 2), 1) if c % 2 else None

    def forward(self, x):
        parts = [self.a(x), self.b(F.max_pool2d(x, 3, 1, 1))]
        if self.c is not None:
            parts.append(self.c(x))
        return torch.cat(parts, 1)


class ConvNeXt(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        return self.scale * y + x


class Net(nn.Module):
    def __init__(self, rng):
        super().__init__()
        c = rng.choice([4, 6, 8])
        # A patchify stem (ViT's, ConvNeXt's: kernel == stride, no padding) or a convolution.
        patch_stem = rng.random() < 0.2
        if patch_stem:
            k = rng.choice([2, 4])
            self.stem = nn.Conv2d(3, c, k, k, bias=rng.random() < 0.5)
            self.description = [f"patch stem {k}x{k} 3->{c}"]
        else:
            self.stem = ConvBnAct(rng, 3, c, stride=rng.choice([1, 2]))
            self.description = [f"stem 3->{c}"]
        blocks: List[nn.Module] = []
        for number in range(rng.randint(2, 6)):
            kind = rng.choice(["conv", "residual", "se", "shuffle", "inception", "convnext", "pool", "down", "repvgg", "ghost"])
            # A 2x2 patch downsampler (ConvNeXt's) first, where the feature map is at least 4 wide.
            if number == 0 and not patch_stem and rng.random() < 0.3:
                kind = "patch"
            if kind == "patch":
                out, block = 2 * c, nn.Sequential(nn.Conv2d(c, 2 * c, 2, 2, bias=rng.random() < 0.5), activation(rng))
            elif kind == "conv":
                out = rng.choice([c, c + 2, 2 * c])
                block = ConvBnAct(rng, c, out, kernel=rng.choice([1, 3]), groups=rng.choice([1, c]) if out % c == 0 else 1)
            elif kind == "residual":
                out, block = c, Residual(rng, c)
            elif kind == "repvgg":
                out, block = c, RepVgg(rng, c)
            elif kind == "ghost":
                out, block = c, Ghost(rng, c)
            elif kind == "se":
                out, block = c, SqueezeExcite(rng, c)
            elif kind == "shuffle" and c % 2 == 0:
                out, block = c, Shuffle(rng, c)
            elif kind == "inception":
                out, block = c, Inception(rng, c)
            elif kind == "convnext":
                out, block = c, ConvNeXt(rng, c)
            elif kind == "pool":
                out, block = c, rng.choice([nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)])
            else:
                kind, out, block = "down", 2 * c, ConvBnAct(rng, c, 2 * c, stride=2)
            self.description.append(f"{kind} {c}->{out}")
            blocks.append(block)
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.mean_head = rng.random() < 0.5
        self.fc = nn.Linear(c, 10)
        self.extra = rng.choice(["none", "feature", "size"])
        self.description.append(f"head {'mean' if self.mean_head else 'pool'} -> 10, extra {self.extra}")

    def forward(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        feature = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                feature = x
        pooled = x.mean([2, 3]) if self.mean_head else torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        head = self.fc(pooled)
        if self.extra == "feature":
            return head, feature
        if self.extra == "size":  # sizes read after the region
            return head, head * (x.size(1) * x.size(2))
        return head, head


def flatten(value):
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in flatten(part)]
    return [value]


def compare(actual, expected, what):
    actual, expected = flatten(actual), flatten(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, eager has {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not isinstance(e, torch.Tensor):
            assert a == e, f"{what}: output {i} is {a}, eager's {e}"
            continue
        assert a.shape == e.shape, f"{what}: output {i} has shape {tuple(a.shape)}, eager's {tuple(e.shape)}"
        scale = max(1.0, e.abs().max().item())
        error = (a - e).abs().max().item()
        assert error <= ATOL * scale + RTOL * scale, f"{what}: output {i} differs by {error} (scale {scale})"
        assert a.stride() == e.stride(), f"{what}: output {i} has strides {a.stride()}, eager's {e.stride()}"


def main():
    print(f"KILN_FUZZ_SEED={SEED}", flush=True)
    with_regions = failures = 0
    for index in range(MODULES):
        rng = random.Random(SEED * 1000 + index)
        torch.manual_seed(SEED * 1000 + index)
        net = Net(rng).eval()
        size = rng.randint(8, 20)
        example = torch.randn(rng.choice([1, 2]), 3, size, size)
        other_size = rng.randint(8, 20)
        inputs = [torch.randn(example.shape), torch.randn(3, 3, other_size, other_size),
                  torch.randn(example.shape).contiguous(memory_format=torch.channels_last)]
        scripted = index % 2 == 1
        structure = "; ".join(net.description)
        try:
            with torch.no_grad():
                source = torch.jit.script(net) if scripted else torch.jit.trace(net, example, check_trace=False)
                fast = kiln.optimize(source, example_inputs=(example,))
                regions = str(fast.graph).count("kiln::conv_region(")
                with_regions += regions > 0
                for way in WAYS:
                    torch.ops.kiln._force_library_choice(way)
                    try:
                        for number, x in enumerate(inputs):
                            compare(fast(x), net(x), f"way '{way or 'measured'}', input {number}")
                    finally:
                        torch.ops.kiln._force_library_choice("")
            print(f"module {index} ({'scripted' if scripted else 'traced'}, {regions} regions): ok  [{structure}]",
                  flush=True)
        except Exception:
            failures += 1
            print(f"module {index} FAILED (KILN_FUZZ_SEED={SEED}, {'scripted' if scripted else 'traced'}): "
                  f"[{structure}]\n{traceback.format_exc()}", flush=True)
    print(f"{MODULES - failures}/{MODULES} modules match eager; {with_regions} made a region", flush=True)
    if failures:
        sys.exit(1)
    if with_regions * 2 < MODULES:
        print("fewer than half the modules made a region: the fuzzer tests nothing", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
