"""Teachers of one architecture run as ONE module, their weights stacked on a leading teacher dim.

Two implementations, picked per group by :func:`make_stacked`:

* :class:`StackedBert` - a hand-stacked BERT encoder (``BertModel`` and the MiniLM checkpoints that
  use it). Every linear layer is one ``baddbmm`` over ``[T, N*S, D]`` for all T teachers, attention
  is one ``scaled_dot_product_attention`` call over ``T*N`` rows. Plain tensor code: nothing for
  ``torch.compile`` or a CUDA graph to trip on.
* :class:`VmapTeachers` - any other architecture: ``torch.func.stack_module_state`` +
  ``vmap(functional_call)`` over the Hugging Face module. General, but ops without a batching rule
  (e.g. the CPU's fused attention) fall back to a per-teacher loop inside vmap.

Both re-point the teachers' own parameters at slices of the stacked tensors: there is no second
copy of any teacher weight. Teachers are frozen and run in eval mode (no dropout).

The stacked tensors live on plain objects, not on an ``nn.Module``, so a compiled graph would take
them as ordinary inputs, which CUDA graph trees copy into the recorded buffers on every replay (the
whole of the teachers' weights, every step). :func:`_frozen` marks each one a static input
(``torch._dynamo.mark_static_address``): its address is fixed, and a replay reads it where it is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from fastmt.models.classifier import encode_hidden, pool


def teacher_groups(teachers) -> list[tuple[int, ...]]:
    """Teachers that can run as one stacked module: same architecture, same tokenizer, same adapter kind."""
    groups: dict[str, list[int]] = {}
    for i, enc in enumerate(teachers.encoders):
        cfg = enc.config.to_diff_dict()
        cfg.pop("_name_or_path", None)
        cfg.pop("fastmt", None)  # a teachers dir's bookkeeping (the teacher's index and name), not architecture
        sig = f"{type(enc).__name__}|{teachers.keys[i]}|{type(teachers.adapters[i]).__name__}|{sorted(cfg.items())}"
        groups.setdefault(sig, []).append(i)
    return [tuple(g) for g in groups.values()]


def make_stacked(teachers, idx: tuple[int, ...], impl: str = "auto"):
    """The stacked module for one group: ``"bert"`` (hand-stacked), ``"vmap"``, or ``"auto"``."""
    if impl == "bert" or (impl == "auto" and StackedBert.supports(teachers.encoders[idx[0]])):
        return StackedBert(teachers, idx)
    return VmapTeachers(teachers, idx)


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked a static input of compiled graphs: frozen weights at a fixed address."""
    torch._dynamo.mark_static_address(t)
    return t


def _stack_into(params: list[nn.Parameter]) -> torch.Tensor:
    """One ``[T, *shape]`` tensor holding the given parameters; each parameter becomes a view of it."""
    stacked = _frozen(torch.stack([p.detach() for p in params]))
    for j, p in enumerate(params):
        p.data = stacked[j]
    return stacked


