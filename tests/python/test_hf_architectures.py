"""Forty-four architectures kiln has no test of its own for, each small and with random weights, through
every route a user takes: Hugging Face encoders (ALBERT, ELECTRA, ConvBERT, DeBERTa v1 and v2,
MPNet, SqueezeBERT, MobileBERT, XLM-R, Funnel, CLIP text), decoders (LLaMA, Mistral, Qwen2, Phi,
Gemma, GPT-NeoX, GPT-Neo, GPT-J, BLOOM, Falcon, OPT), encoder-decoders (BART, Marian, T5) and
vision and audio models (CLIP vision, DeiT, BEiT, Swin, ConvNeXt, ResNet, SegFormer, MobileViT,
wav2vec 2.0), and torchvision models outside test_zoo's (MaxViT, Swin V2, ViT-B/32, R3D-18,
R(2+1)D-18, RAFT, and MobileNetV3, ResNet-18 and GoogLeNet scripted). Nothing is downloaded.

Each model is traced (or scripted) and checked against what the traced module itself gives on
fresh random inputs, route by route:
  optimize     kiln.optimize with example inputs, two calls;
  other shape  the optimized module at another batch and sequence length (text models): its
               measured choices were made at the example's shapes;
  file         the optimized module saved and loaded;
  pass         kiln's executor pass (kiln.enable()) on a new trace, after the profiling runs.
The traced module is checked against eager on the example's shapes too (a trace that bakes in a
shape may differ from eager at another one; the other-shape route then compares with the trace).

Tolerance as test_zoo's: |actual - expected| <= 1e-4 |expected| + 1e-4 max|expected| per output.
Decoders take a 4-D float mask (causal, with padding): Transformers 4.53 builds its own masks with
torch.vmap, which torch.jit.trace cannot trace. Whisper is left out for that reason.

--dtype runs the models with their weights and floating inputs in bfloat16, float16 or float64
(a deployed model in another dtype than the float32 kiln is measured in); the tolerance is then
that of the least precise dtype the traced module computes in, as kiln.optimize's own check takes
it (a float64 LLaMA computes its norms in float32). --channels-last gives image inputs (4-D) the
channels-last layout. ctest runs a subset of the models for each. --device cuda runs them on a GPU
(scripts/device-check.sh does, in float32 and float16); a failure before kiln runs (the trace, or
the traced module against eager) says so, since that machine's Transformers is another version.

usage: test_hf_architectures.py LIBKILN [--dtype bfloat16|float16|float64] [--channels-last]
                                [--device cpu|cuda] [MODEL...]
"""
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["KILN_LIBRARY"] = sys.argv[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers as T  # noqa: E402

import kiln  # noqa: E402
from test_zoo import flatten  # noqa: E402  (every tensor of a nested output, in order)

TOLERANCE = 1e-4  # in float32; see tolerance()
DTYPE = torch.float32  # --dtype
CHANNELS_LAST = False  # --channels-last
DEVICE = torch.device("cpu")  # --device
VOCAB = 1000
ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128)
SEQ2SEQ = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=128)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)

