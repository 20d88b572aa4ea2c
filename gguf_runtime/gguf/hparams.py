"""One reader of a model's hyperparameters: every missing or mis-typed key is one line naming it.

Models read ``{arch}.*`` keys through :class:`HParams`, never ``f.get`` with casts: a missing key,
a value of the wrong type (a string where an int belongs, a FLOAT32 head count of 4.5), or one out of
its range (``head_count = 0``, ``block_count = 2^32 - 1``) is a ``GGUFFormatError`` such as
``model.gguf: missing llama.embedding_length`` instead of a ``TypeError`` deep in a model.
"""
from __future__ import annotations

import math

from ..errors import GGUFFormatError
from .reader import GGUFFile

_MISSING = object()
MAX_LAYERS = 4096  # larger block counts are refused (every model builds its layers up front)
MAX_DIM = 1 << 24  # any single dimension read from metadata


class HParams:
    """Typed access to ``f``'s metadata; keys without a dot-prefix are relative to ``{arch}.``."""

    def __init__(self, f: GGUFFile, arch: str | None = None):
        self.f = f
        self.arch = arch or f.arch
        self.where = f.path.name

    def key(self, k: str) -> str:
        return k if k.startswith(("general.", "tokenizer.")) else f"{self.arch}.{k}"

    def fail(self, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.where}: {msg}")

    def raw(self, k: str, default=_MISSING):
        v = self.f.metadata.get(self.key(k), _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise self.fail(f"missing {self.key(k)}")
            return default
        return v

    def has(self, k: str) -> bool:
        return self.key(k) in self.f.metadata

    def int(self, k: str, default=_MISSING, lo: int = 1, hi: int = MAX_DIM) -> int:
        """An integer in ``[lo, hi]``; a float or bool value is refused (a head count of 4.5 is an error,
        not 4 heads)."""
        v = self.raw(k, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{self.key(k)} = {_show(v)} must be an integer")
        if not lo <= v <= hi:
            raise self.fail(f"{self.key(k)} = {v} is out of range [{lo}, {hi}]")
        return v

    def float(self, k: str, default=_MISSING, lo: float = -math.inf, hi: float = math.inf) -> float:
        v = self.raw(k, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(f"{self.key(k)} = {_show(v)} must be a number")
        v = float(v)
        if not (lo <= v <= hi) or math.isnan(v):
            raise self.fail(f"{self.key(k)} = {v} is out of range [{lo}, {hi}]")
        return v

    def bool(self, k: str, default=_MISSING) -> bool:
        v = self.raw(k, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, bool):
            raise self.fail(f"{self.key(k)} = {_show(v)} must be a boolean")
        return v

    def str(self, k: str, default=_MISSING) -> str:
        v = self.raw(k, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise self.fail(f"{self.key(k)} = {_show(v)} must be a string")
        return v

    def per_layer(self, k: str, n_layer: int, default=_MISSING, lo: int = 0, hi: int = MAX_DIM) -> list[int]:
        """An integer or an array of ``n_layer`` integers (llama.cpp's per-layer hparams, such as
        ``attention.head_count_kv`` in hybrid files), as a list of ``n_layer``."""
        v = self.raw(k, default)
        if v is default and default is not _MISSING:
            v = default
        vals = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else [v] * n_layer
        vals = [x.item() if hasattr(x, "item") else x for x in vals]
        if len(vals) != n_layer:
            raise self.fail(f"{self.key(k)} has {len(vals)} values for {n_layer} layers")
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int):
                raise self.fail(f"{self.key(k)} = {_show(x)} must be an integer")
            if not lo <= x <= hi:
                raise self.fail(f"{self.key(k)} = {x} is out of range [{lo}, {hi}]")
        return vals

    def n_layer(self) -> int:
        """``block_count``, checked against the tensors: the last layer must have tensors
        (``blk.{n-1}.*``, or ``enc.blk`` / ``dec.blk``), so that a lying count fails at once instead
        of building thousands of empty layers first."""
        n = self.int("block_count", hi=MAX_LAYERS)
        top = self._top_block()
        if top < n - 1:
            have = f"the tensors stop at blk.{top}" if top >= 0 else "the file has no blk.N tensors"
            raise self.fail(f"{self.key('block_count')} = {n} but {have}")
        return n

    def _top_block(self) -> int:
        top = -1
        for name in self.f.tensor_infos:
            parts = name.split(".")
            for i in range(len(parts) - 2):
                if parts[i] == "blk" and parts[i + 1].isdigit():
                    top = max(top, int(parts[i + 1]))
                    break
        return top

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        info = self.f.tensor_infos.get(name)
        if info is None:
            raise self.fail(f"{self.arch} tensor missing: {name}")
        return info.shape

    def has_tensor(self, name: str) -> bool:
        return name in self.f.tensor_infos

    def divides(self, a: int, b: int, what: str) -> None:
        """Check ``b % a == 0`` (e.g. heads divide the embedding), naming ``what``."""
        if b % a:
            raise self.fail(f"inconsistent {self.arch} metadata: {what}")


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
