"""Streaming GGUF output: tensor infos first, then each tensor's data as it is produced, into a
temporary file beside the target (:class:`gguf_runtime.atomic.AtomicFile`) that is flushed to disk and
renamed only once complete. A failure or an interrupt (Ctrl-C, SIGTERM) removes the temporary file; a
SIGKILL leaves it, and the next write to the same name removes it. No partial output is ever visible
under the target's name."""
from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from gguf_runtime.atomic import AtomicFile, AtomicWriteError
from gguf_runtime.errors import ConvertError


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # torch order, outermost first
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size if self.shape else size


def add_infos(w: gguf.GGUFWriter, plans: Iterable[TensorPlan]) -> None:
    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)


@contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def write_gguf(w: gguf.GGUFWriter, path: Path, plans: list[TensorPlan], data: Iterator[tuple[str, np.ndarray]],
               progress: bool = True, label: str = "writing", inputs: Iterable = ()) -> Path:
    """Write ``w``'s metadata, the ``plans`` tensor infos (already added) and the arrays ``data``
    yields, in plan order, to ``path`` through :class:`~gguf_runtime.atomic.AtomicFile` (never over
    one of ``inputs``)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConvertError(f"{path.parent}: output folder does not exist")
    try:
        with _sigterm_as_interrupt():
            out = AtomicFile(path, inputs)
            try:
                w.write_header_to_file(path=out.tmp)  # gguf-py opens the temporary file by name
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                with _progress(progress, sum(p.nbytes for p in plans), label) as advance:
                    for plan in plans:
                        name, arr = next(data)
                        arr = np.ascontiguousarray(arr)
                        if name != plan.name or arr.nbytes != plan.nbytes:
                            raise ConvertError(f"{name}: produced {arr.nbytes} bytes, planned {plan.name} "
                                               f"with {plan.nbytes}")
                        w.write_tensor_data(arr)
                        advance(arr.nbytes)
                w.close()
                out.commit()
            finally:
                _close_quietly(w)
                out.abort()  # no-op once committed
    except AtomicWriteError as e:
        raise ConvertError(str(e)) from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def _close_quietly(w: gguf.GGUFWriter) -> None:
    """Close gguf-py's handle without letting a second failure (a full or read-only disk) mask the first."""
    try:
        w.close()
    except OSError:
        for f in getattr(w, "fout", None) or []:
            try:
                f.close()
            except OSError:
                pass
