"""Mixture-of-experts feed-forward (llama.cpp's ``build_moe_ffn``), batch-invariant.

GGUF stores each expert matrix stacked: ``blk.N.ffn_{gate,up,down}_exps.weight`` of shape
``(n_expert, out, in)`` beside the router ``blk.N.ffn_gate_inp.weight`` ``(n_expert, n_embd)``.
A model declares those four modules on its block (named as the tensors, :class:`Experts` for the
stacked ones) and calls :func:`moe_ffn`:

1. router logits ``gate_inp(x)``, probabilities by softmax over all experts (float32 exps, the sum in
   float64 in expert order, as ggml's soft_max);
2. the ``n_used`` most probable experts of each token (a stable sort: ties go to the lower index);
   their probabilities are the weights, divided by their sum when ``norm_w`` (Mixtral, Qwen3-MoE; the
   sum clamped below at 2^-14 as llama.cpp does), times ``w_scale`` when it is neither 0 nor 1;
3. each expert runs once on the rows routed to it (``down(act(gate(x)) * up(x))``);
4. the token's output is ``y_0 * w_0 + y_1 * w_1 + ...`` in rank order (ggml's chain of adds).

Batch invariance: grouping tokens by expert changes which rows share a product, never how a row is
computed — :func:`gguf_runtime.kernels.linear` computes a row the same way whatever else is in the
call, the activation is lane-wise, and routing, weights and the final sum are per-row operations in a
fixed order. So a token's output bits do not depend on its neighbours or on the ubatch size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import kernels
from ..kernels.ggml import FileWeight
from .layers import Linear, param

_MIN_SUM = 6.103515625e-5  # llama.cpp clamps the top-k weight sum to the smallest normal f16


class Experts(Linear):
    """``{name}.weight`` ``(n_expert, n_out, n_in)``: one matrix per expert. A ``Linear`` for the
    loader (which records the file type in ``source``, and with lazy weights sets ``lazy``), but
    applied one expert at a time; a lazy weight dequantizes only the expert in use."""

    def __init__(self, n_expert: int, n_in: int, n_out: int):
        nn.Module.__init__(self)
        self.weight = param(n_expert, n_out, n_in)
        self.bias = None
        self.optional = set()
        self.source: FileWeight | None = None
        self.lazy = None  # QuantWeight, set by the loader for lazy weights
        self._per_expert: tuple[torch.Tensor, tuple[torch.Tensor, ...], list[FileWeight | None]] | None = None

    def _split(self):
        """Per-expert views of the weight, made once so the linear kernel's packed copies are
        reused, and each expert's file type (with its block mins for Q4_1/Q5_1 ggml numerics)."""
        hit = self._per_expert
        key = self.weight if self.lazy is None else self.lazy
        if hit is None or hit[0] is not key:
            n_expert, n_out = (self.weight if self.lazy is None else self.lazy).shape[:2]
            views = self.weight.unbind(0) if self.lazy is None else ()
            src = self.source
            if src is not None and src.qtype in ("Q4_1", "Q5_1"):
                dev = self.weight.device if self.lazy is None else self.lazy.raw.device
                mins = src.block_mins(dev)  # (n_expert, n_out * n_in / 32)
                srcs = [FileWeight(src.qtype, None, f"{src.name}[{e}]", {dev: mins[e].view(n_out, -1)})
                        for e in range(n_expert)]
            else:
                srcs = [src] * n_expert
            hit = self._per_expert = (key, views, srcs)
        return hit[1], hit[2]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        views, srcs = self._split()
        if self.lazy is not None:
            w = self.lazy.rows(torch.tensor([e]))[0]
            return kernels.linear(x, w, None, srcs[e], fresh=True)
        return kernels.linear(x, views[e], None, srcs[e])

    @property
    def n_expert_out(self) -> tuple[int, int]:
        """``(n_expert, n_out)``."""
        shape = self.weight.shape if self.lazy is None else self.lazy.shape
        return int(shape[0]), int(shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # not a plain linear
        raise TypeError("Experts are applied one expert at a time: use moe_ffn or expert(e, x)")


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of float32 logits computed per row in a fixed order: ``exp(x - max)`` lane-wise,
    the sum in float64 along the row, then a float32 scale by ``1 / sum`` (ggml's soft_max)."""
    e = kernels.exp(logits - logits.amax(-1, keepdim=True))
    total = e.double().cumsum(-1)[..., -1:]  # a sequential sum along the row
    return e * (1.0 / total).float()


def route(logits: torch.Tensor, n_used: int, norm_w: bool = True, w_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts and weights for each row of router ``logits`` (n, n_expert): ``(sel, w)``, both
    ``(n, n_used)``, in rank order (most probable first)."""
    probs = softmax(logits.float())
    top, sel = torch.sort(probs, dim=-1, descending=True, stable=True)
    w, sel = top[:, :n_used], sel[:, :n_used]
    if norm_w:
        w = w / w.double().cumsum(-1)[:, -1:].float().clamp_min(_MIN_SUM)
    if w_scale not in (0.0, 1.0):
        w = w * w_scale
    return sel, w


def moe_ffn(x: torch.Tensor, gate_inp: Linear, gate_exps: Experts | None, up_exps: Experts, down_exps: Experts,
            n_used: int, norm_w: bool = True, w_scale: float = 0.0,
            act: Callable[[torch.Tensor], torch.Tensor] = kernels.silu) -> torch.Tensor:
    """The routed feed-forward of ``x`` (n, n_embd) (see the module docstring); ``gate_exps=None``:
    ``down(act(up(x)))``."""
    n = x.shape[0]
    sel, w = route(gate_inp(x), n_used, norm_w, w_scale)
    n_expert, n_embd = down_exps.n_expert_out
    y = x.new_zeros(n, n_used, n_embd)
    for e in range(n_expert):
        tok, slot = (sel == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok.to(x.device))
        h = up_exps.expert(e, xe)
        h = act(h) if gate_exps is None else act(gate_exps.expert(e, xe)) * h
        y[tok, slot] = down_exps.expert(e, h)
    w = w.to(x.device)
    out = y[:, 0].float() * w[:, :1]
    for j in range(1, n_used):
        out = out + y[:, j].float() * w[:, j:j + 1]
    return out.to(x.dtype)
