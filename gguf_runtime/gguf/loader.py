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
    metadata: dict = field(repr=False)  # a vocabulary is 1 MB of repr: __repr__ summarises
    weights: dict[str, torch.Tensor] = field(repr=False)
    file: GGUFFile = field(repr=False)

    def __repr__(self) -> str:
        n = sum(w.numel() for w in self.weights.values())
        dts = sorted({str(w.dtype).removeprefix("torch.") for w in self.weights.values()})
        devs = sorted({str(w.device) for w in self.weights.values()})
        return (f"LoadedGGUF({str(self.path)!r}, arch={self.arch!r}, metadata={len(self.metadata)} keys, "
                f"weights={len(self.weights)} tensors / {n:,} values ({', '.join(dts) or '-'} on {', '.join(devs) or '-'}))")

    def get(self, key: str, default=None):
        return self.file.get(key, default)


def load(path, device=None, dtype=torch.float32, names=None) -> LoadedGGUF:
    """Open ``path`` and dequantize its tensors (all, or ``names``) onto ``device`` as ``dtype``."""
    f = GGUFFile(path)
    dev = resolve_device(device)
    wanted = list(f.tensor_infos) if names is None else [f.info(n).name for n in names]  # unknown names fail first
    weights = {n: f.tensor(n, device=dev, dtype=dtype) for n in wanted}
    return LoadedGGUF(Path(path), f.arch, f.metadata, weights, f)
