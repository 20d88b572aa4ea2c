"""HellaSwag, WinoGrande and multiple choice: endings scored by mean log-probability, the
common prefix decoded once and copied to every ending's sequence."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ...batch import Batch
from ...context import Context
from ..distributed import Dist, Runner
from ..perplexity import token_nll
from .data import Emit, HellaSwagTask, MCTask, TaskError, WinograndeTask

Progress = Callable[[int, int], None]


@dataclass
class _Item:
    seqs: list[list[int]]
    cp: int  # tokens common to all sequences
    all_outputs: bool  # logits for every ending token (WinoGrande) or all but the last
    # (row, target): the log-probs its score reads. Rows are numbered in llama.cpp's order: 0 is the
    # common prefix's last token, then each sequence's tokens from the prefix on (all, or all but the last)
    wants: list[tuple[int, int]] = field(default_factory=list)

    @property
    def required(self) -> int:
        return self.cp + sum(len(s) - self.cp for s in self.seqs)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return k
    return n


def make_task_context(model, n_ctx: int = 512, n_batch: int = 2048, n_ubatch: int = 512,
                      n_parallel: int = 4, max_seqs: int = 128) -> Context:
    """llama-perplexity's task context (n_parallel * n_ctx cells), with up to ``max_seqs`` sequences so
    several tasks share a decode (results are the same, packing is only faster)."""
    cells = max(4, n_parallel) * n_ctx
    return Context(model, n_ctx=cells, n_batch=min(n_batch, cells), n_ubatch=n_ubatch, n_seq_max=max_seqs)


_Req = tuple[int, int, int, int]  # (output index in the decode, item in the group, slot in its wants, target)


def _decode_scored(ctx: Context, toks: list[int], pos: list[int], sids: list[int], outs: list[bool],
                   reqs: list[_Req], lps: list[np.ndarray]) -> None:
    """Decodes in pieces of one ubatch; after each, the log-probs ``reqs`` ask of its output rows go
    to ``lps[item][slot]`` and its logits are dropped (a 262k vocabulary makes every row 1 MiB:
    keeping a round's rows, or gathering them, cost more time in copies than the model). One
    ubatch a decode: the context then hands over the head's output as it is, with no copy into a
    batch-sized buffer (the results are the same for any split: batch invariance)."""
    reqs = sorted(reqs)
    o, r = 0, 0
    for a in range(0, len(toks), ctx.n_ubatch):
        b = a + ctx.n_ubatch
        n_out = sum(outs[a:b])
        ctx.decode(Batch(toks[a:b], pos[a:b], [(s,) for s in sids[a:b]], outs[a:b]))
        mine = []
        while r < len(reqs) and reqs[r][0] < o + n_out:
            mine.append(reqs[r])
            r += 1
        if mine:
            rows = torch.tensor([g - o for g, _, _, _ in mine])
            v = (-token_nll(ctx.get_logits(), torch.tensor([t for *_, t in mine]), rows=rows)).cpu().numpy()
            for (_, k, slot, _), x in zip(mine, v):
                lps[k][slot] = x
        o += n_out


def decode_items(ctx: Context, items: Sequence[_Item], on_group: Callable[[int, int, list[np.ndarray]], None]) -> None:
    """Decodes items packed into as few rounds as fit; calls ``on_group(i0, i1, logprobs)`` with, for
    each item, the float64 log-probs of its ``wants``, in that order."""
    i0 = 0
    while i0 < len(items):
        i1, n_cur, n_seq = i0, 0, 0
        while i1 < len(items) and n_cur + items[i1].required <= ctx.n_ctx and n_seq + len(items[i1].seqs) <= ctx.n_seq_max:
            n_cur += items[i1].required
            n_seq += len(items[i1].seqs)
            i1 += 1
        if i1 == i0:
            it = items[i0]
            if len(it.seqs) > ctx.n_seq_max:
                raise TaskError(f"task {i0} has {len(it.seqs)} answers but the context holds {ctx.n_seq_max} sequences")
            raise TaskError(f"task {i0} does not fit in the context window (requires {it.required} tokens, "
                            f"context has {ctx.n_ctx}); increase -c")
        ctx.memory.clear()
        group = items[i0:i1]
        base = np.cumsum([0] + [len(it.seqs) for it in group]).tolist()
        toks, pos, sids, outs = [], [], [], []
        for it, s0 in zip(group, base):
            toks += it.seqs[0][:it.cp]
            pos += range(it.cp)
            sids += [s0] * it.cp
            outs += [False] * (it.cp - 1) + [True]
        lps = [np.full(len(it.wants), np.nan) for it in group]
        # row 0 of item k is the prefix decode's output k
        pre = [(k, k, slot, t) for k, it in enumerate(group) for slot, (row, t) in enumerate(it.wants) if row == 0]
        _decode_scored(ctx, toks, pos, sids, outs, pre, lps)
        for it, s0 in zip(group, base):
            for s in range(1, len(it.seqs)):
                ctx.memory.seq_cp(s0, s0 + s, -1, -1)
        toks, pos, sids, outs = [], [], [], []
        end = []
        for k, (it, s0) in enumerate(zip(group, base)):
            first = sum(outs)  # row j > 0 of item k is the ending decode's output first + j - 1
            end += [(first + row - 1, k, slot, t) for slot, (row, t) in enumerate(it.wants) if row > 0]
            for s, seq in enumerate(it.seqs):
                m = len(seq) - it.cp
                toks += seq[it.cp:]
                pos += range(it.cp, len(seq))
                sids += [s0 + s] * m
                outs += [True] * m if it.all_outputs else [True] * (m - 1) + [False] * min(m, 1)
        if toks:
            _decode_scored(ctx, toks, pos, sids, outs, end, lps)
        on_group(i0, i1, lps)
        i0 = i1


def _ending_wants(it: _Item) -> list[tuple[int, int]]:
    """HellaSwag / multiple choice: every token of every sequence from the prefix on, as (row,
    target) pairs, sequence after sequence (``len(seq) - cp`` pairs each)."""
    wants = []
    li = 1
    for seq in it.seqs:
        wants.append((0, seq[it.cp]))
        for j in range(it.cp, len(seq) - 1):
            wants.append((li, seq[j + 1]))
            li += 1
    return wants


def _mean_ending_logprobs(lp: np.ndarray, it: _Item) -> list[float]:
    """Per sequence, the mean log-prob of its tokens from the prefix on (``lp``: of ``_ending_wants``)."""
    ends = np.cumsum([0] + [len(seq) - it.cp for seq in it.seqs])
    return [float(lp[a:b].mean()) for a, b in zip(ends[:-1], ends[1:])]


def _check_prefix(items: list[_Item], what: str) -> None:
    for k, it in enumerate(items):
        if it.cp == 0:
            raise TaskError(f"{what} task {k}: its sequences share no first token (the model adds no BOS); "
                            f"cannot score")
        if any(len(s) <= it.cp for s in it.seqs):
            raise TaskError(f"{what} task {k}: an ending adds no token to the shared context")


def wilson(acc: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of acc/n, as llama.cpp prints it (fractions)."""
    za = 1.95996398454
    freq = acc / n
    z = za * za / n
    cnf = z * math.sqrt(n * (4.0 * freq * (1 - freq) + z)) / (za + za)
    return (freq + z * 0.5 - cnf) / (1.0 + z), (freq + z * 0.5 + cnf) / (1.0 + z)


@dataclass
class ChoiceResult:
    n_tasks: int
    n_correct: int
    correct: list[bool]  # per task, in scoring order
    scores: list[list[float]]  # per task, per choice
    seconds: float = 0.0

    def add(self, ok: bool, scores: list[float]) -> None:
        self.n_correct += ok
        self.correct.append(ok)
        self.scores.append(scores)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_tasks if self.n_tasks else 0.0

    @property
    def tasks_per_s(self) -> float:
        return self.n_tasks / self.seconds if self.seconds else 0.0


def _argmax_first(v: Sequence[float]) -> int:
    best = 0
    for s in range(1, len(v)):
        if v[s] > v[best]:
            best = s
    return best


def each_item(ctx: Context, items: Sequence[_Item], score: Callable[[int, np.ndarray], object],
              runner: Runner | None = None, progress: Progress | None = None) -> Iterator[tuple[int, object]]:
    """``(k, score(k, logprobs_k))`` for every item in order (the log-probs of its ``wants``): items are decoded a round at a time
    (:meth:`~gguf_runtime.tools.distributed.Runner.iterate`: shared among torchrun's ranks and/or
    resumed from a log), packed into the context as many at a time as fit. An item's logits do not
    depend on its neighbours (batch invariance), so neither do the scores."""
    per_ctx = max(1, ctx.n_seq_max // max(1, max((len(it.seqs) for it in items), default=1)))

    def compute(ids: Sequence[int]) -> list:
        sub = [items[i] for i in ids]
        out: dict[int, object] = {}

        def on_group(i0, i1, lps):
            for j in range(i0, i1):
                out[j] = score(ids[j], lps[j - i0])
        decode_items(ctx, sub, on_group)
        return [out[j] for j in range(len(sub))]

    for k, r in (runner or Runner(Dist())).iterate(len(items), 4 * per_ctx, compute):
        yield k, r
        if progress:
            progress(k + 1, len(items))


def _score_endings(ctx: Context, tokenizer, prompts: Sequence[tuple[str, Sequence[str]]], what: str,
                   verdict: Callable[[int, int], bool], line: Callable[[int, ChoiceResult], str],
                   emit: Emit, progress: Progress | None, runner: Runner | None = None) -> ChoiceResult:
    """HellaSwag / multiple choice: ``tokenize(question + " " + answer)`` with BOS for each answer,
    each scored by the mean log-prob of its tokens after the shared prefix; ``verdict(k, best)``."""
    items = [_Item([tokenizer.encode(q + " " + a, add_special=True) for a in answers], 0, False) for q, answers in prompts]
    for it in items:
        it.cp = common_prefix(it.seqs)
    _check_prefix(items, what)
    for it in items:
        it.wants = _ending_wants(it)
    res = ChoiceResult(len(items), 0, [], [])
    t0 = time.perf_counter()

    for k, v in each_item(ctx, items, lambda k, lg: _mean_ending_logprobs(lg, items[k]), runner, progress):
        res.add(verdict(k, _argmax_first(v)), v)
        emit(line(k, res))
    res.seconds = time.perf_counter() - t0
    return res


def hellaswag(ctx: Context, tokenizer, tasks: Sequence[HellaSwagTask], emit: Emit | None = None,
              progress: Progress | None = None, runner: Runner | None = None) -> ChoiceResult:
    """Scores HellaSwag tasks (already selected, see :func:`select_hellaswag`) as llama.cpp does and
    emits its lines: the header, then ``task<TAB>acc_norm%<TAB>[lo%, hi%]`` per task."""
    emit = emit or (lambda s: None)
    emit("\ntask\tacc_norm\t95% confidence interval")

    def line(k: int, r: ChoiceResult) -> str:
        lo, hi = wilson(r.n_correct, k + 1)
        return f"{k + 1}\t{100.0 * r.n_correct / (k + 1):3.8f}%\t[{lo * 100.0:3.4f}%, {hi * 100.0:3.4f}%]"

    res = _score_endings(ctx, tokenizer, [(t.context, t.endings) for t in tasks], "HellaSwag",
                         lambda k, best: best == tasks[k].gold, line, emit, progress, runner)
    emit("")
    return res


def multiple_choice(ctx: Context, tokenizer, tasks: Sequence[MCTask], emit: Emit | None = None,
                    progress: Progress | None = None, runner: Runner | None = None) -> ChoiceResult:
    """Scores multiple-choice tasks (mc1) as llama.cpp does: ``question + " " + answer``, mean
    log-prob of each answer's tokens, correct when the best answer's label is 1."""
    for k, t in enumerate(tasks):
        if not t.question or not t.answers or any(not a for a in t.answers):
            raise TaskError(f"multiple-choice task {k} has an empty question or answer")
    emit = emit or (lambda s: None)
    emit("\ntask\tacc_norm")
    res = _score_endings(ctx, tokenizer, [(t.question, t.answers) for t in tasks], "multiple-choice",
                         lambda k, best: tasks[k].labels[best] == 1,
                         lambda k, r: f"{k + 1}\t{100.0 * r.n_correct / (k + 1):.8f}", emit, progress, runner)
    # llama.cpp's guard against printing this for < 100 tasks never triggers: it is always printed
    n_answers = sum(len(t.answers) for t in tasks)
    f32 = np.float32
    emit("")
    for name, p in (("Final result", f32(res.n_correct) / f32(res.n_tasks)), ("Random chance", f32(res.n_tasks) / f32(n_answers))):
        sigma = math.sqrt(p * (1 - p) / (res.n_tasks - 1)) if res.n_tasks > 1 else 0.0
        emit(f"{name}: {100.0 * p:.4f} +/- {100.0 * sigma:.4f}")
    return res


def winogrande(ctx: Context, tokenizer, tasks: Sequence[WinograndeTask], emit: Emit | None = None,
               progress: Progress | None = None, runner: Runner | None = None) -> ChoiceResult:
    """Scores WinoGrande tasks as llama.cpp does; emits ``i<TAB>acc<TAB>score1  score2  result  answer``."""
    k_min_trailing = 3
    items, bases = [], []
    for t in tasks:
        seqs = [tokenizer.encode(t.first + c + t.second, add_special=True) for c in t.choices]
        items.append(_Item(seqs, common_prefix(seqs), True))
        bases.append([len(tokenizer.encode(t.first + c, add_special=True)) for c in t.choices])
    _check_prefix(items, "WinoGrande")
    emit = emit or (lambda s: None)
    res = ChoiceResult(len(tasks), 0, [], [])
    t0 = time.perf_counter()

    spans = []  # per task and choice: (first slot in the task's wants, token count n)
    for k, it in enumerate(items):
        (s0, s1), cp = it.seqs, it.cp
        skip = len(s0) - cp > k_min_trailing and len(s1) - cp > k_min_trailing
        spans.append([])
        for c, seq in enumerate((s0, s1)):
            nb = bases[k][c] if skip else cp
            last = 1 if len(seq) - nb > 1 else 0
            # row of token j's logits: prefix last at 0, then seq 0's tokens, then seq 1's; for the
            # second sequence llama.cpp starts one row early when the choice is not skipped
            li = nb - cp if c == 0 else len(s0) - cp + nb - cp
            js = list(range(nb - 1, len(seq) - 1 - last))
            spans[k].append((len(it.wants), len(js), len(seq) - nb - last))
            it.wants += [(li + i, seq[j + 1]) for i, j in enumerate(js)]

    def score(k: int, lp: np.ndarray) -> list[float]:
        scores = []
        for a, m, n in spans[k]:
            part = lp[a:a + m]
            scores.append(float(np.float32(part.astype(np.float32).sum(dtype=np.float32)) / np.float32(n)) if n else float("nan"))
        return scores

    for k, scores in each_item(ctx, items, score, runner, progress):
        result = 1 if scores[0] > scores[1] else 2
        res.add(result == tasks[k].answer, scores)
        emit(f"{k + 1}\t{100.0 * res.n_correct / (k + 1):.4f}\t{scores[0]:10.6f}  {scores[1]:10.6f}  {result}  {tasks[k].answer}")
    res.seconds = time.perf_counter() - t0
    emit("")
    if res.n_tasks >= 100:
        p = np.float32(res.n_correct) / np.float32(res.n_tasks)
        sigma = 100.0 * math.sqrt(p * (1 - p) / (res.n_tasks - 1))
        emit(f"Final Winogrande score({res.n_tasks} tasks): {100 * p:.4f} +/- {sigma:.4f}")
    return res
