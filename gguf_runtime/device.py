"""Default device selection: CUDA when present, CPU otherwise."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    return torch.device(device)


def keep_host_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep freed memory for reuse.

    A forward pass allocates and frees the same activation-sized tensors over and over. By default
    glibc maps each block over 128 KiB-32 MiB freshly and returns it on free, so every new tensor
    pays a page fault per 4 KiB on first touch (about 1 us each on a VM: 1 ms for a 4 MB tensor),
    which can double the time of elementwise ops. llama.cpp avoids this by planning one buffer per
    graph; raising glibc's mmap and trim thresholds gets most of the effect for torch. Called by the
    CLI and benchmarks, not on import; a no-op (returns False) where glibc is not the C library.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31 - 1))
    except (OSError, AttributeError):
        return False
