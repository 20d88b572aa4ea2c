"""Evaluation that outgrows one process: data-parallel rounds over torch.distributed, resumable.

``perplexity`` chunks, choice tasks and embedding texts are independent work items, and every kernel
is batch-invariant, so an item's result does not depend on which process computes it or which
items share its batch. :class:`Runner` deals items out in **rounds**: each round takes the next
``world * group`` unfinished items, rank ``r`` computes ``group`` of them, the results are gathered
to rank 0, which emits them in item order (the ``[i]`` lines stream round by round) and records
them in the resume log. Rank 0 alone prints and writes; the printed lines are byte-identical for
any number of processes, and to a run without torchrun.

Launch: ``torchrun --nproc-per-node N gguf-runtime perplexity ...`` (multi-node: torchrun's
``--nnodes/--node-rank/--rdzv-*`` flags); :meth:`Dist.from_env` reads torchrun's ``RANK`` /
``WORLD_SIZE`` and picks gloo on CPU, NCCL on CUDA. Without torchrun there is one rank and no
process group.

Resume (``--resume FILE``): a JSON log rewritten atomically after every round: a header naming what
the run computes (model file, input, settings) and each finished item's result. A restarted run
with the same FILE emits the recorded items without recomputing them and computes only the rest; a
FILE made for another model, input or settings is a one-line error. A rank that dies makes the
others fail at the next round's barrier with a one-line error naming it (bounded by ``timeout``).
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..atomic import atomic_write
from ..errors import GGUFRuntimeError

FORMAT = 1
Result = object  # a JSON-serialisable value per item (floats round-trip exactly through repr)


class DistError(GGUFRuntimeError):
    """A peer process failed, or a resume file does not belong to this run."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    group: object = None  # the torch.distributed default group once initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = 600.0) -> "Dist":
        """One rank, or torchrun's ranks with a gloo (CPU) or NCCL (CUDA) process group."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("GGUF_RUNTIME_DIST_BACKEND") != "gloo" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            # tear the group down before the interpreter does: gloo's threads alive at exit abort it
            atexit.register(_destroy)
        return cls(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (rank order), None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, timeout_s: float) -> None:
        """Wait for every rank; a rank that died or hangs is named in a one-line error."""
        if self.world == 1:
            return
        import torch.distributed as dist

        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
            else:
                dist.barrier()
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistError(f"rank {self.rank}: a peer process failed ({first[:200]})") from None

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:  # nobody leaves while a peer is still inside a collective (bounded: a peer may have failed)
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            else:
                dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()


def run_key(**parts) -> str:
    """A digest naming what a run computes (files by size, mtime and name; settings by value)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path) -> dict:
    st = os.stat(path)
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ResumeLog:
    """Finished items of one run (see the module docstring), rewritten atomically."""

    def __init__(self, path, key: str):
        self.path, self.key = Path(path), key
        self.done: dict[int, Result] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                ok = isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("items"), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise DistError(f"{self.path}: not a gguf-runtime resume file (or a corrupt one)")
            if data.get("key") != key:
                raise DistError(f"{self.path}: this resume file was made for another model, input or settings")
            self.done = {int(k): v for k, v in data["items"].items()}

    def record(self, results: dict[int, Result]) -> None:
        self.done.update(results)
        body = json.dumps({"format": FORMAT, "key": self.key, "items": {str(k): v for k, v in sorted(self.done.items())}})
        atomic_write(self.path, [body.encode()])


class Runner:
    """Rounds of ``group`` items per rank (see the module docstring)."""

    def __init__(self, dist: Dist, resume: ResumeLog | None = None, timeout_s: float = 600.0):
        self.dist, self.resume, self.timeout_s = dist, resume, timeout_s

    def iterate(self, n_items: int, group: int,
                compute: Callable[[Sequence[int]], list[Result]]) -> Iterator[tuple[int, Result]]:
        """Compute items ``0 .. n_items-1`` (``compute(ids)`` returns or yields their results, in
        order) and yield ``(i, result)`` on rank 0 for every item in order, recorded ones first, each
        as soon as every item before it is in; other ranks yield nothing."""
        d = self.dist
        done = d.broadcast(dict(self.resume.done) if (self.resume is not None and d.is_main) else {})
        done = {i: r for i, r in done.items() if i < n_items}
        results: dict[int, Result] = dict(done) if d.is_main else {}
        nxt = 0  # next item to yield (rank 0)
        while d.is_main and nxt in results:
            yield nxt, results.pop(nxt)
            nxt += 1
        todo = [i for i in range(n_items) if i not in done]
        if d.world == 1:  # one process: each item as ``compute`` yields it (streaming; Ctrl-C keeps what is done)
            for r0 in range(0, len(todo), group):
                ids = todo[r0:r0 + group]
                for i, v in zip(ids, compute(ids)):
                    if self.resume is not None:
                        self.resume.record({i: v})
                    yield i, v
            return
        per_round = group * d.world
        for r0 in range(0, len(todo), per_round):
            chunk = todo[r0:r0 + per_round]
            mine = chunk[d.rank * group:(d.rank + 1) * group]
            out = list(compute(mine)) if mine else []
            d.barrier(self.timeout_s)
            gathered = d.gather((mine, out))
            if d.is_main:
                new = {i: v for ids, vals in gathered for i, v in zip(ids, vals)}
                if self.resume is not None:
                    self.resume.record(new)
                results.update(new)
                while nxt in results:
                    yield nxt, results.pop(nxt)
                    nxt += 1

    def run(self, n_items: int, group: int, compute: Callable[[Sequence[int]], list[Result]],
            emit: Callable[[int, Result], None]) -> None:
        """:meth:`iterate`, calling ``emit(i, result)`` for each item on rank 0."""
        for i, r in self.iterate(n_items, group, compute):
            emit(i, r)
