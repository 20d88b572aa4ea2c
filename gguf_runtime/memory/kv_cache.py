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

A cache made with ``window=W`` holds a sliding-window layer group (llama.cpp's SWA cache inside
iSWA, :mod:`.kv_iswa`): a cell is reused once every sequence it belongs to has moved ``W`` or more
positions past it (``is_masked_swa`` for the sequence's next position), the older positions of those
sequences being dropped with it, as llama.cpp purges them. What each sequence lost is remembered
(``lost``: the range of dropped positions), so a ``seq_rm`` after which some query's window would
need a dropped key returns False and changes nothing, and a ubatch whose window would need one is
refused before anything is written. Its attention plan is aligned to **absolute positions**: key
blocks hold positions ``64 b .. 64 b + 63`` (absent positions are the zero pad cell, masked) and
start at the first block the ubatch's window can see; the kernel then adds the blocks left to right
(``fold``), so a result does not depend on which or how many blocks before the window were dropped
or skipped — the same bits with the window cache, with ``swa_full`` and in any ubatch split.

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
from ..kernels.attention import attention_in_place
from ..batch import BatchAllocator, UBatch
from ..errors import MemoryFullError, StateError
from .base import Commit, Memory, Meta, Tensors, state_kind, state_rows, state_tensor


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
        if view.cache.window and window != view.cache.window:
            raise ValueError(f"layer {il} attends with window {window} in a cache made for window {view.cache.window}")
        view.store(il, k, v)
        n, h = q.shape[0], q.shape[1]
        out = q.new_empty(n, h, v.shape[-1])
        kc, vc = view.cache.k[il], view.cache.v[il]
        for b in view.batches(q.device):  # groups of equal shape, computed together
            if attention_in_place(q, b.q_idx, kc, vc, b.cells, b.mask_for(window), scale, softcap, out):
                continue  # (the native kernel reads the cache in place)
            kk, vv = view.kv(il, b)
            qq = q.index_select(0, b.q_idx).view(b.n, -1, h, q.shape[-1]).transpose(1, 2)
            o = attention(qq, kk.to(q.dtype), vv.to(q.dtype), b.mask_for(window), scale, softcap, view.fold)
            out.index_copy_(0, b.q_idx, o.reshape(-1, h, v.shape[-1]))
        return out


@dataclass
class KVView:
    slots: torch.Tensor  # (n_tokens,) cells the ubatch writes
    groups: list[AttnGroup]
    cache: "KVCache"
    fold: bool = False  # key blocks are position-aligned: the kernel adds them left to right
    _batches: list[AttnBatch] | None = None

    def layer(self, il: int) -> LayerKV:
        return LayerKV(self, self.cache.index(il))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.slots.device != kc.device:
            self.slots = self.slots.to(kc.device)
        kc.index_copy_(1, self.slots, (k if k.dtype == kc.dtype else k.to(kc.dtype)).transpose(0, 1))
        vc.index_copy_(1, self.slots, (v if v.dtype == vc.dtype else v.to(vc.dtype)).transpose(0, 1))

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
                 dtype_v=None, layers: list[int] | None = None, rotate: Rotate | None = None, window: int = 0):
        self.layers = list(range(n_layer)) if layers is None else list(layers)
        self._index = {il: i for i, il in enumerate(self.layers)}
        n_layer = len(self.layers)
        self.n_layer, self.n_ctx, self.n_seq_max = n_layer, n_ctx, n_seq_max
        self.causal, self.rotate = causal, rotate
        self.window = window  # > 0: a sliding-window cache (cells reused past the window, position-aligned plan)
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
        self.lost = torch.full((n_seq_max, 2), -1, dtype=torch.long)  # window cache: [lo, hi] of dropped positions

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
        self.lost.fill_(-1)

    def _sel(self, seq_id: int, p0: int, p1: int) -> torch.Tensor:
        lo, hi = self._range(p0, p1)
        inr = (self.pos >= lo) & (self.pos < hi) if hi != float("inf") else (self.pos >= lo)
        return inr & (self.seq.any(1) if seq_id < 0 else self.seq[:, seq_id])

    def _gc(self) -> None:
        empty = ~self.seq.any(1)
        self.pos[empty] = -1
        self.shift[empty] = 0

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)``; a window cache returns False (and changes nothing) when the
        next position of a sequence would then see a position the window already dropped."""
        sel = self._sel(seq_id, p0, p1)
        if self.window:
            lost = self._lost_after_rm(seq_id, p0, p1, sel)
            if lost is None:
                return False
            self.lost.copy_(lost)
        if seq_id < 0:
            self.seq[sel] = False
        else:
            self.seq[sel, seq_id] = False
        self._gc()
        return True

    def _lost_after_rm(self, seq_id: int, p0: int, p1: int, sel: torch.Tensor) -> torch.Tensor | None:
        """The ``lost`` table after removing ``[p0, p1)``, or None when a sequence's next query would
        need a dropped position: some dropped ``l`` with ``(P + 1) - l < window``, where ``P`` is the
        last position the sequence keeps (held or dropped)."""
        lo_r, hi_r = self._range(p0, p1)
        lost = self.lost.clone()
        for s in (range(self.n_seq_max) if seq_id < 0 else [seq_id]):
            lo, hi = int(lost[s, 0]), int(lost[s, 1])
            if hi < 0:
                continue
            if lo_r <= lo and hi < hi_r:  # every dropped position removed
                lost[s] = -1
                continue
            if lo < lo_r <= hi < hi_r:  # the top of the dropped range removed
                hi = lo_r - 1
            elif lo_r <= lo < hi_r <= hi:  # its bottom removed
                lo = int(hi_r)
            lost[s, 0], lost[s, 1] = lo, hi
            held = self.pos[self.seq[:, s] & ~sel]
            last = max(hi, int(held.max()) if held.numel() else -1)
            if last + 1 - hi < self.window:
                return None
        return lost

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        if src == dst:
            return
        self.seq[self._sel(src, p0, p1), dst] = True
        if self.window and int(self.lost[src, 1]) >= 0:  # dst now misses what src missed (a hull, conservative)
            a, b = self.lost[src], self.lost[dst]
            self.lost[dst] = a if int(b[1]) < 0 else torch.stack([torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])])

    def seq_keep(self, seq_id: int) -> None:
        keep = self.seq[:, seq_id].clone()
        self.seq[~keep] = False
        self.seq[keep] = False
        self.seq[keep, seq_id] = True
        self._gc()
        kept = self.lost[seq_id].clone()
        self.lost.fill_(-1)
        self.lost[seq_id] = kept

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        if shift == 0:
            return
        sel = self._sel(seq_id, p0, p1)
        self._move_lost(seq_id, p0, p1, lambda p: max(p + shift, -1))
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
        self._move_lost(seq_id, p0, p1, lambda p: p // d)
        old = self.pos[sel]
        new = torch.div(old, d, rounding_mode="floor")
        self.pos[sel] = new
        self.shift[sel] += new - old
        self.has_shift = bool(self.shift.any())

    def _move_lost(self, seq_id: int, p0: int, p1: int, move) -> None:
        """Move the part of each dropped range that lies in ``[p0, p1)`` as the positions move (a
        part moved below 0 is gone); the new range is the hull of what remains (conservative)."""
        if not self.window:
            return
        lo_r, hi_r = self._range(p0, p1)
        for s in (range(self.n_seq_max) if seq_id < 0 else [seq_id]):
            lo, hi = int(self.lost[s, 0]), int(self.lost[s, 1])
            if hi < 0:
                continue
            parts = [(lo, min(hi, lo_r - 1)), (max(lo, int(hi_r)) if hi_r != float("inf") else hi + 1, hi)]
            a, b = max(lo, lo_r), min(hi, hi_r - 1)
            if a <= b:
                parts.append((max(move(a), 0), move(b)))
            parts = [(x, y) for x, y in parts if x <= y and y >= 0]
            self.lost[s, 0] = min(x for x, _ in parts) if parts else -1
            self.lost[s, 1] = max(y for _, y in parts) if parts else -1

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

    # -- state (docs/state.md) -----------------------------------------------------------------
    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        """The cells of every sequence (or of ``seq_id``): positions, membership, pending shifts and
        each layer's K/V rows (``k.{i}``: (n_head_kv, n, d)); per sequence, the positions a window
        cache dropped (``seq.lost``)."""
        cols = list(range(self.n_seq_max)) if seq_id is None else [seq_id]
        cells = self.seq[:, cols].any(1).nonzero().flatten()
        c = cells.to(self.k[0].device)
        t = {"seq_ids": torch.tensor(cols), "cell.pos": self.pos[cells], "cell.seq": self.seq[cells][:, cols],
             "cell.shift": self.shift[cells], "seq.lost": self.lost[cols].clone()}
        for i in range(self.n_layer):
            t[f"k.{i}"], t[f"v.{i}"] = self.k[i][:, c].cpu(), self.v[i][:, c].cpu()
        return t, {"kind": "kv", "n_layer": str(self.n_layer), "window": str(self.window)}

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        state_kind(meta, "kv")
        for k, mine in (("n_layer", self.n_layer), ("window", self.window)):
            if meta.get(k) != str(mine):
                raise StateError(f"the state's KV cache has {k} {meta.get(k)}, this one {mine}")
        rows, pos, member, targets = state_rows(tensors, "cell.", self.n_seq_max, seq_id, dest_seq_id)
        n = tensors["cell.pos"].shape[0]  # the state's cells (checked by state_rows)
        ids = tensors["seq_ids"].tolist()
        lost = state_tensor(tensors, "seq.lost", torch.long, (len(ids), 2))
        pairs = [(d, ids.index(s)) for s, d in ([(s, s) for s in ids] if seq_id is None else [(seq_id, targets[0])])
                 if d < self.n_seq_max]  # (this cache's sequence, the state's row) for the dropped ranges
        lost_to, lost = [d for d, _ in pairs], lost[[j for _, j in pairs]]
        shift = state_tensor(tensors, "cell.shift", torch.long, (n,))[rows]
        kv = [(state_tensor(tensors, f"k.{i}", k.dtype, (k.shape[0], n, k.shape[2])),
               state_tensor(tensors, f"v.{i}", v.dtype, (v.shape[0], n, v.shape[2])))
              for i, (k, v) in enumerate(zip(self.k, self.v))]
        gone = list(range(self.n_seq_max)) if seq_id is None else targets  # replaced sequences
        after = self.seq.clone()
        after[:, gone] = False
        free = int((~after.any(1)).sum())
        if len(rows) > free:
            raise StateError(f"the state needs {len(rows)} KV cells but only {free} of n_ctx = {self.n_ctx} "
                             f"would be free (increase -c / n_ctx)")

        def commit() -> None:
            self.seq[:, gone] = False
            self._gc()
            self.lost[gone] = -1
            self.lost[lost_to] = lost
            slots = (self.pos < 0).nonzero().flatten()[: len(rows)]
            self.pos[slots], self.shift[slots] = pos, shift
            self.seq[slots.unsqueeze(1), torch.tensor(targets, dtype=torch.long).unsqueeze(0)] = member
            dev = slots.to(self.k[0].device)
            for (kc, vc), (k, v) in zip(zip(self.k, self.v), kv):
                kc[:, dev] = k[:, rows].to(kc.device)
                vc[:, dev] = v[:, rows].to(vc.device)
            self.has_shift = bool(self.shift.any())
        return commit

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_simple(n_ubatch))

    def prepare(self, ubatches: list[UBatch]) -> None:
        if self.window:  # cells free up as the sequences move: play the ubatches on copies
            pos, seq, lost = self.pos.clone(), self.seq.clone(), self.lost.clone()
            for u in ubatches:
                self._check_window(u, lost)
                self._take(u, pos, seq, lost)
            return
        need = sum(u.n_tokens for u in ubatches)
        free = int((self.pos < 0).sum())
        if need > free:
            raise MemoryFullError(
                f"KV cache full: the batch needs {need} cells but only {free} of n_ctx = {self.n_ctx} are free "
                f"(increase -c / n_ctx or remove sequences)")

    def apply(self, ub: UBatch) -> KVView:
        if self.window:
            self._check_window(ub, self.lost)
            slots = self._take(ub, self.pos, self.seq, self.lost)
            return KVView(slots, self._plan_window(ub), self, fold=numerics.current().invariant)
        free = (self.pos < 0).nonzero().flatten()
        if free.numel() < ub.n_tokens:
            raise MemoryFullError(f"KV cache full: {ub.n_tokens} cells needed, {free.numel()} free")
        slots = free[: ub.n_tokens]
        self.pos[slots] = ub.pos
        lens = torch.tensor([len(s) for s in ub.seq_ids])
        self.seq[slots.repeat_interleave(lens), torch.tensor([i for s in ub.seq_ids for i in s])] = True
        return KVView(slots, self._plan(ub), self)

    # -- the window cache --------------------------------------------------------------------------
    def _take(self, ub: UBatch, pos: torch.Tensor, seq: torch.Tensor, lost: torch.Tensor) -> torch.Tensor:
        """Cells for ``ub`` in (``pos``, ``seq``, ``lost``), updated in place: empty cells first, then
        cells every sequence of which has moved ``window`` past them (oldest first); each sequence
        that loses a cell loses every older position with it (llama.cpp's purge)."""
        n = ub.n_tokens
        seq_max = torch.tensor([int(pos[seq[:, s]].max()) if seq[:, s].any() else -1 for s in range(seq.shape[1])])
        used = pos >= 0
        nxt = torch.where(seq, (seq_max + 1).unsqueeze(0), torch.iinfo(torch.long).max)  # (cells, seqs)
        gone = used & ((nxt - pos.unsqueeze(1)) >= self.window).where(seq, torch.ones_like(seq)).all(1)
        free = (~used).nonzero().flatten()
        if free.numel() < n:
            old = gone.nonzero().flatten()
            old = old[torch.argsort(pos[old], stable=True)][: n - free.numel()]
            if free.numel() + old.numel() < n:
                raise MemoryFullError(
                    f"sliding-window KV cache full: the ubatch needs {n} cells, {free.numel() + old.numel()} of "
                    f"{self.n_ctx} are free or out of every window (raise n_ubatch sizing or use swa_full)")
            for s in seq[old].any(0).nonzero().flatten().tolist():
                top = int(pos[old][seq[old, s]].max())
                purge = seq[:, s] & (pos <= top)
                lo = int(pos[purge].min())
                lo = lo if int(lost[s, 1]) < 0 else min(lo, int(lost[s, 0]))
                lost[s, 0], lost[s, 1] = lo, max(top, int(lost[s, 1]))
                seq[purge, s] = False
            pos[~seq.any(1)] = -1
            free = torch.cat([free, old])
        slots = free[:n]
        pos[slots] = ub.pos
        seq[slots] = False
        lens = torch.tensor([len(s) for s in ub.seq_ids])
        seq[slots.repeat_interleave(lens), torch.tensor([i for s in ub.seq_ids for i in s])] = True
        return slots

    def _check_window(self, ub: UBatch, lost: torch.Tensor) -> None:
        """Refuse a ubatch some query of which would see a position the window cache dropped (after
        ``seq_add`` / ``seq_div`` moved positions back into reach)."""
        for s in ub.seq0.unique().tolist():
            lo, hi = int(lost[s, 0]), int(lost[s, 1])
            if hi < 0:
                continue
            q = ub.pos[ub.seq0 == s]
            if bool(((q >= lo) & (q - hi < self.window)).any()):
                raise MemoryFullError(
                    f"sequence {s}: the sliding-window KV cache dropped positions {lo}..{hi} that this "
                    f"ubatch's window needs (create the context with swa_full to keep them)")

    def _plan_window(self, ub: UBatch) -> list[AttnGroup]:
        """Per sequence, one key slot per position from the first ``KV_BLOCK``-aligned block the
        window can see to the last query (the pad cell where the sequence holds no cell), so key
        block ``b`` always holds positions ``64 b ..``; the mask is causal and windowed."""
        invariant = numerics.current().invariant
        align = KV_BLOCK if invariant else 1
        seq0, groups = ub.seq0, []
        for s in seq0.unique(sorted=True).tolist():
            q_idx = (seq0 == s).nonzero().flatten()
            qpos = ub.pos[q_idx]
            start = max(0, int(qpos.min()) - self.window + 1) // align * align
            end = int(qpos.max()) + 1
            n_kv = -(-(end - start) // align) * align
            cells = self.seq[:, s].nonzero().flatten()
            cpos = self.pos[cells]
            inr = (cpos >= start) & (cpos < end)
            cells, cpos = cells[inr], cpos[inr] - start
            if cpos.unique().numel() != cpos.numel():
                raise MemoryFullError(f"sequence {s} holds two cells at one position: the sliding-window cache "
                                      f"keeps one key per position")
            slot = torch.full((n_kv,), self.n_ctx, dtype=torch.long)
            slot[cpos] = cells
            kpos = torch.arange(start, start + n_kv)
            dist = qpos.unsqueeze(1) - kpos.unsqueeze(0)
            present = torch.zeros(n_kv, dtype=torch.bool)
            present[cpos] = True
            mask = (dist >= 0) & (dist < self.window) & present
            groups.append(AttnGroup(q_idx, slot, mask, dist))
        return groups

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