# name: (inputs kind, config class, model class, config arguments)
HF_MODELS = {
    "albert": ("text", T.AlbertConfig, T.AlbertModel, dict(embedding_size=32, **ENCODER)),
    "bert_classifier": ("text", T.BertConfig, T.BertForSequenceClassification, ENCODER),
    "electra": ("text", T.ElectraConfig, T.ElectraModel, dict(embedding_size=32, **ENCODER)),
    "convbert": ("text", T.ConvBertConfig, T.ConvBertModel, ENCODER),
    "deberta": ("text", T.DebertaConfig, T.DebertaModel, ENCODER),
    "deberta_v2": ("text", T.DebertaV2Config, T.DebertaV2Model, ENCODER),
    "mpnet": ("text", T.MPNetConfig, T.MPNetModel, ENCODER),
    "squeezebert": ("text", T.SqueezeBertConfig, T.SqueezeBertModel, dict(embedding_size=64, **ENCODER)),
    "mobilebert": ("text", T.MobileBertConfig, T.MobileBertModel,
                   dict(ENCODER, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32, intermediate_size=64)),
    "xlm_roberta": ("text", T.XLMRobertaConfig, T.XLMRobertaModel, ENCODER),
    "funnel": ("text", T.FunnelConfig, T.FunnelModel,
               dict(d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1], vocab_size=VOCAB)),
    "clip_text": ("text", T.CLIPTextConfig, T.CLIPTextModel, ENCODER),
    "bloom": ("text", T.BloomConfig, T.BloomModel, dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
    "opt": ("text", T.OPTConfig, T.OPTModel, dict(DECODER, ffn_dim=128, word_embed_proj_dim=64)),
    "llama": ("causal", T.LlamaConfig, T.LlamaModel, dict(DECODER, num_key_value_heads=2, intermediate_size=128)),
    "mistral": ("causal", T.MistralConfig, T.MistralModel, dict(DECODER, num_key_value_heads=2, intermediate_size=128)),
    "qwen2": ("causal", T.Qwen2Config, T.Qwen2Model, dict(DECODER, num_key_value_heads=2, intermediate_size=128)),
    "phi": ("causal", T.PhiConfig, T.PhiModel, dict(DECODER, intermediate_size=128)),
    "gemma": ("causal", T.GemmaConfig, T.GemmaModel,
              dict(DECODER, num_key_value_heads=1, head_dim=16, intermediate_size=128)),
    "gpt_neox": ("causal", T.GPTNeoXConfig, T.GPTNeoXModel, dict(DECODER, intermediate_size=128)),
    "gpt_neo": ("causal", T.GPTNeoConfig, T.GPTNeoModel,
                dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                     window_size=8, vocab_size=VOCAB, max_position_embeddings=128)),
    "gptj": ("causal", T.GPTJConfig, T.GPTJModel,
             dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=128)),
    "falcon": ("causal", T.FalconConfig, T.FalconModel,
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)),
    "bart": ("seq2seq", T.BartConfig, T.BartModel, SEQ2SEQ),
    "marian": ("seq2seq", T.MarianConfig, T.MarianMTModel, dict(SEQ2SEQ, decoder_start_token_id=0, pad_token_id=1)),
    "t5": ("seq2seq", T.T5Config, T.T5Model, dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, vocab_size=VOCAB)),
    "clip_vision": ("image", T.CLIPVisionConfig, T.CLIPVisionModel, VISION),
    "deit": ("image", T.DeiTConfig, T.DeiTModel, VISION),
    "beit": ("image", T.BeitConfig, T.BeitModel, dict(VISION, use_relative_position_bias=True)),
    "swin": ("image", T.SwinConfig, T.SwinModel,
             dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4)),
    "convnext": ("image", T.ConvNextConfig, T.ConvNextModel,
                 dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], image_size=64)),
    "resnet_hf": ("image", T.ResNetConfig, T.ResNetModel, dict(hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16)),
    "segformer": ("image", T.SegformerConfig, T.SegformerModel,
                  dict(hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[2, 1],
                       num_attention_heads=[1, 2], strides=[4, 2], patch_sizes=[7, 3], decoder_hidden_size=32)),
    "mobilevit": ("image", T.MobileViTConfig, T.MobileViTModel,
                  dict(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64])),
    "wav2vec2": ("audio", T.Wav2Vec2Config, T.Wav2Vec2Model,
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
                      conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
}
ARGUMENT_NAMES = {"text": ["input_ids", "attention_mask"], "causal": ["input_ids", "attention_mask"],
                  "seq2seq": ["input_ids", "attention_mask", "decoder_input_ids"], "image": ["pixel_values"],
                  "audio": ["input_values"]}

TV = torchvision.models


def features(vit):
    """torchvision's ViT with its head off: the head starts as zeros, which any result matches."""
    vit.heads = torch.nn.Identity()
    return vit

