"""The iSWA KV memory (llama.cpp's llama_kv_cache_iswa): global layers in a full cache, sliding-window
layers in a cache that keeps only what the window can still see.

Both parts are :class:`~gguf_runtime.memory.kv_cache.KVCache`\\ s holding their own layers
(``layers=``). The sliding part (``window=W``) has ``min(n_ctx, pad256(W * n_seq_max + n_ubatch))``
cells, as llama.cpp sizes its unified SWA cache, and reuses a cell once every sequence in it has moved
``W`` or more positions past it; with ``swa_full`` it has ``n_ctx`` cells and never needs to reuse one
(llama.cpp's ``--swa-full``: what removing or shifting tokens needs). The view routes
``view.layer(il)`` to the part holding layer ``il``.

- ``split``: simple splits of at most the ``n_ubatch`` the sliding part was sized for (the result
  does not depend on the split: every kernel is batch-invariant);
- ``prepare``: both parts check every ubatch before either is written;
- sequence operations go to both parts; ``seq_rm`` asks the sliding part first: a removal after
  which a sequence's next position would need a key the window already dropped returns False and
  leaves both parts unchanged (llama.cpp removes the cells anyway and leaves its server to notice
  from ``seq_pos_min``);
- ``seq_pos_min``: the sliding part's (the oldest position the memory can still attend from, as
  llama.cpp answers it); ``seq_pos_max``: the global part's (it holds every position, so a sequence
  whose window cells were all shifted away still continues where it ends).

Without sliding layers (a Gemma 3 file without ``sliding_window``) the memory is the global part
alone; without global layers, the sliding part alone.
"""
from __future__ import annotations

import torch

from ..batch import BatchAllocator, UBatch
from ..errors import MemoryFullError
from .base import Commit, Memory, Meta, Tensors, load_parts, state_of_parts
from .kv_cache import KVCache, KVView, LayerKV, Rotate

SWA_PAD = 256  # llama.cpp pads the SWA cache to 256 cells


def swa_cells(window: int, n_ctx: int, n_seq_max: int, n_ubatch: int) -> int:
    """llama.cpp's unified SWA cache size: the window of every sequence plus one ubatch, padded."""
    return min(n_ctx, -(-(window * n_seq_max + n_ubatch) // SWA_PAD) * SWA_PAD)


class ISWAView:
    def __init__(self, parts: list[tuple[KVView, frozenset[int]]]):
        self.parts = parts

    def layer(self, il: int) -> LayerKV:
        for view, layers in self.parts:
            if il in layers:
                return view.layer(il)
        raise IndexError(f"layer {il} is in neither part of the iSWA cache")


class KVCacheISWA(Memory):
    """``swa_layers[il]``: whether model layer ``il`` slides; the other arguments as
    :class:`KVCache` takes them."""

    def __init__(self, swa_layers: list[bool], window: int, n_ctx: int, n_seq_max: int, n_ubatch: int,
                 n_head_kv: int, head_dim_k: int, head_dim_v: int | None = None, dtype=torch.float32, dtype_v=None,
                 device=None, rotate: Rotate | None = None, swa_full: bool = False):
        self.n_ctx, self.n_seq_max, self.window = n_ctx, n_seq_max, window
        n_layer = len(swa_layers)
        glob = [il for il in range(n_layer) if not swa_layers[il]]
        self._slid = [il for il in range(n_layer) if swa_layers[il]]
        self._kv = {"n_head_kv": n_head_kv, "head_dim_k": head_dim_k, "head_dim_v": head_dim_v, "dtype": dtype,
                    "dtype_v": dtype_v, "device": device, "rotate": rotate}
        self.base = KVCache(n_layer, n_ctx, n_seq_max, layers=glob, **self._kv) if glob else None
        self._make_swa(n_ctx if swa_full else swa_cells(window, n_ctx, n_seq_max, n_ubatch), n_ubatch)

    def _make_swa(self, n_cells: int, n_ubatch: int) -> None:
        self.swa_full = n_cells == self.n_ctx
        self.n_ubatch = self.n_ctx if self.swa_full else n_ubatch
        n_layer = (self.base.n_layer if self.base else 0) + len(self._slid)
        self.swa = KVCache(n_layer, n_cells, self.n_seq_max, layers=self._slid, window=self.window, **self._kv) \
            if self._slid else None
        self.parts = [p for p in (self.swa, self.base) if p is not None]  # the part that may refuse goes first

    def keep_all(self) -> None:
        """llama.cpp's ``swa_full``: the sliding part gets ``n_ctx`` cells and never drops a position
        (before anything is stored: the context calls it right after making the memory)."""
        if self.swa is not None and not self.swa_full:
            if self.swa.n_used:
                raise MemoryFullError("swa_full must be chosen before anything is decoded")
            self._make_swa(self.n_ctx, self.n_ctx)

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held (both parts)."""
        return sum(t.numel() * t.element_size() for p in self.parts for t in p.k + p.v)

    # -- queries -------------------------------------------------------------------------------
    def seq_pos_min(self, seq_id: int) -> int:
        return self.parts[0].seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self.parts[-1].seq_pos_max(seq_id)

    # -- sequence operations -------------------------------------------------------------------
    def clear(self) -> None:
        for p in self.parts:
            p.clear()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if not self.parts[0].seq_rm(seq_id, p0, p1):  # unchanged when it refuses
            return False
        for p in self.parts[1:]:
            p.seq_rm(seq_id, p0, p1)
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        for p in self.parts:
            p.seq_cp(src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        for p in self.parts:
            p.seq_keep(seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        for p in self.parts:
            p.seq_add(seq_id, p0, p1, shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        for p in self.parts:
            p.seq_div(seq_id, p0, p1, d)

    def update(self) -> None:
        for p in self.parts:
            p.update()

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_simple(min(n_ubatch, self.n_ubatch)))

    def prepare(self, ubatches: list[UBatch]) -> None:
        for p in self.parts:
            p.prepare(ubatches)

    def apply(self, ub: UBatch) -> ISWAView:
        return ISWAView([(p.apply(ub), frozenset(p.layers)) for p in self.parts])

    # -- state -----------------------------------------------------------------------------------
    def _named(self) -> dict[str, Memory]:
        return {name: p for name, p in (("swa", self.swa), ("base", self.base)) if p is not None}

    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        return state_of_parts(self._named(), seq_id)

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        return load_parts(self._named(), tensors, meta, seq_id, dest_seq_id)
