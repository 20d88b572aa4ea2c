"""One atomic writer for every file the project writes: a temporary file in the destination's
directory, written, flushed to disk, then renamed over the destination. A process killed at any
moment leaves the old file or none, never a partial one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write(path, parts: Iterable[bytes]) -> None:
    """Write the byte strings ``parts`` to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for b in parts:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
