"""Recurrent state memory for Mamba-like models (llama.cpp's llama_memory_recurrent).

A recurrent model keeps, per sequence, a fixed-size state instead of one KV row per token. The memory
has ``n_seq_max`` **cells**; a cell holds one state (per layer: a conv state and an SSM state, plus
any named extras), the position of the last token folded into it, and the set of sequences that
share it. Each sequence has a **tail**: the cell holding its state (or -1: none yet, the next token
starts from a zero state). ``seq_cp`` shares the source's cell with the destination; the first
ubatch that extends one of the sharers copies the state into a cell of its own (copy-on-write).

Model-facing API (Mamba and Mamba2 code against this)::

    mem = RecurrentMemory(n_layer, n_seq_max, {"conv": shape, "ssm": shape, ...}, dtype=torch.float32,
                          dtypes={"n": torch.long}, layers=None)
    # shapes are per cell for one layer (a tuple), or a list of per-layer tuples; ``dtypes``
    # overrides the dtype of a named state (integer state stays integer); ``layers``: the model
    # layers this memory holds (default all)

    view = mem.apply(ubatch)      # the Context does this; the ubatch comes from split_equal
    view.n_seqs, view.n_seq_tokens  # ubatch = n_seqs sequence sets x n_seq_tokens tokens, seq-major
    view.pos0                     # (n_seqs,) int64: absolute position of each set's first new token
    st = view.layer(il)           # the layer's named states
    st["conv"]                    # (n_seqs, *shape): the sets' states in ubatch order
    st["conv"] = new              # write back

``st[name]`` returns views of contiguous cell slots ``[start, start + n_seqs)``, so in-place writes
land in the memory too; assignment copies a new tensor in. A set that starts a new
sequence finds a zero state there. A token with several sequence ids (a shared prefix) is computed
once: its set's state is given to every member sequence.

Sequence operations follow llama.cpp: ``seq_rm`` drops a whole state (a range that starts at 0, or
that starts after the state's position, which removes nothing) or rolls a sequence back to a
**snapshot**: ``prepare`` keeps, for each sequence a batch advances, a copy of its state as the last
``decode`` left it (the ``n_snapshots`` most recent per sequence, default ``SNAPSHOTS``; 0 turns
them off), so ``seq_rm(seq, p, -1)`` succeeds when a snapshot holds position ``p - 1``. Any other
removal that would need an earlier state returns False. ``seq_add``/``seq_div`` move positions
only. ``state_tensors`` / ``state_load`` save and restore cells and snapshots (docs/state.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..batch import BatchAllocator, UBatch
from ..errors import BatchError, MemoryFullError, StateError
from .base import Commit, Memory, Meta, Tensors, state_kind, state_rows, state_tensor

Shape = tuple[int, ...]
States = dict[str, list[torch.Tensor]]  # name -> per layer: one cell's state
SNAPSHOTS = 4  # default snapshots kept per sequence


@dataclass(frozen=True)
class Snapshot:
    """A sequence's state as a ``decode`` call left it (shared, never written in place)."""

    pos: int
    states: States


@dataclass
class _Meta:
    """Cell bookkeeping (plain Python: a handful of cells)."""

    pos: list[int]  # per cell: last position folded into its state, -1 when empty
    seqs: list[set[int]]  # per cell: sequences sharing the state
    tail: list[int]  # per sequence: its cell, -1 when it has no state

    def copy(self) -> "_Meta":
        return _Meta(list(self.pos), [set(s) for s in self.seqs], list(self.tail))

    def detach(self, sid: int) -> None:
        c = self.tail[sid]
        if c >= 0:
            self.seqs[c].discard(sid)
            if not self.seqs[c]:
                self.pos[c] = -1
            self.tail[sid] = -1

    def first_empty(self) -> int:
        for c, s in enumerate(self.seqs):
            if not s:
                return c
        raise MemoryFullError("recurrent memory full: no free state cell (increase n_seq_max)")


class LayerState:
    """One layer's named states for the ubatch's sequence sets: ``st[name]`` reads, ``st[name] = t`` writes."""

    def __init__(self, view: "RecurrentView", i: int):
        self.view, self.i = view, i

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.view.mem.states[name][self.i][self.view._sl]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        dst = self[name]
        dst.copy_(value.to(dst.dtype))


class RecurrentView:
    """The ubatch's states: contiguous cell slots in ubatch order (see the module docstring)."""

    def __init__(self, mem: "RecurrentMemory", start: int, ub: UBatch):
        self.mem, self.start = mem, start
        self.n_seqs, self.n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        self.pos0 = ub.pos[:: ub.n_seq_tokens].clone()
        self._sl = slice(start, start + ub.n_seqs)

    def layer(self, il: int) -> LayerState:
        return LayerState(self, self.mem.index(il))


