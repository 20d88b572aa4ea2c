"""Task files as llama-perplexity reads them, and its task choice (``std::mt19937``).

See :mod:`gguf_runtime.tools.tasks` for the facts reimplemented."""
from __future__ import annotations

import bz2
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...atomic import atomic_write
from ...errors import GGUFRuntimeError

Emit = Callable[[str], None]


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
MAX_PROMPT_BYTES = 1 << 31  # a -f file (or what a .bz2 unpacks to) larger than this is refused


def read_prompt_file(path: str | os.PathLike) -> bytes:
    """A ``-f`` file as llama.cpp reads it: raw bytes, one trailing newline dropped (.bz2 unpacked).

    Only regular files are read: a directory, FIFO, socket or device (``/dev/zero``) is refused
    before it is opened for reading (the open itself never blocks), and so is anything over
    :data:`MAX_PROMPT_BYTES`, unpacked or not."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise TaskError(f"file not found: {p}") from None
    except OSError as e:
        raise TaskError(f"cannot read {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TaskError(f"cannot read {p}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise TaskError(f"cannot read {p}: not a regular file (a FIFO, socket or device)")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # swapped after the first check
                raise TaskError(f"cannot read {p}: not a regular file (a FIFO, socket or device)")
            if st.st_size > MAX_PROMPT_BYTES:
                raise TaskError(f"cannot read {p}: {st.st_size} bytes is over the limit of {MAX_PROMPT_BYTES}")
            raw = f.read(MAX_PROMPT_BYTES + 1)
        data = _bunzip(raw, p) if p.suffix == ".bz2" else raw
    except (OSError, ValueError, EOFError) as e:
        raise TaskError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise TaskError(f"cannot read {p}: over the limit of {MAX_PROMPT_BYTES} bytes")
    return data[:-1] if data.endswith(b"\n") else data


def _bunzip(raw: bytes, p: Path) -> bytes:
    """bz2 streams (concatenated, as bz2.decompress reads them), refusing output over the limit."""
    out, total = [], 0
    while raw:
        d, data = bz2.BZ2Decompressor(), raw
        while True:
            chunk = d.decompress(data, max_length=1 << 24)
            data = b""
            total += len(chunk)
            if total > MAX_PROMPT_BYTES:
                raise TaskError(f"cannot read {p}: unpacks to over {MAX_PROMPT_BYTES} bytes")
            out.append(chunk)
            if d.eof:
                break
            if d.needs_input:
                raise TaskError(f"cannot read {p}: truncated bz2 data")
        raw = d.unused_data
    return b"".join(out)


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
    atomic_write(path, [struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets), *blobs])
