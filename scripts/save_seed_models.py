#!/usr/bin/env python3
"""Saves the seed models the benchmarks and `kiln run` measure, traced, with their inputs.

    .venv/bin/python scripts/save_seed_models.py OUT_DIR [--kiln build/bin/kiln]

For each model NAME it writes OUT_DIR/NAME.pt (traced, eval mode, random weights from seed 0),
OUT_DIR/NAME.inputs.pt (its example inputs: a list of tensors saved with torch.save, for
`--inputs`) and OUT_DIR/NAME.kiln.pt (the same model through `kiln fuse`).

Models: bert_base_seed, the BERT-base configuration of the TorchScript deployment guide
(vocabulary 32000, 12 layers, hidden 768, 12 heads, FFN 3072) on its 14 tokens with segment
ids, batch 1 (random token ids of those shapes); bert_base_b8_s128, the same at batch 8 x 128;
resnet18_b1 and resnet18_b16, torchvision's ResNet-18 on 224 x 224 images; gpt2_b4_s64, Hugging
Face GPT-2 (12 layers, 768 wide; its projections are Conv1D, an addmm) on 4 x 64 tokens;
efficientnet_b0 and mobilenet_v3_small, torchvision's, batch 1 at 224 x 224, their batch norms
given running statistics from random batches (as if trained; activations stay O(1)).
`--only NAME` saves one. Measure each with `kiln bench OUT_DIR/NAME.pt --inputs OUT_DIR/NAME.inputs.pt`.
"""
import argparse
import os
import subprocess
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def bert_base(batch, tokens):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072, torchscript=True)
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 32000, (batch, tokens), generator=generator)
    half = tokens // 2
    token_type_ids = torch.cat([torch.zeros(batch, half, dtype=torch.long),
                                torch.ones(batch, tokens - half, dtype=torch.long)], dim=1)
    # BertModel.forward(input_ids, attention_mask, token_type_ids): the mask is all ones.
    inputs = [input_ids, torch.ones(batch, tokens, dtype=torch.long), token_type_ids]
    return model, inputs


def bert_base_seed():
    """The deployment guide's 14 tokens, batch 1."""
    return bert_base(1, 14)


def bert_base_b8_s128():
    return bert_base(8, 128)


def resnet18(batch):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    return model, [torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))]


def trained_statistics(name):
    """A torchvision model whose batch norms hold statistics of random batches, batch 1 at 224."""
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    model.eval()
    return model, [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))]


def gpt2_b4_s64():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False, torchscript=True)
    model = transformers.GPT2Model(config).eval()
    return model, [torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))]


MODELS = {"bert_base_seed": bert_base_seed, "bert_base_b8_s128": bert_base_b8_s128,
          "resnet18_b1": lambda: resnet18(1), "resnet18_b16": lambda: resnet18(16), "gpt2_b4_s64": gpt2_b4_s64,
          "efficientnet_b0": lambda: trained_statistics("efficientnet_b0"),
          "mobilenet_v3_small": lambda: trained_statistics("mobilenet_v3_small")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--only", choices=sorted(MODELS), help="save this model only")
    parser.add_argument("--kiln", default=os.path.join(os.path.dirname(__file__), "..", "build", "bin", "kiln"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, build in MODELS.items():
        if args.only and name != args.only:
            continue
        model, inputs = build()
        with torch.no_grad():
            traced = torch.jit.trace(model, tuple(inputs), check_trace=False)
        path = os.path.join(args.out_dir, name + ".pt")
        traced.save(path)
        torch.save(inputs, os.path.join(args.out_dir, name + ".inputs.pt"))
        fused = os.path.join(args.out_dir, name + ".kiln.pt")
        result = subprocess.run([args.kiln, "fuse", path, fused], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"kiln fuse {path} failed: {result.stderr.strip()}")
        print(f"{name}: {path}, {fused} ({result.stderr.strip()})")


if __name__ == "__main__":
    main()
