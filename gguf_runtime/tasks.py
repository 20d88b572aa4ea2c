"""HellaSwag, WinoGrande, multiple choice and KL-divergence, scored as llama-perplexity scores them.

Facts from llama.cpp's tools/perplexity/perplexity.cpp, reimplemented:

- **Task choice.** With fewer tasks asked than the file holds, tasks are drawn with ``std::mt19937``
  seeded with 1: HellaSwag through ``std::uniform_int_distribution<size_t>(0, n_left - 1)`` (libstdc++'s
  Lemire draw for a 32-bit engine) removing each pick; WinoGrande and multiple choice through
  ``int(float(1 / 2^32) * float(rng()) * float(n_left))`` with swap-remove. :class:`MT19937` is the
  generator, checked against the C++ standard's 10000th-output value.
- **Shared context.** Each ending is ``tokenize(context + " " + ending)`` with BOS; the tokens common
  to all endings are decoded once in one sequence, its memory copied (``seq_cp``) to the other
  endings' sequences, then the endings decoded. This works unchanged for recurrent memories.
- **Scores.** HellaSwag / multiple choice: mean log-probability of each ending's tokens (the first
  from the common prefix's last logits); accuracy with a Wilson 95% interval. WinoGrande: mean
  log-probability of the tokens after the choice word (llama.cpp's ``k_min_trailing_ctx`` rule,
  including its use of the first sentence's last logits for the second choice when the choice is
  not skipped).
- **KL-divergence.** ``--kl-divergence-base`` writes llama.cpp's logits file (``_logits_``, n_ctx,
  n_vocab, n_chunk, tokens, then per scored token a float32 scale, a float32 min log-prob and
  n_vocab uint16 quantized log-probs, padded to even); ``--kl-divergence`` reads it and prints the
  same statistics.

Tasks are packed into one context as many at a time as fit (each in its own sequences): since every
op is batch-invariant, a task's scores do not depend on its neighbours, so packing only changes speed.
"""
from __future__ import annotations

import bz2
import math
import os
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .batch import Batch
from .context import Context
from .errors import GGUFRuntimeError
from .perplexity import check_params, chunk_logits, make_context, token_nll

Emit = Callable[[str], None]
Progress = Callable[[int, int], None]


class TaskError(GGUFRuntimeError):
    """A task file that cannot be read or scored."""


# -- std::mt19937 ------------------------------------------------------------------------------
class MT19937:
    """``std::mt19937`` (32-bit Mersenne Twister, C++ seeding)."""

    def __init__(self, seed: int = 5489):
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self.mt, self.i = mt, 624

    def _twist(self) -> None:
        mt = self.mt
        for k in range(624):
            y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
            mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        self.i = 0

    def __call__(self) -> int:
        if self.i >= 624:
            self._twist()
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def uniform_int(self, n: int) -> int:
        """``std::uniform_int_distribution<size_t>(0, n - 1)(rng)`` as libstdc++ (GCC >= 11) draws it."""
        prod = self() * n
        low = prod & 0xFFFFFFFF
        if low < n:
            threshold = (0x100000000 - n) % n
            while low < threshold:
                prod = self() * n
                low = prod & 0xFFFFFFFF
        return prod >> 32

    def scaled_index(self, n: int) -> int:
        """``int(scale * rng() * n)`` in float32 with ``scale = 1 / (1 + 2^32 - 1)`` (WinoGrande, MC)."""
        f32 = np.float32
        scale = f32(1) / (f32(1) + f32(0xFFFFFFFF))
        return int(f32(f32(scale * f32(self())) * f32(n)))


def pick_swap_remove(n_total: int, n: int) -> list[int]:
    """Indices WinoGrande / multiple choice select: mt19937(1), scaled draw, swap-remove."""
    rng, aux, out = MT19937(1), list(range(n_total)), []
    for _ in range(n):
        j = rng.scaled_index(len(aux))
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


