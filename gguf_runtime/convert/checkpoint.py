"""The tensors of a checkpoint folder, read one at a time.

safetensors files are memory-mapped (``safe_open``), single or sharded through
``model.safetensors.index.json``; ``pytorch_model.bin`` (single or sharded) is read only with
``torch.load(weights_only=True, mmap=True)``, never as an arbitrary pickle: a pickle that would
import or call anything but tensors is refused with one line. safetensors headers are validated
(:func:`check_safetensors`) before the library maps the file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from gguf_runtime.errors import ConvertError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ST_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header against the file before the library maps it: header
    length inside the file, a JSON object of entries with a known dtype, a shape of non-negative
    ints, and data offsets inside the data area, as long as the shape says, never overlapping."""
    def bad(msg: str) -> ConvertError:
        return ConvertError(f"{path}: not a valid safetensors file ({msg})")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, no header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _ST_MAX_HEADER:
                raise bad(f"header length {n} exceeds the file ({size} bytes)")
            raw = fh.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read weights ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size, spans = size - 8 - n, []
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict) or not all(isinstance(v, str) for v in e.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(e, dict) or e.get("dtype") not in _ST_SIZES:
            raise bad(f"tensor {name!r} has no known dtype")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has a bad shape {str(shape)[:60]}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_size):
            raise bad(f"tensor {name!r} data offsets {str(offs)[:60]} lie outside the data ({data_size} bytes)")
        if offs[1] - offs[0] != math.prod(shape) * _ST_SIZES[e["dtype"]]:
            raise bad(f"tensor {name!r} of shape {shape} {e['dtype']} does not fill its {offs[1] - offs[0]} bytes")
        if offs[1] > offs[0]:
            spans.append((offs[0], offs[1], name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"tensors {n0!r} and {n1!r} overlap")


def _parts(d: Path, prefix: str, suffix: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))


class Checkpoint:
    """Names, shapes and data of the tensors in ``model_dir``, loaded lazily and one at a time."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        st = self.dir / "model.safetensors.index.json"
        pt = self.dir / "pytorch_model.bin.index.json"
        if st.is_file() or _parts(self.dir, "model", ".safetensors"):
            self.kind, (files, index) = "safetensors", self._files(st, "model", ".safetensors")
        elif pt.is_file() or _parts(self.dir, "pytorch_model", ".bin"):
            self.kind, (files, index) = "pytorch", self._files(pt, "pytorch_model", ".bin")
        else:
            raise ConvertError(f"{self.dir}: no model weights (model.safetensors or pytorch_model.bin)")
        self._where: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for f in files:
            h = self._handle(f)
            for name in h.keys():
                if self.kind == "safetensors" or isinstance(h[name], torch.Tensor):
                    self._where.setdefault(name, f)
        if index is not None:
            missing = sorted(set(index) - set(self._where))
            if missing:
                raise ConvertError(f"{self.dir}: {len(missing)} tensors listed in the index are missing "
                                   f"from the weight files (first: {missing[0]})")

    def _files(self, index: Path, prefix: str, suffix: str) -> tuple[list[str], dict | None]:
        """The weight files, from the index's weight_map when there is one (and that map)."""
        if not index.is_file():
            return _parts(self.dir, prefix, suffix), None
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, AssertionError):
            raise ConvertError(f"{index}: not a valid index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (self.dir / f).is_file()]
        if absent:
            raise ConvertError(f"{self.dir}: missing weight files listed in {index.name}: {', '.join(absent)}")
        return files, weight_map

    def _handle(self, f: str):
        if f not in self._open:
            path = self.dir / f
            try:
                if self.kind == "safetensors":
                    check_safetensors(path)
                    self._open[f] = safe_open(str(path), framework="pt")
                else:
                    self._open[f] = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            except ConvertError:
                raise
            except Exception as e:  # noqa: BLE001 - any loader failure is one line
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConvertError(f"{path}: cannot read weights ({msg[:200]})") from None
            if self.kind == "pytorch" and not isinstance(self._open[f], dict):
                raise ConvertError(f"{path}: not a state dict of tensors")
        return self._open[f]

    def names(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the meta device with the stored shape and dtype (no data read)."""
        h = self._handle(self._where[name])
        if self.kind == "safetensors":
            sl = h.get_slice(name)
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise ConvertError(f"{name}: unsupported tensor dtype {sl.get_dtype()}")
            return torch.empty(sl.get_shape(), dtype=dt, device="meta")
        t = h[name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def load(self, name: str) -> torch.Tensor:
        h = self._handle(self._where[name])
        return h.get_tensor(name) if self.kind == "safetensors" else h[name]
