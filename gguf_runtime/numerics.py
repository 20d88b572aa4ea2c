"""How a context computes: one frozen value, passed to the context, never a process-wide switch.

``Numerics`` says whether results are batch-invariant (the default), whether activations and the
KV cache are rounded as llama.cpp's CPU backend rounds them (``ggml``), the K/V cache dtypes
(``-ctk``/``-ctv``), and which row-padding rule linears use (``rule``: ``None`` means the rule
calibrated for this machine and thread count by :func:`gguf_runtime.kernels.calibrate.rule`).

A :class:`~gguf_runtime.context.Context` holds one and computes every ubatch inside
``numerics.use(value)``; the kernels read it with :func:`current`. The value in force is a
``ContextVar``, scoped to the ``with`` block (and to its thread or task), so two contexts with
different numerics in one process each compute exactly what they compute alone, and a saved state
can record the numerics it was made with (:meth:`Numerics.describe`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from .errors import GGUFRuntimeError

CACHE_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


@dataclass(frozen=True)
class Rule:
    """How products are computed row-invariantly on this machine (found by calibration).

    ``backend``: the linear kernel (``onednn-packed``, ``onednn``, ``blas``); a linear over n rows
    computes ``max(n, min_rows)`` rounded up to ``multiple`` rows. ``mm_*``: the same for batched
    matmuls (attention); ``mm_cols``: a score column does not depend on how many key blocks share
    the product. ``f64``: no rule held, linears run in float64 and round back."""
    backend: str = "blas"
    min_rows: int = 16
    multiple: int = 16
    mm_min_rows: int = 32
    mm_multiple: int = 32
    mm_cols: bool = False
    f64: bool = False


@dataclass(frozen=True)
class Numerics:
    invariant: bool = field(default_factory=lambda: _env_flag("GGUF_RUNTIME_INVARIANT"))
    ggml: bool = False
    cache_k: torch.dtype | None = None  # None: the compute dtype (f16 under ggml, as llama.cpp's default)
    cache_v: torch.dtype | None = None
    prepack: bool = field(default_factory=lambda: _env_flag("GGUF_RUNTIME_PREPACK"))
    rule: Rule | None = None  # None: calibrated for this machine and thread count

    @classmethod
    def from_flags(cls, invariant: bool = True, ggml: bool = False, ctk: str | None = None,
                   ctv: str | None = None) -> "Numerics":
        """The CLI's ``--[no-]invariant --ggml-numerics -ctk -ctv``; a bad cache type is a one-line error."""
        def dtype(flag: str, v: str | None):
            if v is None:
                return None
            if v not in CACHE_TYPES:
                raise GGUFRuntimeError(f"unknown {flag} '{v}' (use f32, f16 or bf16)")
            return CACHE_TYPES[v]
        return cls(invariant=invariant, ggml=ggml, cache_k=dtype("-ctk", ctk), cache_v=dtype("-ctv", ctv))

    def kv_dtypes(self, compute: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The K and V cache dtypes for a model computing in ``compute``."""
        dflt = torch.float16 if self.ggml else compute
        return self.cache_k or dflt, self.cache_v or dflt

    def linear_rule(self) -> Rule:
        if self.rule is not None:
            return self.rule
        from .kernels.calibrate import rule

        return rule(torch.get_num_threads(), self.prepack)

    def replace(self, **kw) -> "Numerics":
        return replace(self, **kw)

    def describe(self) -> dict[str, str]:
        """A flat description (strings), for state files and logs."""
        name = lambda t: "" if t is None else str(t).removeprefix("torch.")  # noqa: E731
        return {"invariant": str(self.invariant), "ggml": str(self.ggml), "cache_k": name(self.cache_k),
                "cache_v": name(self.cache_v)}


_CURRENT: ContextVar[Numerics | None] = ContextVar("gguf_runtime_numerics", default=None)
_DEFAULT = Numerics()


def current() -> Numerics:
    """The numerics in force: those of the innermost :func:`use` block, else the defaults."""
    nx = _CURRENT.get()
    return _DEFAULT if nx is None else nx


@contextmanager
def use(nx: Numerics) -> Iterator[Numerics]:
    token = _CURRENT.set(nx)
    try:
        yield nx
    finally:
        _CURRENT.reset(token)


def enter(nx: Numerics) -> Numerics:
    """Put ``nx`` in force for the rest of the current thread (or task), without a ``with`` block:
    for a CLI command or a script, whose process does one job. Contexts capture the numerics in
    force when they are created."""
    _CURRENT.set(nx)
    return nx
