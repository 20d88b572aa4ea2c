"""``load(path)``: a GGUF file's metadata and dequantized weights as torch tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import resolve_device
from .reader import GGUFFile


@dataclass
class LoadedGGUF:
    path: Path
    arch: str
    metadata: dict
    weights: dict[str, torch.Tensor] = field(repr=False)
    file: GGUFFile = field(repr=False)

    def get(self, key: str, default=None):
        return self.file.get(key, default)


def load(path, device=None, dtype=torch.float32, names=None) -> LoadedGGUF:
    """Open ``path`` and dequantize its tensors (all, or ``names``) onto ``device`` as ``dtype``."""
    f = GGUFFile(path)
    dev = resolve_device(device)
    wanted = list(f.tensor_infos) if names is None else [f.info(n).name for n in names]  # unknown names fail first
    weights = {n: f.tensor(n, device=dev, dtype=dtype) for n in wanted}
    return LoadedGGUF(Path(path), f.arch, f.metadata, weights, f)
