#!/usr/bin/env python3
"""Reduced precision against what a user gets by editing the model: Hugging Face BERT-base (the
seed configuration, random weights) in eager float32, eager `model.bfloat16()`, and traced +
`kiln::optimize` with precision bf16, in one process, interleaved rounds, median ms; with each
bf16 route's cosine similarity to float32 on the same inputs.

usage: scripts/precision_bench.py LIBKILN [BATCH SEQ] [ROUNDS]     (default 8 128 4)
"""
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
import transformers  # noqa: E402

libkiln = sys.argv[1]
batch, seq = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (8, 128)
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
torch.ops.load_library(libkiln)
torch.ops.kiln._disable()  # kiln only through kiln::optimize here
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, torchscript=True)
model = transformers.BertModel(config).eval()
ids = torch.randint(0, 32000, (batch, seq))
token_types = torch.zeros(batch, seq, dtype=torch.long)
with torch.no_grad():
    traced = torch.jit.trace(model, (ids, token_types), check_trace=False)
    kiln_bf16 = torch.jit._recursive.wrap_cpp_module(torch.ops.kiln._optimize(traced._c, 2, False, 32768, "bf16"))
    eager_bf16 = transformers.BertModel(config).eval()
    eager_bf16.load_state_dict(model.state_dict())
    eager_bf16 = eager_bf16.bfloat16()
    routes = {"eager fp32": lambda: model(ids, token_types)[0],
              "eager bf16 (model.bfloat16())": lambda: eager_bf16(ids, token_types)[0],
              "kiln::optimize bf16": lambda: kiln_bf16(ids, token_types)[0]}
    outputs = {name: run() for name, run in routes.items()}  # first calls: measuring, compiling
    for run in routes.values():
        run()
    times = {name: [] for name in routes}
    for _ in range(rounds):
        for name, run in routes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
reference = outputs["eager fp32"].flatten()
print(f"BERT-base, batch {batch} x {seq} tokens, {torch.get_num_threads()} threads, {rounds} interleaved rounds")
base = sorted(times["eager fp32"])[rounds // 2]
for name, values in times.items():
    median = sorted(values)[rounds // 2]
    cosine = torch.nn.functional.cosine_similarity(outputs[name].float().flatten(), reference, dim=0).item()
    print(f"  {name:32s} {median * 1e3:9.2f} ms  {base / median:5.2f}x  cosine to fp32 {cosine:.6f}")
