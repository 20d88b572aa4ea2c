"""Token generation with the context's cache: greedy and seeded temperature/top-k/top-p/min-p sampling.

The sampler chain follows llama.cpp's default order (top-k -> top-p -> min-p -> temperature -> draw);
``temp <= 0`` is greedy. Each step decodes only the new token; the prompt is decoded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..batch import Batch
from ..context import Context
from ..memory.cross import CrossMemory


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0


class Sampler:
    def __init__(self, params: SamplerParams):
        self.p = params
        self.gen = torch.Generator().manual_seed(int(params.seed))

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.p
        logits = logits.float().cpu()
        if p.temp <= 0:
            return int(torch.argmax(logits))
        vals, ids = torch.sort(logits, descending=True, stable=True)
        if p.top_k > 0:
            vals, ids = vals[: p.top_k], ids[: p.top_k]
        if p.top_p < 1.0:
            probs = torch.softmax(vals.double(), -1)
            keep = int((probs.cumsum(-1) < p.top_p).sum()) + 1
            vals, ids = vals[:keep], ids[:keep]
        if p.min_p > 0:
            probs = torch.softmax(vals.double(), -1)
            keep = max(1, int((probs >= p.min_p * probs[0]).sum()))
            vals, ids = vals[:keep], ids[:keep]
        probs = torch.softmax(vals.double() / p.temp, -1)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])


def _prefill(ctx: Context, prompt: list[int], seq_id: int = 0) -> None:
    """Decode ``prompt`` into sequence ``seq_id`` in n_batch pieces; only the last token's logits are kept."""
    if not prompt:
        raise ValueError("empty prompt")
    if isinstance(ctx.memory, CrossMemory):  # encoder-decoder (T5): the prompt is the encoder's input and
        ctx.encode(Batch(prompt, seq_ids=[seq_id] * len(prompt)))  # the decoder starts from its start token
        prompt = [ctx.memory.decoder_start]
    for s in range(0, len(prompt), ctx.n_batch):
        piece = prompt[s: s + ctx.n_batch]
        last = s + len(piece) == len(prompt)
        ctx.decode(Batch(piece, seq_ids=[seq_id] * len(piece), output=[False] * (len(piece) - 1) + [last]))


def generate(ctx: Context, prompt: list[int], n_predict: int, sampler: Sampler, is_eog=None, seq_id: int = 0) -> Iterator[int]:
    """Decode ``prompt`` into sequence ``seq_id`` (in n_batch pieces), then sample up to
    ``n_predict`` tokens, one cached decode each (the last one is not decoded: nothing reads it).
    Stops early at an end-of-generation token."""
    _prefill(ctx, prompt, seq_id)
    for i in range(n_predict):
        tok = sampler(ctx.logits(-1))
        yield tok
        if (is_eog is not None and is_eog(tok)) or i + 1 == n_predict:
            return
        ctx.decode(Batch([tok], seq_ids=[seq_id]))


def generate_parallel(ctx: Context, prompt: list[int], n_predict: int, samplers: list[Sampler],
                      is_eog=None) -> Iterator[list[tuple[int, int]]]:
    """``len(samplers)`` sequences from one prompt, decoded together (llama-parallel's shape).

    The prompt is decoded once into sequence 0 and shared with sequences 1..N-1 (``seq_cp``: KV
    cells are shared, a recurrent state is copied on write). Each step, every live sequence draws a
    token with its own sampler and the drawn tokens are decoded in one batch, one token per sequence.
    Yields each step's ``[(seq_id, token), ...]``; a sequence stops at end-of-generation or after
    ``n_predict`` tokens. Under invariant numerics sequence ``i`` gets exactly the tokens
    ``generate`` gives with ``samplers[i]`` alone (batch invariance; tested)."""
    n = len(samplers)
    if n < 1:
        raise ValueError("generate_parallel needs at least one sampler")
    if n > ctx.n_seq_max:
        raise ValueError(f"{n} sequences exceed the context's n_seq_max = {ctx.n_seq_max}")
    _prefill(ctx, prompt, 0)
    for s in range(1, n):
        ctx.memory.seq_cp(0, s)
    rows = {s: -1 for s in range(n)}  # each live sequence's row in the last output (the prompt's last token)
    for i in range(n_predict):
        step = [(s, samplers[s](ctx.logits(r))) for s, r in rows.items()]
        yield step
        live = [(s, t) for s, t in step if not (is_eog is not None and is_eog(t))]
        if not live or i + 1 == n_predict:
            return
        ctx.decode(Batch([t for _, t in live], seq_ids=[s for s, _ in live], output=[True] * len(live)))
        rows = {s: j for j, (s, _) in enumerate(live)}
