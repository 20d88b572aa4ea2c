"""Drift report (transformers #25420): how far the last token's hidden states and logits move between
a full recompute and a cached prefix + 1 token, per layer, with and without batch invariance."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Batch
from ..context import Context
from ..numerics import Numerics


@dataclass
class DriftRow:
    name: str
    invariant: float
    fast: float


def _last_token_states(model, tokens: list[int], split_at: int | None, nx: Numerics) -> list[torch.Tensor]:
    """Per-layer outputs and logits of the last token; ``split_at`` decodes tokens[:split_at] first
    and the rest afterwards (cached), None decodes everything at once (recompute)."""
    caught: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: caught.append((o[0] if isinstance(o, tuple) else o)[-1].detach().float().clone()))
             for blk in model.blk]
    try:
        ctx = Context(model, n_ctx=len(tokens) + 8, n_batch=len(tokens) + 8, n_ubatch=len(tokens) + 8, numerics=nx)
        if split_at is None:
            ctx.decode(Batch(tokens))
        else:
            ctx.decode(Batch(tokens[:split_at]))
            caught.clear()
            ctx.decode(Batch(tokens[split_at:]))
        return caught[-len(model.blk):] + [ctx.logits(-1).float().clone()]
    finally:
        for h in hooks:
            h.remove()


def drift(model, tokens: list[int], numerics: Numerics | None = None) -> list[DriftRow]:
    """Max |difference| per layer (and of the logits) between full recompute and cached prefix + 1
    token, with ``numerics`` invariant and not."""
    if len(tokens) < 2:
        raise ValueError("drift needs at least 2 tokens")
    base = numerics or Numerics()
    res = {}
    for mode in (True, False):
        nx = base.replace(invariant=mode)
        full = _last_token_states(model, tokens, None, nx)
        cached = _last_token_states(model, tokens, len(tokens) - 1, nx)
        res[mode] = [float((a - b).abs().max()) for a, b in zip(full, cached)]
    names = [f"layer {i}" for i in range(len(model.blk))] + ["logits"]
    return [DriftRow(n, res[True][i], res[False][i]) for i, n in enumerate(names)]
