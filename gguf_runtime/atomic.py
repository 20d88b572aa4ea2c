"""One atomic writer for every file the project writes: a temporary file in the destination's
directory, written, flushed to disk (``fsync``), then renamed over the destination, and the directory
flushed. A process killed at any moment leaves the old file or none, never a partial one.

- :func:`atomic_write` ``(path, parts)``: small files, the bytes given at once;
- :class:`AtomicFile` ``(path, inputs=())``: big files, streamed (``.write``, or by name through
  ``.tmp`` for writers that open a path themselves); ``commit()`` publishes, ``abort()`` removes;
  as a context manager it commits on success and aborts on any exception or interrupt.

The temporary file is ``.NAME.<pid>.<random>.part``; opening a new one first removes the temporary
files of ``NAME`` left by writers that are dead (killed with SIGKILL, power loss). ``inputs`` are
files the output must not replace (checked by inode, so hard links and symlinks count). Failures are
one :class:`AtomicWriteError` line (also an ``OSError``); cleaning up never masks the first error.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Iterable

from .errors import GGUFRuntimeError


class AtomicWriteError(GGUFRuntimeError, OSError):
    """The output cannot be written (read-only, missing folder, full disk) or would replace an input."""

    __str__ = Exception.__str__


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(path) -> list[Path]:
    """Remove the temporary files of ``path`` whose writer process is gone; returns them."""
    path = Path(path)
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)(\.[0-9a-f]+)?\.part$")
    gone = []
    try:
        entries = list(os.scandir(path.parent if str(path.parent) else "."))
    except OSError:
        return gone
    for e in entries:
        m = pat.match(e.name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(e.path)
                gone.append(Path(e.path))
            except OSError:
                pass
    return gone


def check_not_input(path, inputs: Iterable) -> None:
    """Refuse an output that is one of ``inputs`` (same file: same inode, hard links included)."""
    path = Path(path)
    for inp in inputs:
        try:
            same = os.path.samefile(path, inp)
        except OSError:  # one of them does not exist
            same = False
        if same:
            raise AtomicWriteError(f"{path}: output would overwrite the input {inp}")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file that appears at ``path`` complete or not at all (see the module docstring)."""

    def __init__(self, path, inputs: Iterable = ()):
        self.path = Path(path)
        check_not_input(self.path, inputs)
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise AtomicWriteError(f"{self.path}: the output folder {folder} does not exist")
        if self.path.is_dir():
            raise AtomicWriteError(f"{self.path}: is a directory")
        remove_stale(self.path)
        self.tmp = folder / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666 & ~_umask())
        except OSError as e:
            raise AtomicWriteError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self.f = os.fdopen(fd, "wb")
        self.done = False

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.abort()
            raise AtomicWriteError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def commit(self) -> Path:
        """Flush the data to disk and rename the file into place."""
        if self.done:
            return self.path
        try:
            self.f.flush()
            os.fsync(self.f.fileno())  # also covers bytes written through another handle of .tmp
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise AtomicWriteError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self.done = True
        _fsync_dir(self.path.parent if str(self.path.parent) else Path("."))
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (errors while cleaning up are ignored: they must not mask the cause)."""
        if self.done:
            return
        self.done = True
        try:
            self.f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path, parts: Iterable[bytes], inputs: Iterable = ()) -> None:
    """Write the byte strings ``parts`` to ``path`` atomically."""
    with AtomicFile(path, inputs) as f:
        for b in parts:
            f.write(b)
