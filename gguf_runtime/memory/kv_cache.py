"""The attention KV cache (llama.cpp's llama_kv_cache), behind the :class:`Memory` interface.

Cells hold a position and a set of sequences (a bool row per cell); K and V live in one tensor per
layer, ``(n_head_kv, n_cells + 1, head_dim)`` (the extra cell stays zero: attention plans pad with
it). A ubatch takes free cells; ``apply`` returns a :class:`KVView` whose attention plan groups the
ubatch's queries by their primary sequence and lists that sequence's visible cells **in position
order**, so attention never depends on where cells sit.

A model's attention layer sees only ``view.layer(il).attend(q, k, v, scale=..., window=...,
softcap=...)``: storing K/V, planning, gathering and the fixed-order kernel live behind it.
``window`` masks keys ``window`` or more positions behind the query (llama.cpp's standard
``is_masked_swa``).

``seq_add``/``seq_div`` move positions and record a per-cell shift; :meth:`KVCache.update` (run by
the context before each ubatch) re-rotates the cached K of shifted cells with the ``rotate``
function the model gave the cache, as llama.cpp's K-shift does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import numerics
from ..kernels import KV_BLOCK, attention
from ..batch import BatchAllocator, UBatch
from ..errors import MemoryFullError
from .base import Memory


@dataclass
class AttnGroup:
    q_idx: torch.Tensor  # (n_q,) rows of the ubatch attending together
    cells: torch.Tensor  # (n_kv,) cache cells of their sequence, in position order (then the pad cell)
    mask: torch.Tensor  # (n_q, n_kv) bool: visible (causal)
    dist: torch.Tensor  # (n_q, n_kv) query position - key position (windows are masked from it)


@dataclass
class AttnBatch:
    """Equal-shaped groups computed in one attention call, stacked once per ubatch (every layer
    reuses them)."""
    n: int  # groups
    q_idx: torch.Tensor  # (n * n_q,) ubatch rows, group by group
    cells: torch.Tensor  # (n * n_kv,) cache cells, group by group
    mask: torch.Tensor  # (n, n_q, n_kv)
    dist: torch.Tensor  # (n, n_q, n_kv)
    windowed: dict[int, torch.Tensor]  # window -> mask, derived once per ubatch

    def mask_for(self, window: int) -> torch.Tensor:
        if not window:
            return self.mask
        m = self.windowed.get(window)
        if m is None:
            m = self.windowed[window] = self.mask & (self.dist < window)
        return m


class LayerKV:
    """One attention layer's part of the cache during a ubatch."""

    def __init__(self, view: "KVView", il: int):
        self.view, self.il = view, il

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int = 0,
               softcap: float = 0.0) -> torch.Tensor:
        """Store this ubatch's ``k``, ``v`` (n, n_head_kv, d) and return the attention of ``q``
        (n, n_head, d) over each token's visible keys, (n, n_head, d_v)."""
        view, il = self.view, self.il
        view.store(il, k, v)
        n, h = q.shape[0], q.shape[1]
        out = q.new_empty(n, h, v.shape[-1])
        for b in view.batches(q.device):  # groups of equal shape, computed together
            kk, vv = view.kv(il, b)
            qq = q.index_select(0, b.q_idx).view(b.n, -1, h, q.shape[-1]).transpose(1, 2)
            o = attention(qq, kk.to(q.dtype), vv.to(q.dtype), b.mask_for(window), scale, softcap)
            out.index_copy_(0, b.q_idx, o.reshape(-1, h, v.shape[-1]))
        return out


