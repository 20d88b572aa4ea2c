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


def generate(ctx: Context, prompt: list[int], n_predict: int, sampler: Sampler, is_eog=None, seq_id: int = 0) -> Iterator[int]:
    """Decode ``prompt`` into sequence ``seq_id`` (in n_batch pieces), then sample up to
    ``n_predict`` tokens, one cached decode each. Stops early at an end-of-generation token."""
    if not prompt:
        raise ValueError("empty prompt")
    if isinstance(ctx.memory, CrossMemory):  # encoder-decoder (T5): the prompt is the encoder's input and
        ctx.encode(Batch(prompt, seq_ids=[seq_id] * len(prompt)))  # the decoder starts from its start token
        prompt = [ctx.memory.decoder_start]
    for s in range(0, len(prompt), ctx.n_batch):
        piece = prompt[s: s + ctx.n_batch]
        last = s + len(piece) == len(prompt)
        ctx.decode(Batch(piece, seq_ids=[seq_id] * len(piece), output=[False] * (len(piece) - 1) + [last]))
    for _ in range(n_predict):
        tok = sampler(ctx.logits(-1))
        yield tok
        if is_eog is not None and is_eog(tok):
            return
        ctx.decode(Batch([tok], seq_ids=[seq_id]))