class RecurrentMemory(Memory):
    def __init__(self, n_layer: int, n_seq_max: int, shapes: dict[str, Shape | list[Shape]],
                 dtype: torch.dtype = torch.float32, device=None, dtypes: dict[str, torch.dtype] | None = None,
                 layers: list[int] | None = None, n_snapshots: int = SNAPSHOTS):
        self.layers = list(range(n_layer)) if layers is None else list(layers)
        self._index = {il: i for i, il in enumerate(self.layers)}
        n_layer = len(self.layers)
        self.n_layer, self.n_seq_max = n_layer, max(1, int(n_seq_max))
        self.n_cells = self.n_seq_max  # one cell per sequence slot, as llama.cpp sizes it
        self.states: dict[str, list[torch.Tensor]] = {}
        for name, shp in shapes.items():
            per_layer = shp if isinstance(shp, list) else [tuple(shp)] * n_layer
            dt = (dtypes or {}).get(name, dtype)
            self.states[name] = [torch.zeros(self.n_cells, *s, dtype=dt, device=device) for s in per_layer]
        self.meta = _Meta([-1] * self.n_cells, [set() for _ in range(self.n_cells)], [-1] * self.n_seq_max)
        self.n_snapshots = int(n_snapshots)
        self.snaps: dict[int, list[Snapshot]] = {}  # per sequence, oldest first

    def index(self, il: int) -> int:
        """The storage index of model layer ``il``."""
        return self._index[il]

    # -- queries -------------------------------------------------------------------------------
    def _cell_of(self, seq_id: int) -> int:
        return self.meta.tail[seq_id] if 0 <= seq_id < self.n_seq_max else -1

    def seq_pos_min(self, seq_id: int) -> int:
        c = self._cell_of(seq_id)
        return self.meta.pos[c] if c >= 0 else -1

    def seq_pos_max(self, seq_id: int) -> int:
        return self.seq_pos_min(seq_id)  # a state stands for exactly one position

    @property
    def n_used(self) -> int:
        return sum(1 for s in self.meta.seqs if s)

    # -- sequence operations -------------------------------------------------------------------
    def clear(self) -> None:
        self.meta = _Meta([-1] * self.n_cells, [set() for _ in range(self.n_cells)], [-1] * self.n_seq_max)
        self.snaps = {}

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        lo, hi = self._range(p0, p1)
        if seq_id >= self.n_seq_max:
            return False
        if seq_id < 0:  # every sequence: all or nothing
            if lo == hi:
                return True
            if lo != 0 or hi != float("inf"):
                return False
            self.clear()
            return True
        c = self.meta.tail[seq_id]
        if c < 0:
            return True
        pos = self.meta.pos[c]
        if lo > pos or lo >= hi:  # nothing at or after lo: nothing to remove
            return True
        if hi <= pos:  # would keep a suffix: the state cannot be rewound
            return False
        if lo == 0:
            self.meta.detach(seq_id)
            self.snaps.pop(seq_id, None)
            return True
        snap = next((s for s in self.snaps.get(seq_id, []) if s.pos == lo - 1), None)
        if snap is None:  # would keep a prefix no snapshot holds
            return False
        self.meta.detach(seq_id)
        c = self.meta.first_empty()
        self._write_cell(c, snap.states)
        self.meta.pos[c], self.meta.seqs[c], self.meta.tail[seq_id] = snap.pos, {seq_id}, c
        self.snaps[seq_id] = [s for s in self.snaps[seq_id] if s.pos <= snap.pos]
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        if src == dst:
            return
        for s in (src, dst):
            if not 0 <= s < self.n_seq_max:
                raise BatchError(f"seq_cp: invalid seq_id {s}: must be in [0, {self.n_seq_max})")
        self.meta.detach(dst)
        c = self.meta.tail[src]
        if c >= 0:
            self.meta.seqs[c].add(dst)
            self.meta.tail[dst] = c
        self.snaps[dst] = list(self.snaps.get(src, []))

    def seq_keep(self, seq_id: int) -> None:
        m = self.meta
        for c in range(self.n_cells):
            if seq_id in m.seqs[c]:
                m.seqs[c] = {seq_id}
            else:
                m.seqs[c], m.pos[c] = set(), -1
        m.tail = [c if s == seq_id else -1 for s, c in enumerate(m.tail)]
        self.snaps = {seq_id: self.snaps[seq_id]} if seq_id in self.snaps else {}

    def _move(self, seq_id: int, p0: int, p1: int, fn) -> None:
        lo, hi = self._range(p0, p1)
        c = self._cell_of(seq_id)
        if c >= 0 and lo < hi and lo <= self.meta.pos[c] < hi:
            self.meta.pos[c] = fn(self.meta.pos[c])
        if seq_id in self.snaps:
            self.snaps[seq_id] = [replace(s, pos=fn(s.pos)) if lo <= s.pos < hi else s for s in self.snaps[seq_id]]

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        if shift:
            self._move(seq_id, p0, p1, lambda p: p + shift)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        if d != 1:
            self._move(seq_id, p0, p1, lambda p: p // d)

    # -- ubatches ------------------------------------------------------------------------------
    def split(self, balloc: BatchAllocator, n_ubatch: int) -> list[UBatch]:
        return list(balloc.split_equal(n_ubatch))

    def prepare(self, ubatches: list[UBatch]) -> None:
        """Checks every ubatch finds its slots, then snapshots the sequences the batch advances."""
        m = self.meta.copy()
        for ub in ubatches:
            self._find_slot(m, ub)
        if self.n_snapshots > 0:
            self._snapshot(sorted({sid for ub in ubatches for ids in ub.seq_ids for sid in ids}))

    def _snapshot(self, seqs: list[int]) -> None:
        taken: dict[int, Snapshot] = {}  # sequences sharing a cell share its snapshot
        for sid in seqs:
            c = self._cell_of(sid)
            if c < 0:
                continue
            lst = self.snaps.setdefault(sid, [])
            if lst and lst[-1].pos == self.meta.pos[c]:
                continue
            if c not in taken:
                taken[c] = Snapshot(self.meta.pos[c], {n: [t[c].clone() for t in ts] for n, ts in self.states.items()})
            lst.append(taken[c])
            del lst[: -self.n_snapshots]

    def _write_cell(self, c: int, states: States) -> None:
        with torch.inference_mode():  # the states are inference tensors once a ubatch has gathered them
            for name, ts in self.states.items():
                for t, x in zip(ts, states[name]):
                    t[c].copy_(x)

    def apply(self, ub: UBatch) -> RecurrentView:
        start, src = self._find_slot(self.meta, ub)
        if src != list(range(self.n_cells)):
            self._gather(src)
        return RecurrentView(self, start, ub)

    def _find_slot(self, m: _Meta, ub: UBatch) -> tuple[int, list[int]]:
        """Updates ``m`` so the ubatch's sets own cells ``start .. start+n_seqs-1`` in ubatch order.
        Returns ``start`` and, per cell, where its state comes from (``src[c]``: a cell of the old
        layout, or -1 for a zero state)."""
        if not ub.equal_seqs:
            raise BatchError("recurrent memory needs equal-split ubatches (split_equal)")
        n, T = ub.n_seqs, ub.n_seq_tokens
        if n > self.n_cells:
            raise MemoryFullError(f"recurrent memory full: the ubatch has {n} sequences but n_seq_max = {self.n_cells}")
        sets = [ub.seq_ids[s * T] for s in range(n)]
        src = [c if m.seqs[c] else -1 for c in range(self.n_cells)]
        for ids in sets:  # members other than the first take the set's new state
            for sid in ids[1:]:
                m.detach(sid)
        for ids in sets:  # each set gets a cell of its own (copy on write from a shared one)
            sid = ids[0]
            t = m.tail[sid]
            if t >= 0 and len(m.seqs[t]) == 1:
                continue
            e = m.first_empty()
            src[e] = src[t] if t >= 0 else -1
            m.pos[e] = m.pos[t] if t >= 0 else -1
            if t >= 0:
                m.seqs[t].discard(sid)
            m.seqs[e] = {sid}
            m.tail[sid] = e
        start = min(m.tail[ids[0]] for ids in sets)  # n distinct cells >= start: the block fits
        for s, ids in enumerate(sets):  # gather and reorder into [start, start + n)
            a, b = start + s, m.tail[ids[0]]
            if a == b:
                continue
            m.pos[a], m.pos[b] = m.pos[b], m.pos[a]
            m.seqs[a], m.seqs[b] = m.seqs[b], m.seqs[a]
            src[a], src[b] = src[b], src[a]
            m.tail = [b if c == a else a if c == b else c for c in m.tail]
        for s, ids in enumerate(sets):
            c = start + s
            m.pos[c] = int(ub.pos[s * T + T - 1])
            m.seqs[c] = set(ids)
            for sid in ids:
                m.tail[sid] = c
        return start, src

    def _gather(self, src: list[int]) -> None:
        idx = torch.tensor([max(c, 0) for c in src], dtype=torch.long)
        zero = torch.tensor([c < 0 for c in src])
        for tensors in self.states.values():
            for i, t in enumerate(tensors):
                new = t[idx.to(t.device)]
                new[zero.to(t.device)] = 0
                tensors[i] = new

    # -- state (docs/state.md) -----------------------------------------------------------------
    def state_tensors(self, seq_id: int | None = None) -> tuple[Tensors, Meta]:
        """The cells of every sequence (or of ``seq_id``) and their snapshots: ``cell.pos``,
        ``cell.seq`` (membership), ``cell.{name}.{i}`` (n, *shape), and the same under ``snap.``."""
        cols = list(range(self.n_seq_max)) if seq_id is None else [seq_id]
        cells = [c for c in range(self.n_cells) if self.meta.seqs[c] & set(cols)]
        t = {"seq_ids": torch.tensor(cols, dtype=torch.long)}
        t.update(self._pack("cell.", cols, [(self.meta.pos[c], self.meta.seqs[c],
                                              {n: [x[c] for x in ts] for n, ts in self.states.items()}) for c in cells]))
        t.update(self._pack("snap.", cols, [(sn.pos, {s}, sn.states) for s in cols for sn in self.snaps.get(s, [])]))
        return t, {"kind": "recurrent", "n_layer": str(self.n_layer)}

    def _pack(self, prefix: str, cols: list[int], rows: list[tuple[int, set[int], States]]) -> Tensors:
        t = {f"{prefix}pos": torch.tensor([p for p, _, _ in rows], dtype=torch.long),
             f"{prefix}seq": torch.tensor([[c in seqs for c in cols] for _, seqs, _ in rows], dtype=torch.bool).view(len(rows), len(cols))}
        for name, ts in self.states.items():
            for i, x in enumerate(ts):
                t[f"{prefix}{name}.{i}"] = (torch.stack([st[name][i] for _, _, st in rows]) if rows
                                            else x.new_zeros(0, *x.shape[1:])).cpu()
        return t

    def _unpack(self, tensors: Tensors, prefix: str, seq_id: int | None,
                dest_seq_id: int | None) -> list[tuple[int, set[int], States]]:
        """The checked rows a load restores: (position, target sequences, states on this memory's device)."""
        rows, pos, member, targets = state_rows(tensors, prefix, self.n_seq_max, seq_id, dest_seq_id)
        n = tensors[f"{prefix}pos"].shape[0]
        data = {name: [state_tensor(tensors, f"{prefix}{name}.{i}", x.dtype, (n, *x.shape[1:])).to(x.device)
                       for i, x in enumerate(ts)] for name, ts in self.states.items()}
        return [(int(pos[k]), {targets[j] for j in member[k].nonzero().flatten().tolist()},
                 {name: [x[r] for x in xs] for name, xs in data.items()})  # views of the rows (no gather)
                for k, r in enumerate(rows.tolist())]

    def state_load(self, tensors: Tensors, meta: Meta, seq_id: int | None = None,
                   dest_seq_id: int | None = None) -> Commit:
        state_kind(meta, "recurrent")
        if meta.get("n_layer") != str(self.n_layer):
            raise StateError(f"the state's recurrent memory has {meta.get('n_layer')} layers, this one {self.n_layer}")
        cells = self._unpack(tensors, "cell.", seq_id, dest_seq_id)
        snaps = self._unpack(tensors, "snap.", seq_id, dest_seq_id)
        owners = [s for _, seqs, _ in cells for s in seqs]
        if len(owners) != len(set(owners)):
            raise StateError("the state gives a sequence more than one recurrent cell")
        if len(cells) > self.n_cells:
            raise StateError(f"the state needs {len(cells)} recurrent cells but n_seq_max = {self.n_cells}")
        gone = range(self.n_seq_max) if seq_id is None else [seq_id if dest_seq_id is None else dest_seq_id]

        def commit() -> None:
            for s in gone:
                self.meta.detach(s)
                self.snaps.pop(s, None)
            for p, seqs, st in cells:
                c = self.meta.first_empty()
                self._write_cell(c, st)
                self.meta.pos[c], self.meta.seqs[c] = p, set(seqs)
                for s in seqs:
                    self.meta.tail[s] = c
            for p, seqs, st in snaps:
                for s in seqs:
                    self.snaps.setdefault(s, []).append(Snapshot(p, st))
        return commit
