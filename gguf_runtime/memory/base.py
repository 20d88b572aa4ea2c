"""One memory interface for every kind of model state (llama.cpp's llama_memory_i).

A memory owns the per-sequence state a model needs between ``decode`` calls: the attention KV cache
(:mod:`.kv_cache`), the recurrent conv/SSM states of Mamba (:mod:`.recurrent`), and, later, hybrids
that hold both. The context only talks to this interface:

- ``split(balloc, n_ubatch)``: the memory chooses the split its model needs (simple for a KV cache,
  equal for recurrent state) and returns the ubatches;
- ``prepare(ubatches)``: checks that all of them fit before anything is written (no half-applied
  batch on failure: raises MemoryFullError);
- ``update()``: pending internal work before the next ubatch (the KV cache's K-shift);
- ``apply(ubatch)``: reserves room for the ubatch and returns a view the model reads and writes:
  ``view.layer(il)`` is the layer's part of the memory (``attend`` for attention layers, named
  state tensors for recurrent ones);
- sequence operations with llama.cpp's semantics (``p0 < 0`` means 0, ``p1 < 0`` means infinity,
  ``seq_id < 0`` means every sequence).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..batch import BatchAllocator, UBatch


class Memory(ABC):
    n_seq_max: int

    @abstractmethod
    def clear(self) -> None: ...

    @abstractmethod
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...

    @abstractmethod
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...

    @abstractmethod
    def seq_keep(self, seq_id: int) -> None: ...

    @abstractmethod
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None: ...

    @abstractmethod
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None: ...

    @abstractmethod
    def seq_pos_min(self, seq_id: int) -> int: ...

    @abstractmethod
    def seq_pos_max(self, seq_id: int) -> int: ...

    @abstractmethod
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]: ...

    @abstractmethod
    def prepare(self, ubatches: list[UBatch]) -> None: ...

    @abstractmethod
    def apply(self, ubatch: UBatch): ...

    def update(self) -> None:
        """Work the memory owes before the next ubatch (nothing, unless it says otherwise)."""

    @staticmethod
    def _range(p0: int, p1: int) -> tuple[int, float]:
        return (0 if p0 < 0 else p0), (float("inf") if p1 < 0 else p1)