class StackedBert:
    """T post-LayerNorm BERT encoders of one shape as one batched encoder (forward only)."""

    @staticmethod
    def supports(enc: nn.Module) -> bool:
        c = enc.config
        return (type(enc).__name__ == "BertModel" and getattr(c, "position_embedding_type", "absolute") == "absolute"
                and not getattr(c, "is_decoder", False) and not getattr(c, "add_cross_attention", False)
                and isinstance(c.hidden_act, str) and c.hidden_act in _ACTIVATIONS)

    def __init__(self, teachers, idx: tuple[int, ...]):
        if len(idx) < 2:
            raise ValueError("a stacked group needs at least two teachers")
        self.teachers, self.idx = teachers, idx
        encs = [teachers.encoders[i] for i in idx]
        if not all(self.supports(e) for e in encs):
            raise ValueError("StackedBert takes BERT encoders with absolute positions only")
        cfg = encs[0].config
        self.heads, self.eps = cfg.num_attention_heads, cfg.layer_norm_eps
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.use_token_types = bool(getattr(cfg, "type_vocab_size", 0) and cfg.type_vocab_size > 1)

        def stack(get):
            return _stack_into([get(e) for e in encs])

        emb = lambda e: e.embeddings  # noqa: E731
        self.word = stack(lambda e: emb(e).word_embeddings.weight)  # [T, V, D]
        self.pos = stack(lambda e: emb(e).position_embeddings.weight)  # [T, P, D]
        self.types = stack(lambda e: emb(e).token_type_embeddings.weight)  # [T, types, D]
        self.emb_ln = (stack(lambda e: emb(e).LayerNorm.weight), stack(lambda e: emb(e).LayerNorm.bias))
        self.layers = []
        for li in range(cfg.num_hidden_layers):
            L = [e.encoder.layer[li] for e in encs]
            # Q, K and V as one [T, 3D, D] weight: the three projections in one batched GEMM. Each
            # teacher's query/key/value weights are re-pointed at its rows of it.
            qkv_w = _frozen(torch.stack([torch.cat([l.attention.self.query.weight, l.attention.self.key.weight,
                                                    l.attention.self.value.weight]).detach() for l in L]))
            qkv_b = _frozen(torch.stack([torch.cat([l.attention.self.query.bias, l.attention.self.key.bias,
                                                    l.attention.self.value.bias]).detach() for l in L]))
            d = qkv_w.shape[-1]
            for j, l in enumerate(L):
                for k, lin in enumerate((l.attention.self.query, l.attention.self.key, l.attention.self.value)):
                    lin.weight.data = qkv_w[j, k * d:(k + 1) * d]
                    lin.bias.data = qkv_b[j, k * d:(k + 1) * d]
            layer = {
                "qkv": (qkv_w, qkv_b),
                "attn_out": (_stack_into([l.attention.output.dense.weight for l in L]),
                             _stack_into([l.attention.output.dense.bias for l in L])),
                "attn_ln": (_stack_into([l.attention.output.LayerNorm.weight for l in L]),
                            _stack_into([l.attention.output.LayerNorm.bias for l in L])),
                "inter": (_stack_into([l.intermediate.dense.weight for l in L]),
                          _stack_into([l.intermediate.dense.bias for l in L])),
                "out": (_stack_into([l.output.dense.weight for l in L]), _stack_into([l.output.dense.bias for l in L])),
                "out_ln": (_stack_into([l.output.LayerNorm.weight for l in L]), _stack_into([l.output.LayerNorm.bias for l in L])),
            }
            self.layers.append(layer)
        adapters = [teachers.adapters[i] for i in idx]
        if isinstance(adapters[0], nn.Linear):
            self.adapter = (_stack_into([a.weight for a in adapters]), _stack_into([a.bias for a in adapters]))
        else:
            self.adapter = None

    @staticmethod
    def _linear(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [T, R, in] @ W[t].T + b[t]`` for every teacher t in one batched GEMM."""
        w, b = wb
        if x.device.type == "cpu" and x.dtype == torch.float32 == w.dtype and not torch.is_autocast_enabled("cpu"):
            # Measured on a 2-core EPYC: the CPU's fp32 batched GEMM is ~1.4x slower than one GEMM per
            # teacher (bf16 is the other way round), so fp32 on the CPU loops.
            if torch.compiler.is_compiling():  # Inductor writes each product straight into the stack
                return torch.stack([F.linear(x[i], w[i], b[i]) for i in range(x.shape[0])])
            out = x.new_empty(x.shape[0], x.shape[1], w.shape[1])
            for i in range(x.shape[0]):
                torch.addmm(b[i], x[i], w[i].t(), out=out[i])
            return out
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    def _norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w, b = wb
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * w.unsqueeze(1) + b.unsqueeze(1)

    def encode(self, inputs: dict[str, torch.Tensor], keep: list[int]):
        """Last hidden ``[T, N, S, D]`` and ``{j: hidden state j [T, N, S, D]}`` for j in ``keep``
        (0 = embeddings, l = after layer l), as BertModel's ``hidden_states`` would give them."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        n, s = ids.shape
        t, d = self.word.shape[0], self.word.shape[-1]
        x = self.word[:, ids] + self.pos[:, :s].unsqueeze(1)  # [T, N, S, D]
        if self.use_token_types and "token_type_ids" in inputs:
            x = x + self.types[:, inputs["token_type_ids"]]
        else:
            x = x + self.types[:, :1].unsqueeze(1)  # token type 0 everywhere, as BertModel does
        x = self._norm(x.reshape(t, n * s, d), self.emb_ln)
        kept = {0: x} if 0 in keep else {}
        h, dh = self.heads, d // self.heads
        # [T*N, 1, 1, S(k)]: broadcast over heads and queries by SDPA, never materialised as S x S.
        attend = mask.bool()[None, :, None, None, :].expand(t, n, 1, 1, s).reshape(t * n, 1, 1, s)
        for li, layer in enumerate(self.layers, start=1):
            qkv = self._linear(x, layer["qkv"]).view(t * n, s, 3, h, dh).permute(2, 0, 3, 1, 4)  # [3, T*N, H, S, dh]
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attend)
            ctx = ctx.transpose(1, 2).reshape(t, n * s, d)
            x = self._norm(x + self._linear(ctx, layer["attn_out"]), layer["attn_ln"])
            ff = self._linear(self.act(self._linear(x, layer["inter"])), layer["out"])
            x = self._norm(x + ff, layer["out_ln"])
            if li in keep:
                kept[li] = x
        shape = (t, n, s, d)
        return x.view(shape), {j: v.view(shape) for j, v in kept.items()}

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return x
        lead = x.shape[:-1]
        return self._linear(x.reshape(lead[0], -1, x.shape[-1]), self.adapter).view(*lead, -1)

    def forward(self, inputs, hidden_indices):
        """``{teacher index: (logits [N, C], [adapted hidden [N, S, D] per mapped layer] or None)}``."""
        want = hidden_indices is not None
        keep = sorted({j for m in hidden_indices for j in m}) if want else []
        last, kept = self.encode(inputs, keep)
        if self.teachers.pooling == "cls":
            first = self._adapt(last[:, :, 0])  # [T, N, D]
        else:  # the masked mean over each example's real tokens, for every teacher at once
            m = inputs["attention_mask"].to(last.dtype)[None, :, :, None]
            first = self._adapt((last * m).sum(2) / m.sum(2).clamp_min(1.0))
        kept = {j: self._adapt(v) for j, v in kept.items()}
        out = {}
        for j, i in enumerate(self.idx):
            logits = self.teachers.head(first[j])
            out[i] = (logits, [kept[k][j] for k in hidden_indices[j]] if want else None)
        return out


