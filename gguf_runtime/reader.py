"""GGUF reading through gguf-py's memory-mapped GGUFReader.

PLACEHOLDER validation (issue 2 hardens it: header checks before gguf-py parses, one-line errors).
The API is final: GGUFFile(path) -> .metadata (dict of plain Python values), .arch,
.tensor_infos (dict name -> TensorInfo), .raw(name) (uint8 view, no copy), .tensor(name, device, dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from .dequant import dequantize
from .errors import GGUFFormatError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    n_bytes: int
    offset: int  # absolute offset of the data in the file


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFFormatError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGUFFormatError(f"{self.path}: is a directory, not a GGUF file")
        try:
            self._reader = GGUFReader(str(self.path), "r")
        except Exception as e:  # noqa: BLE001 - turned into one line
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.metadata: dict = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()
        self.tensor_infos: dict[str, TensorInfo] = {}
        self._tensors = {}
        for t in self._reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self.tensor_infos[t.name] = TensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape, int(t.n_bytes), int(t.data_offset))
            self._tensors[t.name] = t

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """Metadata value; ``{arch}`` in the key is replaced by the architecture name."""
        return self.metadata.get(key.replace("{arch}", self.arch), default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat uint8 memory-mapped view (no copy)."""
        return self._tensors[name].data.reshape(-1).view(np.uint8)

    def tensor(self, name: str, device=None, dtype=torch.float32) -> torch.Tensor:
        info = self.tensor_infos[name]
        return dequantize(self.raw(name), info.qtype, info.shape, device=device, dtype=dtype)
