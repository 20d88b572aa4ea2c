"""Streaming GGUF output: tensor infos first, then each tensor's data as it is produced, into a
temporary file beside the target that is renamed only once complete. A failure or an interrupt
(Ctrl-C, SIGTERM) removes the temporary file, so no partial output is ever left behind."""
from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

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
               progress: bool = True, label: str = "writing") -> Path:
    """Write ``w``'s metadata, the ``plans`` tensor infos (already added) and the arrays ``data``
    yields, in plan order, to ``path`` through a temporary file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConvertError(f"{path.parent}: output folder does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with _sigterm_as_interrupt():
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with _progress(progress, sum(p.nbytes for p in plans), label) as advance:
                for plan in plans:
                    name, arr = next(data)
                    arr = np.ascontiguousarray(arr)
                    if name != plan.name or arr.nbytes != plan.nbytes:
                        raise ConvertError(f"{name}: produced {arr.nbytes} bytes, planned {plan.name} with {plan.nbytes}")
                    w.write_tensor_data(arr)
                    advance(arr.nbytes)
            w.close()
            os.replace(tmp, path)
    except OSError as e:
        raise ConvertError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path
