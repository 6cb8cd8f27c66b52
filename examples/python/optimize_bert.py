"""Trace a Hugging Face BERT, fuse it with kiln, look at what was fused, save it and load it back.

    .venv/bin/python examples/python/optimize_bert.py [--layers N] [--out bert.kiln.pt]

Random weights (nothing is downloaded); the model is the one the Transformers TorchScript guide
traces. Needs `make build` first, which installs the `kiln` package into .venv.
"""
import argparse
import time

import torch
import transformers

import kiln


def timed(module, inputs, calls=10):
    with torch.no_grad():
        module(*inputs)
        start = time.perf_counter()
        for _ in range(calls):
            module(*inputs)
    return (time.perf_counter() - start) / calls * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (BERT-base has 12)")
    parser.add_argument("--out", default="bert.kiln.pt", help="where to save the fused model")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=args.layers, torchscript=True)
    model = transformers.BertModel(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 128))
    mask = torch.ones(1, 128, dtype=torch.long)
    example = (tokens, mask)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)

    # Freeze, fuse, compile the kernels on the example and check the result against the original.
    fast = kiln.optimize(traced, example_inputs=example)

    report = kiln.report(fast)
    print(f"kiln {kiln.version()}: fused {report['nodes_fused']} of {report['nodes_total']} nodes "
          f"into {len(report['groups'])} groups")
    for group in report["groups"]:
        if group["kind"] == "attention":
            moved = "kiln's attention kernel"
        elif group["bytes_fused"] >= 0:
            moved = f"{group['bytes_fused'] / 1e6:.2f} MB moved instead of {group['bytes_unfused'] / 1e6:.2f} MB"
        else:
            moved = "not run yet"
        print(f"  {group['name']} ({group['kind']}): {' '.join(op.split('::')[-1] for op in group['ops'])}: {moved}")

    fast.save(args.out)
    loaded = torch.jit.load(args.out)  # any process with kiln imported (or libkiln.so loaded)
    with torch.no_grad():
        expected = model(*example)[0]
        actual = loaded(*example)[0]
    error = (actual - expected).abs().max().item()
    print(f"saved {args.out} and loaded it back: max abs error against eager {error:.2e}")
    print(f"per call: TorchScript {timed(traced, example):.1f} ms, kiln {timed(loaded, example):.1f} ms")
    if not error < 1e-3:
        raise SystemExit("the fused model does not match eager")


if __name__ == "__main__":
    main()
