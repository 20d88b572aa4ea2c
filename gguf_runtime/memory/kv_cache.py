"""The attention KV cache (llama.cpp's llama_kv_cache), behind the :class:`Memory` interface.

Cells hold a position and a set of sequences (a bool row per cell); K and V live in one tensor per
layer, ``(n_head_kv, n_cells + 1, head_dim)`` (the extra cell stays zero: attention plans pad with it). A ubatch takes free cells; ``apply`` returns a
:class:`KVView` whose attention plan groups the ubatch's queries by their primary sequence and lists
that sequence's visible cells **in position order**, so attention never depends on where cells sit.

``seq_add``/``seq_div`` move positions and record a per-cell shift; the context asks the model to
re-rotate cached K (``Model.shift_k``) before the next ubatch, as llama.cpp's K-shift does.
Sliding-window layers (``n_swa``) mask keys older than the window, per layer type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..batch import BatchAllocator, UBatch
from ..errors import MemoryFullError
from .base import Memory


@dataclass
class AttnGroup:
    q_idx: torch.Tensor  # (n_q,) rows of the ubatch attending together
    cells: torch.Tensor  # (n_kv,) cache cells of their sequence, in position order (then the pad cell)
    mask: torch.Tensor  # (n_q, n_kv) bool: visible (causal)
    mask_swa: torch.Tensor | None  # (n_q, n_kv) bool for sliding-window layers


@dataclass
class AttnBatch:
    """Equal-shaped groups computed in one attention call, stacked once per ubatch (every layer
    reuses them)."""
    n: int  # groups
    q_idx: torch.Tensor  # (n * n_q,) ubatch rows, group by group
    cells: torch.Tensor  # (n * n_kv,) cache cells, group by group
    mask: torch.Tensor  # (n, n_q, n_kv)
    mask_swa: torch.Tensor | None


@dataclass
class KVView:
    slots: torch.Tensor  # (n_tokens,) cells the ubatch writes
    groups: list[AttnGroup]
    cache: "KVCache"
    _batches: list[AttnBatch] | None = None

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
                                       torch.stack([g.mask for g in gs]).to(dev),
                                       None if gs[0].mask_swa is None else torch.stack([g.mask_swa for g in gs]).to(dev))
                             for gs in by.values()]
        return self._batches

    def kv(self, layer: int, b: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a batch of groups, (n_groups, n_head_kv, n_kv, d) views, one gather each
        (``index_select``: ~6x faster than advanced indexing); contiguous for a single group."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        k = kc.index_select(1, b.cells).view(kc.shape[0], b.n, -1, kc.shape[2]).transpose(0, 1)
        v = vc.index_select(1, b.cells).view(vc.shape[0], b.n, -1, vc.shape[2]).transpose(0, 1)
        return k, v


class KVCache(Memory):
    def __init__(self, n_layer: int, n_ctx: int, n_seq_max: int, n_head_kv: int | list[int], head_dim_k: int,
                 head_dim_v: int | None = None, dtype=torch.float32, device=None, causal: bool = True,
                 n_swa: int = 0, swa_layers: list[bool] | None = None, dtype_v=None):
        self.n_layer, self.n_ctx, self.n_seq_max = n_layer, n_ctx, n_seq_max
        self.causal, self.n_swa = causal, n_swa
        self.swa_layers = swa_layers or [False] * n_layer
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

    def take_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells with a pending shift and their deltas; clears the record."""
        cells = self.shift.nonzero().flatten()
        deltas = self.shift[cells].clone()
        self.shift.zero_()
        self.has_shift = False
        return cells, deltas

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
            mask = (cpos.unsqueeze(0) <= qpos.unsqueeze(1)) if self.causal else torch.ones(len(q_idx), len(cells), dtype=torch.bool)
            mask_swa = None
            if self.n_swa > 0 and any(self.swa_layers):
                mask_swa = mask & (qpos.unsqueeze(1) - cpos.unsqueeze(0) < self.n_swa)
            pad = (-len(cells)) % ops.KV_BLOCK if ops.is_invariant() else 0
            if pad:  # whole key blocks for ops.attention: the zero pad cell, masked
                cells = torch.cat([cells, cells.new_full((pad,), self.n_ctx)])
                mask = torch.cat([mask, mask.new_zeros(len(q_idx), pad)], 1)
                if mask_swa is not None:
                    mask_swa = torch.cat([mask_swa, mask_swa.new_zeros(len(q_idx), pad)], 1)
            groups.append(AttnGroup(q_idx, cells, mask, mask_swa))
        return groups