@dataclass
class KVView:
    slots: torch.Tensor  # (n_tokens,) cells the ubatch writes
    groups: list[AttnGroup]
    cache: "KVCache"
    _batches: list[AttnBatch] | None = None

    def layer(self, il: int) -> LayerKV:
        return LayerKV(self, self.cache.index(il))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[:, self.slots.to(kc.device)] = k.transpose(0, 1).to(kc.dtype)
        vc[:, self.slots.to(vc.device)] = v.transpose(0, 1).to(vc.dtype)

    def batches(self, device=None) -> list[AttnBatch]:
        """The groups, bunched by (n_q, n_kv) so equal shapes are computed in one call."""
        if self._batches is None:
            dev = device if device is not None else self.cache.k[0].device
            by: dict[tuple[int, int], list[AttnGroup]] = {}
            for g in self.groups:
                by.setdefault((len(g.q_idx), len(g.cells)), []).append(g)
            self._batches = [AttnBatch(len(gs), torch.cat([g.q_idx for g in gs]).to(dev), torch.cat([g.cells for g in gs]).to(dev),
                                       torch.stack([g.mask for g in gs]).to(dev), torch.stack([g.dist for g in gs]).to(dev), {})
                             for gs in by.values()]
        return self._batches

    def kv(self, layer: int, b: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a batch of groups, (n_groups, n_head_kv, n_kv, d) views, one gather each
        (``index_select``: ~6x faster than advanced indexing); contiguous for a single group."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        k = kc.index_select(1, b.cells).view(kc.shape[0], b.n, -1, kc.shape[2]).transpose(0, 1)
        v = vc.index_select(1, b.cells).view(vc.shape[0], b.n, -1, vc.shape[2]).transpose(0, 1)
        return k, v


Rotate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, k (cells, heads, d), delta) -> k


