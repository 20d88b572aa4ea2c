"""A non-caching memory for non-causal encoders (BERT), llama.cpp's ``build_attn_inp_no_cache``.

An encoder keeps nothing between ``decode`` calls: every token attends to all tokens of its own
sequence in the same ubatch, so a sequence must never be cut. ``split`` packs whole sequences
(grouped by primary sequence id, in batch order) into ubatches of at most ``n_ubatch`` tokens and
names the sequence that cannot fit. ``apply`` returns an :class:`EncoderView` that lays the ubatch
out for batched attention: sequences are bucketed by their length rounded up to ``BLOCK``, so the
shapes a token's attention is computed with depend only on its own sequence's length, never on
which other sequences share the ubatch. ``view.layer(il).attend(q, k, v, scale=...)`` runs the same
fixed-order kernel as the KV cache's (one invariance argument for every model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import BatchAllocator, UBatch
from ..errors import BatchError
from ..kernels import KV_BLOCK, attention
from ..kernels.attention import attention_in_place
from ..kernels.linear import pad_dim
from .base import Commit, Memory, Meta, Tensors, state_kind

BLOCK = 32  # sequences are padded to a multiple of this many tokens inside attention
ROWS = 32  # the ubatch is padded to a multiple of this many rows, so kernels.linear never pads (its tile divides 32)


@dataclass
class Bucket:
    idx: torch.Tensor  # (n_seq, L) ubatch rows of each sequence in position order (padding repeats a row)
    valid: torch.Tensor  # (n_seq, L) bool: real token, not padding
    mask: torch.Tensor  # (n_seq, L, L) bool: the keys each query sees (every real token of its sequence)
    # the keys laid out in whole KV_BLOCK blocks, as kernels.attention computes them: (n_seq * Lk,)
    # rows (padding repeats a row), the padding's places in that layout (zeroed after the gather)
    # and the mask padded with False to (n_seq, L, Lk)
    key_idx: torch.Tensor | None = None
    key_pad: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    key_cells: torch.Tensor | None = None  # key_idx with the padding as -1 (a zero row: the native kernel's)

    def __post_init__(self):
        S, L = self.idx.shape
        Lk = -(-L // KV_BLOCK) * KV_BLOCK
        pad = torch.zeros(S, Lk, dtype=torch.bool, device=self.idx.device)
        pad[:, L:] = True
        self.key_idx = pad_dim(self.idx, Lk, 1).flatten()
        self.key_pad = pad.flatten().nonzero().flatten()
        self.key_cells = self.key_idx.masked_fill(pad.flatten(), -1)  # the padding as zero rows (-1)
        self.key_mask = pad_dim(self.mask, Lk, 2)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values of every sequence, (n_seq, heads, Lk, d), padded with zeros (as the kernel
        would pad them), gathered head-major in one copy: (heads, n_seq, Lk, d) seen transposed."""
        S, Lk = self.key_mask.shape[0], self.key_mask.shape[2]
        g = t.transpose(0, 1).index_select(1, self.key_idx)  # (heads, S * Lk, d)
        if self.key_pad.numel():
            g.index_fill_(1, self.key_pad, 0)
        return g.view(t.shape[1], S, Lk, t.shape[2]).transpose(0, 1)


@dataclass
class EncoderView:
    buckets: list[Bucket]
    inv: torch.Tensor  # (n_rows,) row of each ubatch token in the buckets' concatenated (n_seq * L) layout
    n_rows: int  # n_tokens rounded up to ROWS: the model computes this many rows (the tail is padding)

    def layer(self, il: int) -> "EncoderView":
        return self  # nothing is kept per layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int = 0,
               softcap: float = 0.0) -> torch.Tensor:
        """Non-causal attention of every row over its own sequence: q, k, v (n_rows, heads, d) ->
        (n_rows, heads, d_v)."""
        if window:
            raise BatchError("sliding-window attention needs a KV cache, not an encoder memory")
        outs = []
        for b in self.buckets:
            S, L = b.idx.shape
            o = q.new_empty(S * L, q.shape[1], v.shape[-1])
            if attention_in_place(q, b.idx.flatten(), k.transpose(0, 1), v.transpose(0, 1), b.key_cells, b.key_mask,
                                    scale, softcap, o, out_seq=True):  # the native kernel reads k, v in place
                outs.append(o)
                continue
            qq = q.index_select(0, b.idx.flatten()).view(S, L, *q.shape[1:]).transpose(1, 2)  # (S, heads, L, d)
            o = attention(qq, b.gather(k), b.gather(v), b.key_mask, scale, softcap)  # (S, L, heads, d_v)
            outs.append(o.reshape(-1, o.shape[-2], o.shape[-1]))
        return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, self.inv)


class EncoderMemory(Memory):
    def __init__(self, n_seq_max: int, n_pos: int, device=None):
        self.n_seq_max, self.n_pos, self.device = n_seq_max, n_pos, device

    # -- stateless sequence operations ---------------------------------------------------------
    def clear(self) -> None:
        pass

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        pass

    def seq_keep(self, seq_id: int) -> None:
        pass

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        pass

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        pass

    def seq_pos_min(self, seq_id: int) -> int:
        return -1

    def seq_pos_max(self, seq_id: int) -> int:
        return -1

    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        return {}, {"kind": "encoder"}  # nothing is kept between decode calls

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        state_kind(meta, "encoder")
        return lambda: None

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_whole(n_ubatch))

    def prepare(self, ubatches: list[UBatch]) -> None:
        for ub in ubatches:
            hi = int(ub.pos.max())
            if hi >= self.n_pos:
                raise BatchError(f"position {hi} is beyond the model's {self.n_pos} position embeddings "
                                 f"(a sequence may have at most {self.n_pos} tokens)")

    def apply(self, ub: UBatch) -> EncoderView:
        seq0, pos, n = ub.seq0, ub.pos, ub.n_tokens
        order = torch.argsort(seq0 * (int(pos.max()) + 1) + pos, stable=True)  # by sequence, then position
        sids, counts = torch.unique_consecutive(seq0[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        padded = (counts + BLOCK - 1) // BLOCK * BLOCK
        n_rows = -(-n // ROWS) * ROWS
        buckets, inv, base = [], torch.zeros(n_rows, dtype=torch.long), 0
        for L in padded.unique().tolist():
            sel = (padded == L).nonzero().flatten()
            j = torch.arange(L)
            valid = j.unsqueeze(0) < counts[sel].unsqueeze(1)
            src = starts[sel].unsqueeze(1) + torch.where(valid, j, 0)
            idx = order[src]
            inv[idx[valid]] = base + valid.flatten().nonzero().flatten()
            mask = valid.unsqueeze(1).expand(-1, L, -1).contiguous()
            buckets.append(Bucket(idx.to(self.device), valid.to(self.device), mask.to(self.device)))
            base += idx.numel()
        return EncoderView(buckets, inv.to(self.device), n_rows)