# name: (model, input shape, traced or scripted)
TORCHVISION_MODELS = {
    "maxvit_t": (lambda: TV.maxvit_t(), (1, 3, 224, 224), "trace"),
    "swin_v2_t": (lambda: TV.swin_v2_t(), (1, 3, 128, 128), "trace"),
    "vit_b_32": (lambda: features(TV.vit_b_32()), (1, 3, 224, 224), "trace"),
    "r3d_18": (lambda: TV.video.r3d_18(), (1, 3, 8, 64, 64), "trace"),
    "r2plus1d_18": (lambda: TV.video.r2plus1d_18(), (1, 3, 8, 64, 64), "trace"),
    "raft_small": (lambda: TV.optical_flow.raft_small(), (1, 3, 128, 128), "trace two"),
    "mobilenet_v3_large_scripted": (lambda: TV.mobilenet_v3_large(), (1, 3, 128, 128), "script"),
    "resnet18_scripted": (lambda: TV.resnet18(), (2, 3, 96, 96), "script"),
    "googlenet_scripted": (lambda: TV.googlenet(aux_logits=False, init_weights=False), (1, 3, 128, 128), "script"),
}


class Keywords(torch.nn.Module):
    """A Hugging Face model called with its inputs by name (tracing passes them by position)."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args)))


def hf_inputs(kind, config, batch, seq, gen):
    if kind in ("text", "seq2seq"):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 3:] = 0  # padding in the first row
        if kind == "text":
            return (ids, mask)
        return (ids, mask, torch.randint(3, VOCAB, (batch, seq // 2), generator=gen))
    if kind == "causal":
        ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
        mask = torch.full((batch, 1, seq, seq), float("-inf")).triu(1)
        mask[0, :, :, seq - 3:] = float("-inf")
        return (ids, mask.clamp(min=torch.finfo(torch.float).min))
    if kind == "image":
        size = getattr(config, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        return (torch.randn(batch, 3, size, size, generator=gen),)
    return (torch.randn(batch, 400 + seq, generator=gen),)  # audio


def tolerance(traced):
    """float32's, or that of the least precise dtype `traced` computes in where larger (the dtypes
    its graph records, as kiln.optimize's check finds them)."""
    dtypes = kiln._computed_dtypes(traced) | {DTYPE}
    return max(TOLERANCE if d == torch.float32 else kiln._TOLERANCE[d] for d in dtypes if d in kiln._TOLERANCE)


def as_variant(tensor):
    """An input on --device; a floating one in --dtype, an image batch channels-last with
    --channels-last."""
    tensor = tensor.to(DEVICE)
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.to(DTYPE)
    if CHANNELS_LAST and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def compare(actual, expected, tol=TOLERANCE):
    """Asserts every output tensor matches; returns the largest difference relative to max|expected|."""
    actual, expected = flatten(actual), flatten(expected)
    assert len(actual) == len(expected), f"{len(actual)} output tensors, expected {len(expected)}"
    worst = 0.0
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{a.dtype}{list(a.shape)}, expected {e.dtype}{list(e.shape)}"
        if not e.is_floating_point():
            assert torch.equal(a, e), "an integer output differs"
            continue
        if e.numel() == 0:
            continue
        diff = (a - e).abs()
        scale = e.abs().max()
        bad = int((diff > tol * e.abs() + tol * scale).sum())
        relative = float(diff.max() / (scale + 1e-12))
        assert bad == 0, f"{bad} of {e.numel()} elements out of tolerance, largest difference {relative:.2e} of max|expected|"
        worst = max(worst, relative)
    return worst


def before_kiln(check):
    """The trace against eager, before kiln runs; its failure is reported as such."""
    try:
        with torch.no_grad():
            check()
    except Exception as error:
        raise RuntimeError(f"before kiln ran (the trace, or the traced module against eager): {error}") from error