# -- files -------------------------------------------------------------------------------------
def read_prompt_file(path: str | os.PathLike) -> bytes:
    """A ``-f`` file as llama.cpp reads it: raw bytes, one trailing newline dropped (.bz2 unpacked)."""
    p = Path(path)
    try:
        data = bz2.decompress(p.read_bytes()) if p.suffix == ".bz2" else p.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"file not found: {p}") from None
    except (OSError, ValueError) as e:
        raise TaskError(f"cannot read {p}: {e}") from None
    return data[:-1] if data.endswith(b"\n") else data


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _getlines(text: str) -> list[str]:
    """std::getline pieces: a final piece is kept only if it holds characters."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass
class HellaSwagTask:
    context: str
    gold: int
    endings: list[str]


def load_hellaswag(text: str) -> list[HellaSwagTask]:
    """llama.cpp's six-line format: context, gold index, four endings."""
    lines = _getlines(text)
    if not lines or len(lines) % 6:
        raise TaskError(f"HellaSwag file has {len(lines)} lines, not a positive multiple of 6")
    tasks = []
    for i in range(0, len(lines), 6):
        try:
            gold = int(lines[i + 1].strip())
        except ValueError:
            raise TaskError(f"HellaSwag task {i // 6}: gold label '{lines[i + 1][:20]}' is not an integer") from None
        if not 0 <= gold < 4:
            raise TaskError(f"HellaSwag task {i // 6}: gold label {gold} is not in 0..3")
        tasks.append(HellaSwagTask(lines[i], gold, lines[i + 2:i + 6]))
    return tasks


def select_hellaswag(tasks: list[HellaSwagTask], n: int) -> list[HellaSwagTask]:
    """llama-perplexity's choice: all tasks in order if n >= total, else n random picks (mt19937(1))."""
    if n >= len(tasks):
        return list(tasks)
    rng, left = MT19937(1), list(tasks)
    return [left.pop(rng.uniform_int(len(left))) for _ in range(n)]


@dataclass
class WinograndeTask:
    first: str
    second: str
    choices: tuple[str, str]
    answer: int  # 1 or 2


def load_winogrande(text: str, warn: Emit | None = None) -> list[WinograndeTask]:
    """llama.cpp's CSV: index,sentence with '_',choice1,choice2,answer. Like llama.cpp, a last line
    without a newline is not read, and malformed lines are skipped (reported through ``warn``)."""
    out = []
    pieces = text.split("\n")[:-1]  # getline + eof check: the unterminated last piece is dropped
    for line in pieces:
        commas, quote = [], False
        for i, c in enumerate(line):
            if quote:
                quote = c != '"'
            elif c == ",":
                commas.append(i)
                if len(commas) == 4:
                    break
            elif c == '"':
                quote = True
        if len(commas) != 4:
            warn and warn(f"failed to find comma separators in <{line}>")
            continue
        c0, c1, c2, c3 = commas
        sentence = line[c0 + 2:c1 - 1] if line[c0 + 1] == '"' else line[c0 + 1:c1]
        where = sentence.find("_")
        if where < 0:
            warn and warn(f"no _ in <{sentence}>")
            continue
        try:
            answer = int(line[c3 + 1:].split()[0])
        except (ValueError, IndexError):
            answer = 0
        if answer not in (1, 2):
            warn and warn(f"failed to parse answer <{line[c3 + 1:]}>")
            continue
        out.append(WinograndeTask(sentence[:where], sentence[where + 1:], (line[c1 + 1:c2], line[c2 + 1:c3]), answer))
    return out


