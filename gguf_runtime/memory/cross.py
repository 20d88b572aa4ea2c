"""The memory of an encoder-decoder model (T5): the decoder's self-attention KV cache beside each
sequence's encoder output, which the decoder's cross-attention reads (llama.cpp's ``llama_cross``).

``Context.encode(batch)`` (llama.cpp's ``llama_encode``) runs the encoder over whole sequences
through :meth:`CrossMemory.encoder_split` / :meth:`encoder_view` (an
:class:`~gguf_runtime.memory.encoder.EncoderMemory`: every token sees its whole sequence) and keeps
the encoder's final states per sequence (:meth:`store`). ``Context.decode(batch)`` then runs the
decoder as for any KV-cache model; its view adds :meth:`DecoderView.cross_attend`: each query
attends over the encoder output of its own (primary) sequence, with the same fixed-order kernel as
every other attention.

Semantics: encoding a sequence replaces that sequence's encoder output and leaves the others
(llama.cpp keeps only the last ``llama_encode``'s outputs; encoding every sequence in one batch
gives the same). Sequence operations act on the KV cache as usual; ``seq_cp`` also shares the
encoder output, ``seq_keep`` and ``clear`` drop the others'; ``seq_rm`` leaves the encoder output
(the decoder may be restarted on the same input). Decoding a sequence with no encoder output is a
one-line ``BatchError``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..batch import BatchAllocator, UBatch
from ..errors import BatchError
from ..kernels import attention
from .base import Memory
from .encoder import EncoderMemory, EncoderView
from .kv_cache import KVCache, KVView, LayerKV


class DecoderView:
    """A decoder ubatch: ``layer(il)`` is the self-attention cache layer; :meth:`cross_attend`."""

    def __init__(self, kv: KVView, groups: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv, self.groups = kv, groups  # (ubatch rows of one sequence, that sequence's encoder output)

    def layer(self, il: int) -> LayerKV:
        return self.kv.layer(il)

    def cross_attend(self, q: torch.Tensor, kv_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                     *, scale: float) -> torch.Tensor:
        """q (n, n_head, d); ``kv_of(enc)`` gives K and V (n_enc, n_head_kv, d) of an encoder output
        (n_enc, n_embd). Returns (n, n_head, d_v): every query over all its sequence's encoder states."""
        out = None
        for rows, enc in self.groups:
            k, v = kv_of(enc)
            rows = rows.to(q.device)
            qq = q.index_select(0, rows).transpose(0, 1)  # (heads, n_q, d)
            mask = torch.ones(len(rows), k.shape[0], dtype=torch.bool, device=q.device)
            o = attention(qq, k.transpose(0, 1), v.transpose(0, 1), mask, scale)  # (n_q, heads, d_v)
            if out is None:
                out = q.new_empty(q.shape[0], o.shape[1], o.shape[2])
            out.index_copy_(0, rows, o.to(q.dtype))
        return out


class CrossMemory(Memory):
    def __init__(self, kv: KVCache, n_pos: int, decoder_start: int, device=None):
        self.kv, self.device = kv, device
        self.decoder_start = decoder_start  # the token a decoder sequence starts from (generation)
        self.n_seq_max = kv.n_seq_max
        self.encoder = EncoderMemory(kv.n_seq_max, n_pos, device=device)
        self.enc: dict[int, torch.Tensor] = {}  # sequence -> its encoder output (n_enc, n_embd), position order

    # -- the encoder pass ----------------------------------------------------------------------
    def encoder_split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        ubs = self.encoder.split(balloc, n_ubatch)
        self.encoder.prepare(ubs)
        return ubs

    def encoder_view(self, ub: UBatch) -> EncoderView:
        return self.encoder.apply(ub)

    def store(self, ub: UBatch, h: torch.Tensor) -> None:
        """Keep the encoder output ``h`` (n_tokens, n_embd) of the ubatch's sequences."""
        seqs = sorted({s for ids in ub.seq_ids for s in ids})
        for s in seqs:
            rows = torch.tensor([i for i, ids in enumerate(ub.seq_ids) if s in ids], dtype=torch.long)
            rows = rows[torch.argsort(ub.pos[rows], stable=True)]
            self.enc[s] = h[rows.to(h.device)].clone()

    # -- queries -------------------------------------------------------------------------------
    def seq_pos_min(self, seq_id: int) -> int:
        return self.kv.seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self.kv.seq_pos_max(seq_id)

    # -- sequence operations -------------------------------------------------------------------
    def clear(self) -> None:
        self.kv.clear()
        self.enc.clear()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return self.kv.seq_rm(seq_id, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.kv.seq_cp(src, dst, p0, p1)
        if src != dst and src in self.enc:
            self.enc[dst] = self.enc[src]

    def seq_keep(self, seq_id: int) -> None:
        self.kv.seq_keep(seq_id)
        self.enc = {s: e for s, e in self.enc.items() if s == seq_id}

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.kv.seq_add(seq_id, p0, p1, shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self.kv.seq_div(seq_id, p0, p1, d)

    # -- decoder ubatches ----------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return self.kv.split(balloc, n_ubatch)

    def prepare(self, ubatches: list[UBatch]) -> None:
        for ub in ubatches:
            for s in ub.seq0.unique().tolist():
                if s not in self.enc:
                    raise BatchError(f"sequence {s} has no encoder output: call encode on its input first")
        self.kv.prepare(ubatches)

    def update(self) -> None:
        self.kv.update()

    def apply(self, ub: UBatch) -> DecoderView:
        view = self.kv.apply(ub)
        seq0 = ub.seq0
        groups = [((seq0 == s).nonzero().flatten(), self.enc[s]) for s in seq0.unique(sorted=True).tolist()]
        return DecoderView(view, groups)