def routes(name, make_trace, example, fresh, other):
    """Runs every route; returns one line of results."""
    with torch.no_grad():
        traced = make_trace()
        tol = tolerance(traced)
        want = traced(*fresh)
        optimized = kiln.optimize(traced, example)
        results = [f"optimize {compare(optimized(*fresh), want, tol):.1e}"]
        compare(optimized(*fresh), want, tol)
        if other is not None:
            results.append(f"other shape {compare(optimized(*other), traced(*other), tol):.1e}")
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kiln_arch_{os.getpid()}_{name}.pt")
        try:
            optimized.save(path)
            results.append(f"file {compare(torch.jit.load(path)(*fresh), want, tol):.1e}")
        finally:
            if os.path.exists(path):
                os.remove(path)
        kiln.enable()
        try:
            again = make_trace()
            for _ in range(4):
                again(*fresh)
            results.append(f"pass {compare(again(*fresh), want, tol):.1e}")
        finally:
            kiln.disable()
        kinds = {}
        for group in kiln.report(optimized)["groups"]:
            kinds[group["kind"]] = kinds.get(group["kind"], 0) + 1
        assert kinds, "kiln took nothing in this model"
        return ", ".join(results) + f"; groups {kinds}"


def run_hf(name):
    kind, config_class, model_class, arguments = HF_MODELS[name]
    config = config_class(**arguments)
    config.torchscript = True
    if hasattr(config, "use_cache"):
        config.use_cache = False
    torch.manual_seed(0)
    model = Keywords(model_class(config).eval(), ARGUMENT_NAMES[kind]).eval().to(DTYPE).to(DEVICE)
    gen = torch.Generator().manual_seed(1)

    def inputs(batch, seq):
        return tuple(as_variant(tensor) for tensor in hf_inputs(kind, config, batch, seq, gen))

    example, fresh = inputs(2, 12), inputs(2, 12)
    other = inputs(3, 8) if kind != "image" else None

    def make_trace():
        return torch.jit.trace(model, example, strict=False, check_trace=False)

    def trace_matches_eager():
        traced = make_trace()
        compare(traced(*fresh), model(*fresh), tolerance(traced))

    before_kiln(trace_matches_eager)
    return routes(name, make_trace, example, fresh, other)


def run_torchvision(name):
    make, shape, how = TORCHVISION_MODELS[name]
    torch.manual_seed(0)
    model = make()
    model.train()  # batch norm statistics from random batches, so that activations stay O(1)
    inputs = 2 if how == "trace two" else 1
    with torch.no_grad():
        for _ in range(2):
            model(*[torch.randn(2, *shape[1:]) for _ in range(inputs)])
    model.eval().to(DTYPE).to(DEVICE)
    example = tuple(as_variant(torch.randn(*shape)) for _ in range(inputs))
    fresh = tuple(as_variant(torch.randn(*shape)) for _ in range(inputs))

    def make_trace():
        if how == "script":
            return torch.jit.script(model)
        return torch.jit.trace(model, example, check_trace=False)

    def trace_matches_eager():
        traced = make_trace()
        compare(traced(*fresh), model(*fresh), tolerance(traced))

    before_kiln(trace_matches_eager)
    return routes(name, make_trace, example, fresh, None)


def main():
    global DTYPE, CHANNELS_LAST, DEVICE
    torch.set_num_threads(2)
    names = sys.argv[2:]
    if "--channels-last" in names:
        CHANNELS_LAST = True
        names.remove("--channels-last")
    if "--device" in names:
        at = names.index("--device")
        DEVICE = torch.device(names[at + 1])
        del names[at:at + 2]
    if "--dtype" in names:
        at = names.index("--dtype")
        DTYPE = getattr(torch, names[at + 1])
        del names[at:at + 2]
    names = names or list(HF_MODELS) + list(TORCHVISION_MODELS)
    failures = []
    for name in names:
        start = time.time()
        try:
            line = run_hf(name) if name in HF_MODELS else run_torchvision(name)
            print(f"{name:28s} ok   {line} ({time.time() - start:.0f} s)", flush=True)
        except Exception as error:
            traceback.print_exc()
            first = (str(error).strip().splitlines() or [""])[0]
            print(f"{name:28s} FAIL {type(error).__name__}: {first[:300]}", flush=True)
            failures.append(name)
    print(f"{len(names) - len(failures)} of {len(names)} models pass" + (f"; failed: {', '.join(failures)}" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