@dataclass
class MCTask:
    question: str
    answers: list[str]
    labels: list[int]  # 1 marks a correct answer (mc1: exactly one)
    answers2: list[str] = field(default_factory=list)
    labels2: list[int] = field(default_factory=list)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TaskError("multiple-choice file is truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        return self.take(self.u32()).decode("utf-8", errors="replace")

    def answers(self) -> tuple[list[str], list[int]]:
        n = self.u32()
        if n > 100:
            raise TaskError(f"multiple-choice task has {n} answers (at most 100)")
        answers = [self.string() for _ in range(n)]
        return answers, list(struct.unpack(f"<{n}i", self.take(4 * n)))

    def task(self) -> MCTask:
        q = self.string()
        a1, l1 = self.answers()
        a2, l2 = self.answers()
        return MCTask(q, a1, l1, a2, l2)


def load_multiple_choice(data: bytes, n: int = 0) -> list[MCTask]:
    """llama.cpp's binary task file: u32 n_task, u32 offsets, then tasks (question, mc1, mc2); with
    0 < n < n_task, n tasks chosen at random as llama-perplexity chooses them."""
    r = _Reader(data)
    n_task = r.u32()
    if n_task == 0:
        raise TaskError("multiple-choice file holds no tasks")
    offsets = struct.unpack(f"<{n_task}I", r.take(4 * n_task))
    if n == 0 or n >= n_task:
        return [r.task() for _ in range(n_task)]
    return [_Reader(data, offsets[i]).task() for i in pick_swap_remove(n_task, n)]


def write_multiple_choice(path: str | os.PathLike, tasks: Sequence[MCTask]) -> None:
    """Writes llama.cpp's multiple-choice binary format."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<I", len(b)) + b

    def ans(a: list[str], lab: list[int]) -> bytes:
        return struct.pack("<I", len(a)) + b"".join(s(x) for x in a) + struct.pack(f"<{len(lab)}i", *lab)

    blobs = [s(t.question) + ans(t.answers, t.labels) + ans(t.answers2, t.labels2) for t in tasks]
    pos = 4 + 4 * len(tasks)
    offsets = []
    for b in blobs:
        offsets.append(pos)
        pos += len(b)
    _atomic_write(path, [struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets), *blobs])


def _atomic_write(path, parts: Iterable[bytes]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for b in parts:
                f.write(b)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- decoding tasks: common prefix once, copied to every ending's sequence ---------------------
@dataclass
class _Item:
    seqs: list[list[int]]
    cp: int  # tokens common to all sequences
    all_outputs: bool  # logits for every ending token (WinoGrande) or all but the last

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


def _decode_chunked(ctx: Context, toks: list[int], pos: list[int], sids: list[int], outs: list[bool],
                    rows: list[torch.Tensor]) -> None:
    for a in range(0, len(toks), ctx.n_batch):
        b = a + ctx.n_batch
        ctx.decode(Batch(toks[a:b], pos[a:b], [(s,) for s in sids[a:b]], outs[a:b]))
        if any(outs[a:b]):
            rows.append(ctx.get_logits())


def decode_items(ctx: Context, items: Sequence[_Item], on_group: Callable[[int, int, list[torch.Tensor]], None]) -> None:
    """Decodes items packed into as few rounds as fit; calls ``on_group(i0, i1, logits)`` with, for
    each item, its logits in llama.cpp's order: the common prefix's last token, then each sequence's
    tokens from the prefix on (all, or all but the last)."""
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
        prefix_rows: list[torch.Tensor] = []
        _decode_chunked(ctx, toks, pos, sids, outs, prefix_rows)
        prefix = torch.cat(prefix_rows)
        for it, s0 in zip(group, base):
            for s in range(1, len(it.seqs)):
                ctx.memory.seq_cp(s0, s0 + s, -1, -1)
        toks, pos, sids, outs = [], [], [], []
        counts = []
        for it, s0 in zip(group, base):
            n = 0
            for s, seq in enumerate(it.seqs):
                m = len(seq) - it.cp
                toks += seq[it.cp:]
                pos += range(it.cp, len(seq))
                sids += [s0 + s] * m
                o = [True] * m if it.all_outputs else [True] * (m - 1) + [False] * min(m, 1)
                outs += o
                n += sum(o)
            counts.append(n)
        end_rows: list[torch.Tensor] = []
        if toks:
            _decode_chunked(ctx, toks, pos, sids, outs, end_rows)
        ends = torch.cat(end_rows) if end_rows else prefix[:0]
        offs = np.cumsum([0] + counts).tolist()
        on_group(i0, i1, [torch.cat([prefix[k:k + 1], ends[offs[k]:offs[k + 1]]]) for k in range(len(group))])
        i0 = i1


def _logprobs(logits: torch.Tensor, rows: list[int], targets: list[int]) -> np.ndarray:
    if not rows:
        return np.zeros(0)
    r = torch.tensor(rows, device=logits.device)
    return (-token_nll(logits[r], torch.tensor(targets))).cpu().numpy()


def _mean_ending_logprobs(logits: torch.Tensor, it: _Item) -> list[float]:
    """HellaSwag / multiple choice: per sequence, the mean log-prob of its tokens from the prefix on."""
    rows, targets, owner = [], [], []
    li = 1
    for s, seq in enumerate(it.seqs):
        rows.append(0)
        targets.append(seq[it.cp])
        owner.append(s)
        for j in range(it.cp, len(seq) - 1):
            rows.append(li)
            targets.append(seq[j + 1])
            owner.append(s)
            li += 1
    lp = _logprobs(logits, rows, targets)
    owner_a = np.array(owner)
    return [float(lp[owner_a == s].mean()) for s in range(len(it.seqs))]


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


def _score_endings(ctx: Context, tokenizer, prompts: Sequence[tuple[str, Sequence[str]]], what: str,
                   verdict: Callable[[int, int], bool], line: Callable[[int, ChoiceResult], str],
                   emit: Emit, progress: Progress | None) -> ChoiceResult:
    """HellaSwag / multiple choice: ``tokenize(question + " " + answer)`` with BOS for each answer,
    each scored by the mean log-prob of its tokens after the shared prefix; ``verdict(k, best)``."""
    items = [_Item([tokenizer.encode(q + " " + a, add_special=True) for a in answers], 0, False) for q, answers in prompts]
    for it in items:
        it.cp = common_prefix(it.seqs)
    _check_prefix(items, what)
    res = ChoiceResult(len(items), 0, [], [])
    t0 = time.perf_counter()

    def on_group(i0, i1, logits):
        for k in range(i0, i1):
            v = _mean_ending_logprobs(logits[k - i0], items[k])
            res.add(verdict(k, _argmax_first(v)), v)
            emit(line(k, res))
        if progress:
            progress(i1, len(items))

    decode_items(ctx, items, on_group)
    res.seconds = time.perf_counter() - t0
    return res


def hellaswag(ctx: Context, tokenizer, tasks: Sequence[HellaSwagTask], emit: Emit | None = None,
              progress: Progress | None = None) -> ChoiceResult:
    """Scores HellaSwag tasks (already selected, see :func:`select_hellaswag`) as llama.cpp does and
    emits its lines: the header, then ``task<TAB>acc_norm%<TAB>[lo%, hi%]`` per task."""
    emit = emit or (lambda s: None)
    emit("\ntask\tacc_norm\t95% confidence interval")

    def line(k: int, r: ChoiceResult) -> str:
        lo, hi = wilson(r.n_correct, k + 1)
        return f"{k + 1}\t{100.0 * r.n_correct / (k + 1):3.8f}%\t[{lo * 100.0:3.4f}%, {hi * 100.0:3.4f}%]"

    res = _score_endings(ctx, tokenizer, [(t.context, t.endings) for t in tasks], "HellaSwag",
                         lambda k, best: best == tasks[k].gold, line, emit, progress)
    emit("")
    return res


def multiple_choice(ctx: Context, tokenizer, tasks: Sequence[MCTask], emit: Emit | None = None,
                    progress: Progress | None = None) -> ChoiceResult:
    """Scores multiple-choice tasks (mc1) as llama.cpp does: ``question + " " + answer``, mean
    log-prob of each answer's tokens, correct when the best answer's label is 1."""
    for k, t in enumerate(tasks):
        if not t.question or not t.answers or any(not a for a in t.answers):
            raise TaskError(f"multiple-choice task {k} has an empty question or answer")
    emit = emit or (lambda s: None)
    emit("\ntask\tacc_norm")
    res = _score_endings(ctx, tokenizer, [(t.question, t.answers) for t in tasks], "multiple-choice",
                         lambda k, best: tasks[k].labels[best] == 1,
                         lambda k, r: f"{k + 1}\t{100.0 * r.n_correct / (k + 1):.8f}", emit, progress)
    # llama.cpp's guard against printing this for < 100 tasks never triggers: it is always printed
    n_answers = sum(len(t.answers) for t in tasks)
    f32 = np.float32
    emit("")
    for name, p in (("Final result", f32(res.n_correct) / f32(res.n_tasks)), ("Random chance", f32(res.n_tasks) / f32(n_answers))):
        sigma = math.sqrt(p * (1 - p) / (res.n_tasks - 1)) if res.n_tasks > 1 else 0.0
        emit(f"{name}: {100.0 * p:.4f} +/- {100.0 * sigma:.4f}")
    return res


def winogrande(ctx: Context, tokenizer, tasks: Sequence[WinograndeTask], emit: Emit | None = None,
               progress: Progress | None = None) -> ChoiceResult:
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

    def on_group(i0, i1, logits):
        for k in range(i0, i1):
            it, (s0, s1), cp = items[k], items[k].seqs, items[k].cp
            skip = len(s0) - cp > k_min_trailing and len(s1) - cp > k_min_trailing
            scores = []
            for c, seq in enumerate((s0, s1)):
                nb = bases[k][c] if skip else cp
                last = 1 if len(seq) - nb > 1 else 0
                # row of token j's logits: prefix last at 0, then seq 0's tokens, then seq 1's; for the
                # second sequence llama.cpp starts one row early when the choice is not skipped
                li = nb - cp if c == 0 else len(s0) - cp + nb - cp
                js = list(range(nb - 1, len(seq) - 1 - last))
                lp = _logprobs(logits[k - i0], list(range(li, li + len(js))), [seq[j + 1] for j in js])
                n = len(seq) - nb - last
                scores.append(float(np.float32(lp.astype(np.float32).sum(dtype=np.float32)) / np.float32(n)) if n else float("nan"))
            result = 1 if scores[0] > scores[1] else 2
            res.add(result == tasks[k].answer, scores)
            emit(f"{k + 1}\t{100.0 * res.n_correct / (k + 1):.4f}\t{scores[0]:10.6f}  {scores[1]:10.6f}  {result}  {tasks[k].answer}")
        if progress:
            progress(i1, len(items))

    decode_items(ctx, items, on_group)
    res.seconds = time.perf_counter() - t0
    emit("")
    if res.n_tasks >= 100:
        p = np.float32(res.n_correct) / np.float32(res.n_tasks)
        sigma = 100.0 * math.sqrt(p * (1 - p) / (res.n_tasks - 1))
        emit(f"Final Winogrande score({res.n_tasks} tasks): {100 * p:.4f} +/- {sigma:.4f}")
    return res


# -- KL-divergence -----------------------------------------------------------------------------
def _row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def quantize_log_probs(logits: torch.Tensor) -> np.ndarray:
    """llama.cpp's compressed log-probs, (n, nv) uint16 rows: float32 scale and min log-prob, then
    each token's log-prob above max - 16 as round((logit - min) / scale) (0 below)."""
    l = logits.float()
    n, v = l.shape
    mx, mn = l.amax(-1, keepdim=True), l.amin(-1, keepdim=True)
    mn = torch.maximum(mn, mx - 16)
    lse = torch.exp(l - mx).double().sum(-1, keepdim=True).log().float()
    min_lp = (mn - mx) - lse
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.where(l > mn, torch.round(inv * (l - mn)), torch.zeros_like(l)).to(torch.int32)
    out = np.zeros((n, _row_width(v)), dtype=np.uint16)
    head = torch.cat([scale, min_lp], 1).cpu().numpy().astype(np.float32)
    out[:, :4] = head.view(np.uint16)
    out[:, 4:4 + v] = q.cpu().numpy().astype(np.uint16)
    return out


class LogitsWriter:
    """Writes llama.cpp's ``--kl-divergence-base`` file; use as ``perplexity(..., on_logits=w)``.
    The file appears under its name only when :meth:`close` succeeds."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, n_chunk: int, tokens: torch.Tensor):
        self.path = Path(path)
        try:
            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".part")
        except OSError as e:
            raise TaskError(f"cannot write logits file {path}: {e.strerror or e}") from None
        self.f = os.fdopen(fd, "wb")
        self.n_chunk = n_chunk
        self.f.write(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk))
        self.f.write(tokens[:n_chunk * n_ctx].to(torch.int32).numpy().tobytes())

    def __call__(self, i: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.f.write(quantize_log_probs(logits).tobytes())

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


@dataclass
class LogitsFile:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: torch.Tensor
    data: np.ndarray  # (n_chunk, n_ctx - 1 - n_ctx // 2, nv) uint16

    @classmethod
    def read(cls, path: str | os.PathLike) -> "LogitsFile":
        """Opens a logits file; the log-prob rows stay memory-mapped (they can be gigabytes)."""
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(20)
        except OSError as e:
            raise TaskError(f"cannot read logits file {path}: {e.strerror or e}") from None
        if head[:8] != b"_logits_":
            raise TaskError(f"{path} does not look like a file containing log-probabilities")
        if len(head) < 20:
            raise TaskError(f"{path}: truncated header")
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[8:20])
        if n_ctx < 4 or n_vocab <= 0 or n_chunk <= 0:
            raise TaskError(f"{path}: bad header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
        n_tok = n_ctx * n_chunk
        rows, nv = n_ctx - 1 - n_ctx // 2, _row_width(n_vocab)
        need = 20 + 4 * n_tok + 2 * n_chunk * rows * nv
        if size < need:
            raise TaskError(f"{path} is truncated: {size} bytes, {need} expected for {n_chunk} chunks of {n_ctx}")
        tokens = torch.from_numpy(np.fromfile(path, dtype="<i4", count=n_tok, offset=20).astype(np.int64))
        data = np.memmap(path, dtype="<u2", mode="r", offset=20 + 4 * n_tok, shape=(n_chunk, rows, nv))
        return cls(n_ctx, n_vocab, n_chunk, tokens, data)


@dataclass
class KLDStats:
    """llama.cpp's kl_divergence_result: running sums plus per-token KLD and delta-p values."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: torch.Tensor, base: np.ndarray, targets: torch.Tensor) -> None:
        l = logits.float()
        dev = l.device
        t = targets.to(dev).view(-1, 1)
        mx, imax = l.max(-1, keepdim=True)
        lse = torch.exp(l - mx).double().sum(-1, keepdim=True).log().float()
        nll = ((mx + lse) - l.gather(-1, t)).squeeze(-1)
        v = l.shape[1]
        head = np.ascontiguousarray(base[:, :4]).view(np.float32)
        scale = torch.from_numpy(head[:, :1].copy()).to(dev)
        min_lp = torch.from_numpy(head[:, 1:2].copy()).to(dev)
        q = torch.from_numpy(base[:, 4:4 + v].astype(np.float32)).to(dev)
        p_log_base = scale * q + min_lp
        nll_base = -p_log_base.gather(-1, t).squeeze(-1)
        imax_base = p_log_base.argmax(-1)
        term = torch.exp(p_log_base) * ((p_log_base - l) + (mx + lse))
        kld = torch.where(p_log_base > -16, term, torch.zeros_like(term)).double().sum(-1)
        p_diff = torch.exp(-nll) - torch.exp(-nll_base)
        d = lambda x: float(x.double().sum())  # noqa: E731
        self.sum_nll += d(nll)
        self.sum_nll2 += d(nll * nll)
        self.sum_nll_base += d(nll_base)
        self.sum_nll_base2 += d(nll_base * nll_base)
        self.sum_nll_nll_base += d(nll * nll_base)
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        pd2 = (p_diff * p_diff).double()
        self.sum_p_diff += d(p_diff)
        self.sum_p_diff2 += float(pd2.sum())
        self.sum_p_diff4 += float((pd2 * pd2).sum())
        self.max_p_diff = max(self.max_p_diff, float(p_diff.abs().max()))
        self.n_same_top += int((imax.squeeze(-1) == imax_base).sum())
        self.count += l.shape[0]
        self.kld_values.append(kld.float().cpu().numpy())
        self.p_diff_values.append(p_diff.cpu().numpy())

    @staticmethod
    def _mu(s: float, s2: float, n: int) -> tuple[float, float]:
        if n < 1:
            return 0.0, 0.0
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def _cov(self) -> float:
        n = self.count
        if n < 10:
            return 0.0
        return (self.sum_nll_nll_base / n - (self.sum_nll / n) * (self.sum_nll_base / n)) / (n - 1)

    def chunk_line(self, i: int) -> str:
        lp = self._mu(self.sum_nll, self.sum_nll2, self.count)
        lb = self._mu(self.sum_nll_base, self.sum_nll_base2, self.count)
        ppl = math.exp(lp[0])
        ratio_unc = _sqrt(lp[1] ** 2 + lb[1] ** 2 - 2.0 * self._cov())
        kl = self._mu(self.sum_kld, self.sum_kld2, self.count)
        mse = self._mu(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = _sqrt(mse[0])
        rms_unc = 0.5 / rms * mse[1] if rms else float("inf")
        top = self.n_same_top / self.count
        top_unc = _sqrt(top * (1 - top) / max(1, self.count - 1))
        return (f"{i + 1:4d}    {ppl:9.4f} ± {ppl * lp[1]:9.4f}    {lp[0] - lb[0]:10.5f} ± {ratio_unc:10.5f}"
                f"    {kl[0]:10.5f} ± {kl[1]:10.5f}    {100.0 * rms:6.3f} ± {100.0 * rms_unc:6.3f} %"
                f"    {100.0 * top:6.3f} ± {100.0 * top_unc:6.3f} %")

    def summary(self) -> dict:
        lp = self._mu(self.sum_nll, self.sum_nll2, self.count)
        lb = self._mu(self.sum_nll_base, self.sum_nll_base2, self.count)
        kl = self._mu(self.sum_kld, self.sum_kld2, self.count)
        pd = self._mu(self.sum_p_diff, self.sum_p_diff2, self.count)
        mse = self._mu(self.sum_p_diff2, self.sum_p_diff4, self.count)
        cov = self._cov()
        ppl, ppl_base = math.exp(lp[0]), math.exp(lb[0])
        ratio_unc = _sqrt(lp[1] ** 2 + lb[1] ** 2 - 2.0 * cov)
        kv = np.sort(np.concatenate(self.kld_values).astype(np.float32))
        pv = np.sort(np.concatenate(self.p_diff_values).astype(np.float32))
        rms = _sqrt(mse[0])
        top = self.n_same_top / self.count
        return {
            "ppl": ppl, "ppl_unc": ppl * lp[1], "ppl_base": ppl_base, "ppl_base_unc": ppl_base * lb[1],
            "cor": cov / (lp[1] * lb[1]) if lp[1] * lb[1] else float("nan"),
            "ln_ratio": lp[0] - lb[0], "ln_ratio_unc": ratio_unc,
            "ratio": math.exp(lp[0] - lb[0]), "ratio_unc": math.exp(lp[0] - lb[0]) * ratio_unc,
            "diff": ppl - ppl_base,
            "diff_unc": _sqrt((ppl * lp[1]) ** 2 + (ppl_base * lb[1]) ** 2 - 2.0 * ppl * ppl_base * cov),
            "kld": kl[0], "kld_unc": kl[1], "kld_values": kv, "kld_median": _median(kv),
            "p_diff": pd[0], "p_diff_unc": pd[1], "p_diff_values": pv, "p_diff_median": _median(pv),
            "rms_p_diff": rms, "rms_p_diff_unc": 0.5 / rms * mse[1] if rms else float("nan"),
            "same_top": top, "same_top_unc": _sqrt(top * (1 - top) / max(1, self.count - 1)),
        }

    def report(self) -> list[str]:
        """llama.cpp's closing statistics (nothing under 100 tokens, as llama.cpp)."""
        if self.count < 100:
            return []
        s = self.summary()
        kv, pv = s["kld_values"], s["p_diff_values"]
        L = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * s['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ratio']:10.6f} ± {s['ln_ratio_unc']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ratio']:10.6f} ± {s['ratio_unc']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['diff']:10.6f} ± {s['diff_unc']:10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_unc']:10.6f}",
             f"Maximum KLD: {kv[-1]:10.6f}"]
        for name, fr in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900)):
            L.append(f"{name}   KLD: {percentile(kv, fr):10.6f}")
        L.append(f"Median  KLD: {s['kld_median']:10.6f}")
        for name, fr in (("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
            L.append(f"{name}   KLD: {percentile(kv, fr):10.6f}")
        L += [f"Minimum KLD: {kv[0]:10.6f}", "", "====== Token probability statistics ======",
              f"Mean    Δp: {100.0 * s['p_diff']:6.3f} ± {100.0 * s['p_diff_unc']:5.3f} %",
              f"Maximum Δp: {100.0 * pv[-1]:6.3f}%"]
        for name, fr in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900), ("75.0%", 0.750)):
            L.append(f"{name}   Δp: {100.0 * percentile(pv, fr):6.3f}%")
        L.append(f"Median  Δp: {100.0 * s['p_diff_median']:6.3f}%")
        for name, fr in (("25.0%", 0.250), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
            L.append(f"{name}   Δp: {100.0 * percentile(pv, fr):6.3f}%")
        L += [f"Minimum Δp: {100.0 * pv[0]:6.3f}%",
              f"RMS Δp    : {100.0 * s['rms_p_diff']:6.3f} ± {100.0 * s['rms_p_diff_unc']:5.3f} %",
              f"Same top p: {100.0 * s['same_top']:6.3f} ± {100.0 * s['same_top_unc']:5.3f} %"]
        return L


def _sqrt(x: float) -> float:
    """C's sqrt: NaN for a negative argument (llama.cpp prints it rather than failing)."""
    return math.sqrt(x) if x >= 0 else float("nan")


def _median(v: np.ndarray) -> float:
    n = len(v)
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear-interpolated percentile of sorted values, in float32."""
    f32 = np.float32
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = f32(fraction) * f32(len(values) - 1)
    ip = int(p)
    p = f32(p - f32(ip))
    return float((f32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def kl_divergence(ctx_or_model, base: LogitsFile, n_batch: int = 2048, n_ubatch: int = 512, bos: int | None = None,
                  emit: Emit | None = None, progress: Progress | None = None) -> KLDStats:
    """Compares a model with the log-probs of a ``--kl-divergence-base`` file (same tokens, chunks
    and BOS replacement), emitting llama.cpp's per-chunk lines and closing statistics."""
    n_ctx = base.n_ctx
    check_params(base.tokens.numel(), n_ctx, n_batch)
    ctx = ctx_or_model if isinstance(ctx_or_model, Context) else make_context(ctx_or_model, n_ctx, n_batch, n_ubatch)
    if ctx.n_vocab != base.n_vocab:
        raise TaskError(f"inconsistent vocabulary: the model has {ctx.n_vocab} tokens, the logits file {base.n_vocab}")
    emit = emit or (lambda s: None)
    stats = KLDStats()
    emit("")
    emit("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p")
    for i, logits, targets in chunk_logits(ctx, base.tokens, n_ctx, n_batch, base.n_chunk, bos):
        stats.add(logits, base.data[i], targets)
        emit(stats.chunk_line(i))
        if progress:
            progress(i + 1, base.n_chunk)
    emit("")
    for line in stats.report():
        emit(line)
    return stats


__all__ = [
    "MT19937", "pick_swap_remove", "read_prompt_file", "HellaSwagTask", "load_hellaswag", "select_hellaswag",
    "WinograndeTask", "load_winogrande", "MCTask", "load_multiple_choice", "write_multiple_choice",
    "make_task_context", "decode_items", "wilson", "ChoiceResult", "hellaswag", "multiple_choice", "winogrande",
    "quantize_log_probs", "LogitsWriter", "LogitsFile", "KLDStats", "percentile", "kl_divergence", "TaskError",
]
