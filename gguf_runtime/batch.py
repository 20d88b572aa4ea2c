"""Batches and micro-batches, after llama.cpp's llama-batch.

A :class:`Batch` is what a user gives ``Context.decode``: tokens, optional explicit positions, one or
more sequence ids per token, and output flags. :class:`BatchAllocator` validates it against the memory
(positions must continue each sequence; omitted positions are continued from the memory, so the
position-id pitfall of transformers #25420 cannot happen) and cuts it into :class:`UBatch` es:

- ``split_simple``: consecutive tokens, any sequences (attention caches).
- ``split_equal``: the same number of new tokens for each of a set of non-overlapping sequence sets,
  laid out sequence-major (what recurrent memories need).
- ``split_seq``: tokens of a single sequence set per ubatch.
- ``split_whole``: whole sequences packed into ubatches, never cut (non-causal encoders).

Every ubatch keeps ``idx``, the batch index of each of its tokens, so outputs can be returned in the
user's order whatever the split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import BatchError


@dataclass
class Batch:
    """Input of ``Context.decode``. ``pos``/``seq_ids``/``output`` may be omitted: positions then
    continue each sequence in memory, every token belongs to sequence 0, and only the last token is
    an output."""

    tokens: Sequence[int] | torch.Tensor
    pos: Sequence[int] | torch.Tensor | None = None
    seq_ids: Sequence[Sequence[int] | int] | None = None
    output: Sequence[bool] | torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], seq_ids: Sequence[int] | None = None,
                       outputs: str = "last", pos: Sequence[Sequence[int]] | None = None) -> "Batch":
        """One batch of several token lists, one sequence each. ``outputs``: 'last' | 'all' | 'none'."""
        seq_ids = list(range(len(seqs))) if seq_ids is None else list(seq_ids)
        toks, sids, outs, poss = [], [], [], []
        for k, (s, sid) in enumerate(zip(seqs, seq_ids)):
            n = len(s)
            toks += list(s)
            sids += [(sid,)] * n
            outs += [outputs == "all" or (outputs == "last" and j == n - 1) for j in range(n)]
            if pos is not None:
                poss += list(pos[k])
        return cls(toks, poss if pos is not None else None, sids, outs)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class UBatch:
    """A micro-batch: the unit one forward pass computes."""

    idx: torch.Tensor  # (n_tokens,) int64: index of each token in the batch
    tokens: torch.Tensor  # (n_tokens,) int64
    pos: torch.Tensor  # (n_tokens,) int64
    seq_ids: list[tuple[int, ...]]  # per token, all its sequences (seq_ids[i][0] is its primary one)
    output: torch.Tensor  # (n_tokens,) bool
    equal_seqs: bool  # tokens are n_seqs sequence sets x n_seq_tokens tokens, sequence-major
    n_seq_tokens: int
    n_seqs: int
    seq_id_unq: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def seq0(self) -> torch.Tensor:
        """Primary sequence id of each token (llama.cpp masks attention by ``seq_id[i][0]``)."""
        return torch.tensor([s[0] for s in self.seq_ids], dtype=torch.long)


class BatchAllocator:
    """Validates a :class:`Batch` against a memory and splits it into ubatches (llama_batch_allocr)."""

    def __init__(self, batch: Batch, n_vocab: int, n_seq_max: int, memory=None, output_all: bool = False):
        n = len(batch.tokens)
        if n == 0:
            raise BatchError("empty batch: no tokens to decode")
        tokens = torch.as_tensor(batch.tokens, dtype=torch.long).reshape(-1)
        if tokens.numel() != n:
            raise BatchError(f"batch tokens must be a flat list, got shape {tuple(torch.as_tensor(batch.tokens).shape)}")
        bad = ((tokens < 0) | (tokens >= n_vocab)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise BatchError(f"invalid token[{i}] = {int(tokens[i])}: vocabulary has {n_vocab} tokens")

        if batch.seq_ids is None:
            seq_ids = [(0,)] * n
        else:
            if len(batch.seq_ids) != n:
                raise BatchError(f"batch has {n} tokens but {len(batch.seq_ids)} seq_id entries")
            seq_ids = []
            for i, s in enumerate(batch.seq_ids):
                t = (int(s),) if isinstance(s, int) or (isinstance(s, torch.Tensor) and s.ndim == 0) else tuple(int(x) for x in s)
                if not t:
                    raise BatchError(f"token {i} has no sequence id")
                for sid in t:
                    if not 0 <= sid < n_seq_max:
                        raise BatchError(f"invalid seq_id[{i}] = {sid}: must be in [0, {n_seq_max}) (n_seq_max = {n_seq_max})")
                seq_ids.append(t)

        if batch.output is None:
            output = torch.zeros(n, dtype=torch.bool)
            output[-1] = True
        else:
            output = torch.as_tensor(batch.output, dtype=torch.bool).reshape(-1)
            if output.numel() != n:
                raise BatchError(f"batch has {n} tokens but {output.numel()} output flags")
        if output_all:
            output = torch.ones(n, dtype=torch.bool)

        if batch.pos is None or len(batch.pos) == 0:
            nxt: dict[int, int] = {}
            pos_l = []
            for s in seq_ids:
                p = nxt.get(s[0], (memory.seq_pos_max(s[0]) + 1) if memory is not None else 0)
                pos_l.append(p)
                for sid in s:
                    nxt[sid] = p + 1
            pos = torch.tensor(pos_l, dtype=torch.long)
        else:
            pos = torch.as_tensor(batch.pos, dtype=torch.long).reshape(-1)
            if pos.numel() != n:
                raise BatchError(f"batch has {n} tokens but {pos.numel()} positions")
            if (pos < 0).any():
                raise BatchError(f"negative position {int(pos.min())} in batch")

        self.tokens, self.pos, self.seq_ids, self.output = tokens, pos, seq_ids, output
        self.n_tokens = n
        self.seq_set = [sum(1 << sid for sid in s) for s in seq_ids]  # bitmask per token
        self._check_positions(memory)
        # tokens of each distinct sequence set, in batch order
        self._set_map: dict[int, list[int]] = {}
        for i, ss in enumerate(self.seq_set):
            self._set_map.setdefault(ss, []).append(i)
        self.used = [False] * n

    def _check_positions(self, memory) -> None:
        if all(len(s) == 1 for s in self.seq_ids) and self._positions_ok_single(memory):
            return
        per_seq: dict[int, list[int]] = {}
        cur_set: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, (s, ss) in enumerate(zip(self.seq_ids, self.seq_set)):
            p = int(self.pos[i])
            for sid in s:
                per_seq.setdefault(sid, []).append(p)
                cur_set[sid] = cur_set.get(sid, ss) & ss
                if cur_set[sid] == 0:
                    raise BatchError(f"sequence {sid} belongs to incompatible sequence sets in the batch")
                if p < last.get(sid, -1):
                    raise BatchError(f"sequence {sid} positions are decreasing in the batch (at token {i})")
                last[sid] = p
        for sid, ps in per_seq.items():
            lo, hi = min(ps), max(ps)
            if memory is not None:
                p0 = memory.seq_pos_max(sid)
                if p0 >= 0 and lo != p0 + 1:
                    raise BatchError(
                        f"sequence {sid}: memory ends at position {p0} but the batch starts it at {lo}; "
                        f"positions must continue the sequence (expected {p0 + 1})")
            if hi - lo + 1 > len(set(ps)):
                raise BatchError(f"sequence {sid} positions are not continuous in the batch ({lo}..{hi} with gaps)")

    def _positions_ok_single(self, memory) -> bool:
        """Vectorised check for the common case of one sequence per token: within each sequence,
        positions (in batch order) step by 0 or 1 and start right after the memory's last. False
        sends the batch through the general loop, which also words the error."""
        seq = torch.tensor([s[0] for s in self.seq_ids])
        order = torch.argsort(seq, stable=True)
        ss, ps = seq[order], self.pos[order]
        same = ss[1:] == ss[:-1]
        d = (ps[1:] - ps[:-1])[same]
        if not bool(((d == 0) | (d == 1)).all()):
            return False
        if memory is not None:
            first = torch.ones_like(ss, dtype=torch.bool)
            first[1:] = ~same
            for sid, lo in zip(ss[first].tolist(), ps[first].tolist()):
                p0 = memory.seq_pos_max(sid)
                if p0 >= 0 and lo != p0 + 1:
                    return False
        return True

    # -- splitting -----------------------------------------------------------------------------
    @property
    def n_outputs(self) -> int:
        return int(self.output.sum())

    def done(self) -> bool:
        return all(self.used)

    def _make(self, idxs: list[int], n_seqs: int, equal: bool) -> UBatch:
        for i in idxs:
            self.used[i] = True
        it = torch.tensor(idxs, dtype=torch.long)
        sids = [self.seq_ids[i] for i in idxs]
        unq = sorted({sid for s in sids for sid in s})
        return UBatch(it, self.tokens[it], self.pos[it], sids, self.output[it], equal,
                      len(idxs) // n_seqs if equal else len(idxs), n_seqs if equal else len(idxs), unq)

    def split_simple(self, n_ubatch: int) -> Iterator[UBatch]:
        """Consecutive unused tokens, at most ``n_ubatch`` per ubatch."""
        while not self.done():
            start = self.used.index(False)
            idxs = [i for i in range(start, self.n_tokens) if not self.used[i]][:n_ubatch]
            yield self._make(idxs, len(idxs), False)

    def split_equal(self, n_ubatch: int, sequential: bool = False) -> Iterator[UBatch]:
        """Non-overlapping sequence sets, each contributing the same number of new tokens."""
        while not self.done():
            sets: list[int] = []
            last_sid = -1
            for i in range(self.n_tokens):
                if self.used[i]:
                    continue
                ss = self.seq_set[i]
                add = all(ss & c == 0 for c in sets)
                if sequential:
                    add = add and (not sets or self.seq_ids[i][0] == last_sid + 1)
                if add:
                    sets.append(ss)
                    last_sid = self.seq_ids[i][0]
                    if len(sets) > n_ubatch:
                        break
            sets = sets[:max(1, n_ubatch)]
            pending = [[i for i in self._set_map[ss] if not self.used[i]] for ss in sets]
            n_seqs = len(sets)
            n_take = max(1, min(min(len(p) for p in pending), n_ubatch // n_seqs))
            idxs = [i for p in pending for i in p[:n_take]]
            yield self._make(idxs, n_seqs, True)

    def split_seq(self, n_ubatch: int) -> Iterator[UBatch]:
        """One sequence set per ubatch (tokens whose set is a subset of the current one may join)."""
        while not self.done():
            cur = self.used.index(False)
            cur_set = self.seq_set[cur]
            idxs = [cur]
            for i in range(cur + 1, self.n_tokens):
                if len(idxs) >= n_ubatch:
                    break
                if self.used[i] or (cur_set & self.seq_set[i]) != self.seq_set[i]:
                    continue
                idxs.append(i)
                cur_set = self.seq_set[i]
            yield self._make(idxs, 1, True)

    def split_whole(self, n_ubatch: int) -> Iterator[UBatch]:
        """Whole sequences (by primary id, in batch order) packed greedily into ubatches of at most
        ``n_ubatch`` tokens; a sequence is never cut, as non-causal attention needs all its keys."""
        seqs: dict[int, list[int]] = {}
        for i, s in enumerate(self.seq_ids):
            if not self.used[i]:
                seqs.setdefault(s[0], []).append(i)
        cur: list[int] = []
        for sid, rows in seqs.items():
            if len(rows) > n_ubatch:
                raise BatchError(f"sequence {sid} has {len(rows)} tokens but n_ubatch = {n_ubatch}: non-causal "
                                 f"attention needs a whole sequence in one ubatch (increase -ub / n_ubatch)")
            if len(cur) + len(rows) > n_ubatch:
                yield self._make(sorted(cur), len(cur), False)
                cur = []
            cur += rows
        if cur:
            yield self._make(sorted(cur), len(cur), False)
