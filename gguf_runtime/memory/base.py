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
  ``seq_id < 0`` means every sequence);
- state, one pair of methods for whole memories and single sequences alike (``docs/state.md``):
  ``state_tensors(seq_id=None)`` returns the memory's state (every sequence, or one) as named CPU
  tensors plus string metadata; ``state_load(tensors, meta, seq_id=None, dest_seq_id=None)`` checks
  everything (kind, shapes, dtypes, room) and returns the commit that restores it, so nothing changes
  until every part of a composite memory has been checked. ``seq_id=None`` replaces the whole
  memory; otherwise sequence ``seq_id`` of the state replaces sequence ``dest_seq_id`` (default the
  same id) and the other sequences are left alone. A composite memory prefixes its parts' names
  (:func:`state_of_parts`, :func:`load_parts`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..batch import BatchAllocator, UBatch
from ..errors import StateError, UnsupportedError

Tensors = dict[str, torch.Tensor]
Meta = dict[str, str]
Commit = Callable[[], None]


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

    def keep_all(self) -> None:
        """llama.cpp's ``swa_full``: a windowed memory keeps every position (nothing for the others)."""

    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        """The state of every sequence (``None``) or of ``seq_id``: CPU tensors and string metadata."""
        raise UnsupportedError(f"{type(self).__name__} cannot save its state")

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        """Check a state from :meth:`state_tensors` against this memory (StateError naming the
        problem) and return the function that restores it; nothing changes before it is called."""
        raise UnsupportedError(f"{type(self).__name__} cannot restore a state")

    @staticmethod
    def _range(p0: int, p1: int) -> tuple[int, float]:
        return (0 if p0 < 0 else p0), (float("inf") if p1 < 0 else p1)


def state_of_parts(parts: dict[str, Memory], seq_id: int | None) -> tuple[Tensors, Meta]:
    """A composite memory's state: each part's tensors and metadata under ``{part}.``."""
    tensors: Tensors = {}
    meta: Meta = {}
    for name, part in parts.items():
        t, m = part.state_tensors(seq_id)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta.update({f"{name}.{k}": v for k, v in m.items()})
    return tensors, meta


def load_parts(parts: dict[str, Memory], tensors: Tensors, meta: Meta, seq_id: int | None,
               dest_seq_id: int | None) -> Commit:
    """Check every part's state before returning the commit that restores them all."""
    commits = []
    for name, part in parts.items():
        pre = f"{name}."
        t = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        m = {k[len(pre):]: v for k, v in meta.items() if k.startswith(pre)}
        commits.append(part.state_load(t, m, seq_id, dest_seq_id))

    def commit() -> None:
        for c in commits:
            c()
    return commit


def state_kind(meta: Meta, kind: str) -> None:
    """The state was written by a memory of ``kind``."""
    if meta.get("kind") != kind:
        raise StateError(f"the state holds a '{meta.get('kind')}' memory, this context has a '{kind}' memory")


def state_tensor(tensors: Tensors, name: str, dtype: torch.dtype, shape: tuple[int | None, ...]) -> torch.Tensor:
    """``tensors[name]``, checked: its dtype and shape (``None``: any size on that axis)."""
    t = tensors.get(name)
    if t is None:
        raise StateError(f"the state has no tensor '{name}'")
    if t.dtype != dtype:
        raise StateError(f"state tensor '{name}' is {str(t.dtype).removeprefix('torch.')}, "
                         f"this memory holds {str(dtype).removeprefix('torch.')}")
    if t.dim() != len(shape) or any(w is not None and w != d for w, d in zip(shape, t.shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise StateError(f"state tensor '{name}' has shape {tuple(t.shape)}, this memory expects {want}")
    return t


def state_rows(tensors: Tensors, prefix: str, n_seq_max: int, seq_id: int | None,
               dest_seq_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The rows (cells, snapshots) a load restores, from ``{prefix}pos`` (n,), ``{prefix}seq`` (n, k)
    bool and ``seq_ids`` (k,): ``(rows, pos, member, targets)`` where ``member[:, j]`` says which
    selected rows belong to sequence ``targets[j]`` of this memory. The whole state keeps its ids;
    one sequence goes to ``dest_seq_id``."""
    ids = state_tensor(tensors, "seq_ids", torch.long, (None,))
    pos = state_tensor(tensors, f"{prefix}pos", torch.long, (None,))
    seq = state_tensor(tensors, f"{prefix}seq", torch.bool, (pos.shape[0], ids.shape[0]))
    ids_l = ids.tolist()
    if seq_id is None:
        cols, targets = list(range(len(ids_l))), ids_l
    else:
        if seq_id not in ids_l:
            raise StateError(f"the state has no sequence {seq_id} (it holds {ids_l})")
        cols, targets = [ids_l.index(seq_id)], [seq_id if dest_seq_id is None else dest_seq_id]
    member = seq[:, cols]
    if seq_id is None:  # sequences without rows need no room here
        used = member.any(0).nonzero().flatten().tolist()
        member, targets = member[:, used], [targets[j] for j in used]
    rows = member.any(1).nonzero().flatten()
    for t in targets:
        if not 0 <= t < n_seq_max:
            raise StateError(f"the state's sequence {t} does not fit: this context has n_seq_max = {n_seq_max}")
    return rows, pos[rows], member[rows], targets
