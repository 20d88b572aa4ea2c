"""A hybrid memory: an attention KV cache and a recurrent memory side by side (llama.cpp's
llama_memory_hybrid), for models that mix attention layers with Mamba layers (Jamba, Granite 4).

Each part holds only its own layers (``KVCache(layers=...)``, ``RecurrentMemory(layers=...)``); the
hybrid's view routes ``view.layer(il)`` to the part that owns model layer ``il``: a
:class:`~gguf_runtime.memory.kv_cache.LayerKV` (``attend``) for an attention layer, a
:class:`~gguf_runtime.memory.recurrent.LayerState` (named states) for a recurrent one.

- ``split``: the stricter of the two splits, equal (the recurrent part needs every sequence set of a
  ubatch to bring the same number of tokens; the KV cache accepts any ubatch);
- ``prepare``: both parts check every ubatch before either is written (neither part's check writes);
- sequence operations go to both parts. ``seq_rm`` asks the recurrent part first: a removal it
  cannot honour (rewinding a state) returns False and leaves both parts unchanged;
- ``seq_pos_min`` / ``seq_pos_max``: the positions both parts hold (the larger minimum, the smaller
  maximum), as llama.cpp answers them.
"""
from __future__ import annotations

from ..batch import BatchAllocator, UBatch
from .base import Commit, Memory, Meta, Tensors, load_parts, state_of_parts
from .kv_cache import KVCache, KVView, LayerKV
from .recurrent import LayerState, RecurrentMemory, RecurrentView


class HybridView:
    """One ubatch's views of both parts; ``n_seqs``, ``n_seq_tokens`` and ``pos0`` describe the
    equal-split ubatch (as a :class:`RecurrentView` does)."""

    def __init__(self, attn: KVView, recr: RecurrentView, attn_layers: frozenset[int]):
        self.attn, self.recr, self._attn_layers = attn, recr, attn_layers
        self.n_seqs, self.n_seq_tokens, self.pos0 = recr.n_seqs, recr.n_seq_tokens, recr.pos0

    def layer(self, il: int) -> LayerKV | LayerState:
        return self.attn.layer(il) if il in self._attn_layers else self.recr.layer(il)


class HybridMemory(Memory):
    def __init__(self, attn: KVCache, recr: RecurrentMemory):
        overlap = set(attn.layers) & set(recr.layers)
        if overlap:
            raise ValueError(f"hybrid memory: layers {sorted(overlap)} are both attention and recurrent")
        self.attn, self.recr = attn, recr
        self.n_seq_max = recr.n_seq_max
        self._attn_layers = frozenset(attn.layers)

    # -- queries -------------------------------------------------------------------------------
    def seq_pos_min(self, seq_id: int) -> int:
        return max(self.attn.seq_pos_min(seq_id), self.recr.seq_pos_min(seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return min(self.attn.seq_pos_max(seq_id), self.recr.seq_pos_max(seq_id))

    # -- sequence operations -------------------------------------------------------------------
    def clear(self) -> None:
        self.attn.clear()
        self.recr.clear()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if not self.recr.seq_rm(seq_id, p0, p1):  # the part that may refuse goes first, unchanged when it does
            return False
        return self.attn.seq_rm(seq_id, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.recr.seq_cp(src, dst, p0, p1)
        self.attn.seq_cp(src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        self.attn.seq_keep(seq_id)
        self.recr.seq_keep(seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        self.attn.seq_add(seq_id, p0, p1, shift)
        self.recr.seq_add(seq_id, p0, p1, shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        self.attn.seq_div(seq_id, p0, p1, d)
        self.recr.seq_div(seq_id, p0, p1, d)

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_equal(n_ubatch))

    def prepare(self, ubatches: list[UBatch]) -> None:
        self.attn.prepare(ubatches)
        self.recr.prepare(ubatches)

    def update(self) -> None:
        self.attn.update()
        self.recr.update()

    def apply(self, ub: UBatch) -> HybridView:
        recr = self.recr.apply(ub)  # refuses a ubatch that is not an equal split before the KV cache takes cells
        return HybridView(self.attn.apply(ub), recr, self._attn_layers)

    # -- state (docs/state.md): each part's own, under "attn." and "recr." ----------------------
    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        return state_of_parts({"attn": self.attn, "recr": self.recr}, seq_id)

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        return load_parts({"attn": self.attn, "recr": self.recr}, tensors, meta, seq_id, dest_seq_id)
