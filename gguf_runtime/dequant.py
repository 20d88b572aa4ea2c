"""Dequantization of ggml types to torch tensors.

PLACEHOLDER: goes through gguf-py's numpy reference until the vectorised torch kernels land
(issue 2). The signature is final.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _np_dequantize


def dequantize(raw, qtype: GGMLQuantizationType, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Dequantize ``raw`` (the tensor's bytes, uint8 tensor or array) of ggml type ``qtype`` into a
    tensor of ``shape`` (torch order, outermost first) on ``device`` with ``dtype``."""
    if isinstance(raw, torch.Tensor):
        raw = raw.cpu().numpy()
    arr = np.asarray(raw).view(np.uint8).reshape(-1)
    shape = tuple(int(s) for s in shape)
    out = _np_dequantize(arr.reshape(-1, arr.size // max(1, int(np.prod(shape[:-1])))) if len(shape) > 1 else arr, qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape).to(device=device, dtype=dtype)
