"""kiln's executor pass alongside torch's oneDNN Graph fuser (`torch.jit.enable_onednn_fusion(True)`)
in one process: the fuser runs after kiln's pass on the same graphs, and must find on every value
it reads the dtype the profiling executor recorded. torchvision's EfficientNet-B0 and
MobileNetV3-Small and a hand-written module (random weights, traced and frozen) run 3 calls with
libkiln loaded and the fuser on, each compared with eager on fresh inputs; before kiln kept the
records it drops between fused ops, EfficientNet-B0 failed there with "bad optional access"."""
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.ops.load_library(sys.argv[1])
torch.manual_seed(0)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.nn.functional.silu(self.conv(x))
        s = torch.sigmoid(y.mean((2, 3), keepdim=True))
        return y * s + x


def models():
    import torchvision
    for name in ("efficientnet_b0", "mobilenet_v3_small"):
        model = getattr(torchvision.models, name)(weights=None).eval()
        yield name, model, (1, 3, 64, 64)
    yield "se_block", Block().eval(), (2, 8, 10, 10)


failures = []
torch.jit.enable_onednn_fusion(True)
try:
    for name, model, shape in models():
        try:
            with torch.no_grad():
                frozen = torch.jit.freeze(torch.jit.trace(model, torch.randn(shape)))
                for call in range(3):
                    x = torch.randn(shape)
                    expected, actual = model(x), frozen(x)
                    scale = expected.abs().max().item() + 1e-6
                    error = (actual - expected).abs().max().item()
                    if error > 1e-4 * scale:
                        raise AssertionError(f"call {call}: max |diff| {error:.3g} over max |expected| {scale:.3g}")
            print(f"{name}: ok")
        except Exception as error:  # noqa: BLE001 - every model is reported
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            print(f"{name}: FAILED: {message}")
            failures.append(name)
finally:
    torch.jit.enable_onednn_fusion(False)
sys.exit(1 if failures else 0)
