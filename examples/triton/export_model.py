"""Make the Triton model repository's model: a Hugging Face BERT encoder (random weights, nothing
downloaded), traced, fused ahead of time by kiln and saved as <repository>/kiln_bert/1/model.pt,
beside its config.pbtxt. --check FILE also saves inputs and eager's outputs for a stand-in server
(tests/triton/triton_standin.cpp) to compare with.

    .venv/bin/python examples/triton/export_model.py --repository examples/triton/model_repository
"""
import argparse
import shutil
from pathlib import Path

import torch
import transformers

import kiln

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=HERE / "model_repository",
                        help="the model repository to write (config.pbtxt is copied there when it is elsewhere)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (BERT-base has 12)")
    parser.add_argument("--check", type=Path, help="also save check inputs and eager's outputs here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=args.layers, torchscript=True)
    model = transformers.BertModel(config).eval()
    example = (torch.randint(0, config.vocab_size, (2, 64)), torch.ones(2, 64, dtype=torch.long))
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    fused = kiln.optimize(traced, example_inputs=example)

    model_dir = args.repository / "kiln_bert"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    config_source = HERE / "model_repository" / "kiln_bert" / "config.pbtxt"
    if config_source.resolve() != (model_dir / "config.pbtxt").resolve():
        shutil.copyfile(config_source, model_dir / "config.pbtxt")
    fused.save(str(model_dir / "1" / "model.pt"))
    report = kiln.report(fused)
    print(f"wrote {model_dir / '1' / 'model.pt'}: {len(report['groups'])} kiln groups")

    if args.check:
        # Two request shapes the server would batch: batch 3 x 40 tokens (padding in one row),
        # and batch 1 x 128.
        cases = []
        for batch, tokens in ((3, 40), (1, 128)):
            ids = torch.randint(0, config.vocab_size, (batch, tokens))
            mask = torch.ones(batch, tokens, dtype=torch.long)
            mask[0, tokens // 2:] = 0
            with torch.no_grad():
                hidden, pooled = model(ids, mask)
            cases += [ids, mask, hidden, pooled]
        torch.save(cases, str(args.check))
        print(f"wrote {args.check}: {len(cases) // 4} requests with eager's outputs")


if __name__ == "__main__":
    main()
