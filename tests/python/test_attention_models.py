"""Attention modules written the way popular models write them, traced and scripted: with libkiln
loaded, the TorchScript executor runs each attention as one kiln op (seen in the profiler), the
result matches the eager module, `kiln report` lists the attention group, and `kiln fuse` writes a
file that runs fused with the same result."""
import json
import math
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

kiln_cli, libkiln = sys.argv[1], sys.argv[2]
torch.ops.load_library(libkiln)  # registers kiln's pass with the executor
torch.manual_seed(0)

HIDDEN, HEADS, SEQ, BATCH = 64, 4, 21, 3


class BertSelfAttention(torch.nn.Module):
    """Hugging Face BERT's eager self-attention (torchscript=True era): transpose_for_scores,
    matmul with K^T, / sqrt(d), + extended mask, softmax, dropout, matmul."""

    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HIDDEN // HEADS
        self.all_head_size = HIDDEN
        self.query = torch.nn.Linear(HIDDEN, HIDDEN)
        self.key = torch.nn.Linear(HIDDEN, HIDDEN)
        self.value = torch.nn.Linear(HIDDEN, HIDDEN)
        self.dropout = torch.nn.Dropout(0.1)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_scores = attention_scores + attention_mask
        attention_probs = F.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        return context_layer.view(new_context_layer_shape)


class EagerAttentionForward(BertSelfAttention):
    """Newer Hugging Face eager_attention_forward: * scaling, a sliced mask, softmax in float32
    cast back to the query's dtype, K^T by transpose(2, 3)."""

    def forward(self, hidden_states, attention_mask):
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        scaling = self.attention_head_size ** -0.5
        attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        causal_mask = attention_mask[:, :, :, : key.shape[-2]]
        attn_weights = attn_weights + causal_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_weights = F.dropout(attn_weights, p=0.1, training=self.training)
        attn_output = torch.matmul(attn_weights, value)
        return attn_output.transpose(1, 2).contiguous().reshape(hidden_states.shape)


class BertSdpaAttention(BertSelfAttention):
    """Hugging Face's SDPA path: scaled_dot_product_attention with dropout only in training."""

    def forward(self, hidden_states, attention_mask):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attn_output = F.scaled_dot_product_attention(
            query_layer, key_layer, value_layer, attn_mask=attention_mask,
            dropout_p=0.1 if self.training else 0.0)
        attn_output = attn_output.transpose(1, 2)
        return attn_output.reshape(hidden_states.shape)


class GPT2Attention(torch.nn.Module):
    """Hugging Face GPT-2's _attn: one fused c_attn projection split three ways, / full([], √d),
    where(causal bias slice, w, full([], finfo.min)), + padding mask, softmax, .type, dropout."""

    def __init__(self):
        super().__init__()
        self.embed_dim = HIDDEN
        self.num_heads = HEADS
        self.head_dim = HIDDEN // HEADS
        self.c_attn = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.attn_dropout = torch.nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64))

    def _split_heads(self, tensor):
        new_shape = tensor.size()[:-1] + (self.num_heads, self.head_dim)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full(
            [], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.full([], -3.4028234663852886e38, dtype=attn_weights.dtype,
                                device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = torch.matmul(attn_weights, value)
        return attn_output.permute(0, 2, 1, 3).contiguous().view(hidden_states.shape)


class NanoGPTAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention (the non-flash path): masked_fill(bias == 0, -inf)."""

    def __init__(self):
        super().__init__()
        self.n_embd = HIDDEN
        self.n_head = HEADS
        self.c_attn = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.attn_dropout = torch.nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x, attention_mask):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return y.transpose(1, 2).contiguous().view(B, T, C)


def kiln_ops_run(module, inputs):
    """Which kiln ops ran in one forward call, from the profiler."""
    with torch.autograd.profiler.profile() as prof:
        module(*inputs)
    return {e.name for e in prof.function_events if e.name.startswith("kiln::")}


x = torch.randn(BATCH, SEQ, HIDDEN)
padding = torch.ones(BATCH, SEQ)
padding[1, -5:] = 0
padding[2, -9:] = 0
extended = (1.0 - padding[:, None, None, :]) * torch.finfo(torch.float32).min
inputs = (x, extended)

with tempfile.TemporaryDirectory() as tmp:
    for cls in (BertSelfAttention, EagerAttentionForward, BertSdpaAttention, GPT2Attention, NanoGPTAttention):
        model = cls().eval()
        with torch.no_grad():
            expected = model(*inputs)
        for how in ("traced", "scripted"):
            name = f"{cls.__name__}/{how}"
            module = torch.jit.trace(model, inputs) if how == "traced" else torch.jit.script(model)
            with torch.no_grad():
                for _ in range(3):  # the profiling executor optimizes after its profiling runs
                    actual = module(*inputs)
                ran = kiln_ops_run(module, inputs)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)
            assert ran & {"kiln::attention", "kiln::attention_explicit"}, (name, ran)
            # With autograd recording, the guard sends the call to the original ops.
            grad_module = torch.jit.trace(model, inputs) if how == "traced" else torch.jit.script(model)
            for _ in range(3):
                with_grad = grad_module(*inputs)
            assert with_grad.requires_grad, name
            torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-4, atol=1e-5, msg=name)

            # Ahead of time: kiln report lists the group, kiln fuse writes a file that runs fused.
            path, fused_path = f"{tmp}/m.pt", f"{tmp}/m.fused.pt"
            module.save(path)
            report = json.loads(subprocess.run(
                [kiln_cli, "report", path, "--json", "--input", f"{BATCH},{SEQ},{HIDDEN}:float32",
                 "--input", f"{BATCH},1,1,{SEQ}:float32"], check=True, capture_output=True, text=True).stdout)
            kinds = [group["kind"] for group in report["groups"]]
            assert kinds.count("attention") == 1, (name, report)
            subprocess.run([kiln_cli, "fuse", path, fused_path], check=True, capture_output=True)
            fused = torch.jit.load(fused_path)
            assert "kiln::attention" in str(fused.graph), name
            with torch.no_grad():
                torch.testing.assert_close(fused(*inputs), expected, rtol=1e-4, atol=1e-5, msg=name)
                ran = kiln_ops_run(fused, inputs)
            assert ran & {"kiln::attention", "kiln::attention_explicit"}, (name, ran)
            print(f"{name}: fused ({', '.join(sorted(ran))}), matches eager")