class KVCache(Memory):
    """``layers``: the model layers this cache holds (default all ``n_layer``; a hybrid's attention
    layers); ``rotate``: the model's RoPE rotation by a position delta, for the K-shift (``None``:
    positions may not be shifted)."""

    def __init__(self, n_layer: int, n_ctx: int, n_seq_max: int, n_head_kv: int | list[int], head_dim_k: int,
                 head_dim_v: int | None = None, dtype=torch.float32, device=None, causal: bool = True,
                 dtype_v=None, layers: list[int] | None = None, rotate: Rotate | None = None):
        self.layers = list(range(n_layer)) if layers is None else list(layers)
        self._index = {il: i for i, il in enumerate(self.layers)}
        n_layer = len(self.layers)
        self.n_layer, self.n_ctx, self.n_seq_max = n_layer, n_ctx, n_seq_max
        self.causal, self.rotate = causal, rotate
        hkv = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layer
        dv = head_dim_v or head_dim_k
        # one row past the cells stays zero: attention plans pad each sequence's key list with it up
        # to a whole key block (masked, so it contributes exact zeros), instead of copying K/V to pad
        # head-major (n_head_kv, cells, d): a gather of one sequence's cells is already in the
        # (head, key, dim) layout attention multiplies with, no transposing copy
        self.k = [torch.zeros(hkv[i], n_ctx + 1, head_dim_k, dtype=dtype, device=device) for i in range(n_layer)]
        self.v = [torch.zeros(hkv[i], n_ctx + 1, dv, dtype=dtype_v or dtype, device=device) for i in range(n_layer)]
        self.pos = torch.full((n_ctx,), -1, dtype=torch.long)
        self.seq = torch.zeros(n_ctx, n_seq_max, dtype=torch.bool)
        self.shift = torch.zeros(n_ctx, dtype=torch.long)
        self.has_shift = False

    def index(self, il: int) -> int:
        """The storage index of model layer ``il``."""
        return self._index[il]

    # -- queries -------------------------------------------------------------------------------
    def seq_pos_min(self, seq_id: int) -> int:
        p = self.pos[self.seq[:, seq_id]]
        return int(p.min()) if p.numel() else -1

    def seq_pos_max(self, seq_id: int) -> int:
        p = self.pos[self.seq[:, seq_id]]
        return int(p.max()) if p.numel() else -1

    @property
    def n_used(self) -> int:
        return int((self.pos >= 0).sum())

    # -- sequence operations -------------------------------------------------------------------
    def clear(self) -> None:
        self.pos.fill_(-1)
        self.seq.zero_()
        self.shift.zero_()
        self.has_shift = False

    def _sel(self, seq_id: int, p0: int, p1: int) -> torch.Tensor:
        lo, hi = self._range(p0, p1)
        inr = (self.pos >= lo) & (self.pos < hi) if hi != float("inf") else (self.pos >= lo)
        return inr & (self.seq.any(1) if seq_id < 0 else self.seq[:, seq_id])

    def _gc(self) -> None:
        empty = ~self.seq.any(1)
        self.pos[empty] = -1
        self.shift[empty] = 0

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        sel = self._sel(seq_id, p0, p1)
        if seq_id < 0:
            self.seq[sel] = False
        else:
            self.seq[sel, seq_id] = False
        self._gc()
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        if src == dst:
            return
        self.seq[self._sel(src, p0, p1), dst] = True

    def seq_keep(self, seq_id: int) -> None:
        keep = self.seq[:, seq_id].clone()
        self.seq[~keep] = False
        self.seq[keep] = False
        self.seq[keep, seq_id] = True
        self._gc()

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        if shift == 0:
            return
        sel = self._sel(seq_id, p0, p1)
        self.pos[sel] += shift
        self.shift[sel] += shift
        gone = sel & (self.pos < 0)  # shifted before 0: removed, as llama.cpp does
        self.seq[gone] = False
        self._gc()
        self.has_shift = bool(self.shift.any())

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        if d == 1:
            return
        sel = self._sel(seq_id, p0, p1)
        old = self.pos[sel]
        new = torch.div(old, d, rounding_mode="floor")
        self.pos[sel] = new
        self.shift[sel] += new - old
        self.has_shift = bool(self.shift.any())

    def update(self) -> None:
        """The K-shift: re-rotate the cached K of shifted cells by their position delta (the
        magnitude scale was applied when each key was stored); clears the record."""
        if not self.has_shift:
            return
        cells = self.shift.nonzero().flatten()
        deltas = self.shift[cells].clone()
        self.shift.zero_()
        self.has_shift = False
        if self.rotate is None:
            raise MemoryFullError("this model's keys cannot be shifted (no RoPE): seq_add/seq_div are not supported")
        c = cells.to(self.k[0].device)
        for i, il in enumerate(self.layers):
            k = self.k[i][:, c].transpose(0, 1)  # (cells, heads, d)
            self.k[i][:, c] = self.rotate(il, k, deltas).transpose(0, 1).to(k.dtype)

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_simple(n_ubatch))

    def prepare(self, ubatches: list[UBatch]) -> None:
        need = sum(u.n_tokens for u in ubatches)
        free = int((self.pos < 0).sum())
        if need > free:
            raise MemoryFullError(
                f"KV cache full: the batch needs {need} cells but only {free} of n_ctx = {self.n_ctx} are free "
                f"(increase -c / n_ctx or remove sequences)")

    def apply(self, ub: UBatch) -> KVView:
        free = (self.pos < 0).nonzero().flatten()
        if free.numel() < ub.n_tokens:
            raise MemoryFullError(f"KV cache full: {ub.n_tokens} cells needed, {free.numel()} free")
        slots = free[: ub.n_tokens]
        self.pos[slots] = ub.pos
        lens = torch.tensor([len(s) for s in ub.seq_ids])
        self.seq[slots.repeat_interleave(lens), torch.tensor([i for s in ub.seq_ids for i in s])] = True
        return KVView(slots, self._plan(ub), self)

    def _plan(self, ub: UBatch) -> list[AttnGroup]:
        invariant = numerics.current().invariant
        seq0 = ub.seq0
        groups = []
        for s in seq0.unique(sorted=True).tolist():
            q_idx = (seq0 == s).nonzero().flatten()
            qpos = ub.pos[q_idx]
            cells = self.seq[:, s].nonzero().flatten()
            cpos = self.pos[cells]
            if self.causal:
                keep = cpos <= qpos.max()
                cells, cpos = cells[keep], cpos[keep]
            order = torch.argsort(cpos, stable=True)
            cells, cpos = cells[order], cpos[order]
            dist = qpos.unsqueeze(1) - cpos.unsqueeze(0)
            mask = (dist >= 0) if self.causal else torch.ones(len(q_idx), len(cells), dtype=torch.bool)
            pad = (-len(cells)) % KV_BLOCK if invariant else 0
            if pad:  # whole key blocks for kernels.attention: the zero pad cell, masked
                cells = torch.cat([cells, cells.new_full((pad,), self.n_ctx)])
                mask = torch.cat([mask, mask.new_zeros(len(q_idx), pad)], 1)
                dist = torch.cat([dist, dist.new_zeros(len(q_idx), pad)], 1)
            groups.append(AttnGroup(q_idx, cells, mask, dist))
        return groups