class VmapTeachers:
    """Any architecture: ``vmap(functional_call)`` over the stacked parameters of one template module."""

    def __init__(self, teachers, idx: tuple[int, ...]):
        self.teachers, self.idx = teachers, idx
        encoders = [teachers.encoders[i] for i in idx]
        adapters = [teachers.adapters[i] for i in idx]
        self.params, self.buffers = stack_module_state(encoders)
        self.adapter_params, _ = stack_module_state(adapters) if any(True for _ in adapters[0].parameters()) else ({}, {})
        for t in [*self.params.values(), *self.buffers.values(), *self.adapter_params.values()]:
            _frozen(t)
        for j, enc in enumerate(encoders):
            for name, p in enc.named_parameters():
                p.data = self.params[name][j]
        self.base = copy.deepcopy(encoders[0]).to("meta")
        self.adapter_base = copy.deepcopy(adapters[0]).to("meta")

    def forward(self, inputs, hidden_indices):
        want = hidden_indices is not None
        layers = sorted({j for m in hidden_indices for j in m}) if want else []

        def one(params, buffers, adapter_params):
            last, all_hidden = encode_hidden(_Bound(self.base, params, buffers), inputs, want)
            adapt = (lambda x: functional_call(self.adapter_base, adapter_params, (x,))) if adapter_params else (lambda x: x)
            first = adapt(pool(last, inputs["attention_mask"], self.teachers.pooling))
            hid = tuple(adapt(all_hidden[j]) for j in layers) if want else ()
            return first, hid

        first, hid = torch.vmap(one, in_dims=(0, 0, 0 if self.adapter_params else None))(
            self.params, self.buffers, self.adapter_params if self.adapter_params else None)
        out = {}
        for j, i in enumerate(self.idx):
            logits = self.teachers.head(first[j])
            h = [hid[layers.index(k)][j] for k in hidden_indices[j]] if want else None
            out[i] = (logits, h)
        return out


class _Bound:
    """Call a meta-device module with given parameters and buffers (for ``encode_hidden``)."""

    def __init__(self, module, params, buffers):
        self.module, self.params, self.buffers, self.config = module, params, buffers, module.config

    def __call__(self, **kwargs):
        return functional_call(self.module, (self.params, self.buffers), (), kwargs)
