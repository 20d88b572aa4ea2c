"""The tensors of a checkpoint folder, read one at a time.

safetensors files are memory-mapped (``safe_open``), single or sharded through
``model.safetensors.index.json``; ``pytorch_model.bin`` (single or sharded) is read only with
``torch.load(weights_only=True, mmap=True)``, never as an arbitrary pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gguf_runtime.errors import ConvertError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


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
                    self._open[f] = safe_open(str(path), framework="pt")
                else:
                    self._open[f] = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
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
