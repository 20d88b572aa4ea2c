"""Calibration: find how this machine computes products row-invariantly (< 2 s, once per thread count).

Linear layers: the first backend and row-padding rule in ``LINEAR_RULES`` (oneDNN's inner product on
weights reordered once into its blocked layout, then on plain weights, then the BLAS sgemm; oneDNN
is row-invariant from 2 rows and, on the AVX-512 machines measured, 1.3-2x faster than MKL's sgemm,
whose small-row path is slow) under which every row computed inside a small call (1..17 rows, at
several offsets, padded by the rule) equals the same row computed inside one large call, for
float32 and bfloat16 and a few shapes (including K > 1024, where oneDNN splits the reduction of a
single row across threads). Batched ``torch.matmul`` (attention's per-block products) gets its own
padding rule the same way. If no linear rule passes, linears run in float64 and round back (the
safe path). The result is a :class:`~gguf_runtime.numerics.Rule`, memoised per thread count: it
describes the machine, not a mode, and never changes what a row computes to.

Rules are also cached on disk, in ``$GGUF_RUNTIME_CACHE/calibration.json`` (default
``~/.cache/gguf-runtime``), keyed by the CPU model and flags, the torch version and its
oneDNN/BLAS build, the thread count and the prepack setting, so a new process starts without the
calibration run (~1-2 s idle, much more on a busy machine). Delete the file to clear it, or set
``GGUF_RUNTIME_CALIBRATION=fresh`` to ignore and rewrite it. A rule read from the cache is one
this very key calibrated to, so results are the same either way (tested).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..numerics import Rule
from .linear import mm, pad_dim, padded_rows

KV_BLOCK = 64  # attention's key block (kernels.attention imports it from here)

LINEAR_RULES = [("onednn-packed", 1, 1), ("onednn-packed", 2, 1), ("onednn-packed", 4, 4),
                ("onednn", 1, 1), ("onednn", 2, 1), ("onednn", 4, 4), ("blas", 1, 1), ("blas", 4, 4), ("blas", 8, 8),
                ("blas", 16, 1), ("blas", 16, 16), ("blas", 32, 32)]
MATMUL_RULES = [(4, 4), (8, 8), (16, 1), (16, 16), (32, 32)]
CALIBRATION_VERSION = "2"  # bumped when the tests change, so cached rules are made again

_RULES: dict[tuple[int, bool], Rule] = {}
_REPORTS: dict[tuple[int, bool], dict] = {}


def rule(threads: int, prepack: bool = True) -> Rule:
    """The calibrated rule for ``threads`` (memoised, and cached on disk: see the module docstring)."""
    key = (threads, prepack)
    r = _RULES.get(key)
    if r is None:
        r = _load(threads, prepack)
        if r is None:
            r = calibrate(prepack)
            _store(threads, prepack, r)
        _RULES[key] = r
    return r


def cache_path() -> Path:
    return Path(os.environ.get("GGUF_RUNTIME_CACHE", Path.home() / ".cache" / "gguf-runtime")) / "calibration.json"


def machine_key(threads: int, prepack: bool) -> str:
    """What a rule depends on: the CPU (model name and flags), torch and its kernels' builds, threads."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read(1 << 16)
        cpu = "|".join(sorted({ln.split(":", 1)[1].strip() for ln in info.splitlines()
                               if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    parts = [cpu, platform.machine(), torch.__version__, torch.__config__.show(), str(threads), str(prepack),
             CALIBRATION_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _load(threads: int, prepack: bool) -> Rule | None:
    if os.environ.get("GGUF_RUNTIME_CALIBRATION") == "fresh":
        return None
    hit = _read_cache().get(machine_key(threads, prepack))
    try:
        r = Rule(**hit["rule"])
        _REPORTS[(threads, prepack)] = {**hit["report"], "cached": True}
        return r
    except (TypeError, KeyError):  # absent, or an entry of another format
        return None


def _store(threads: int, prepack: bool, r: Rule) -> None:
    from ..atomic import atomic_write

    data = _read_cache()
    data[machine_key(threads, prepack)] = {"rule": asdict(r), "report": _REPORTS[(threads, prepack)]}
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_path(), [json.dumps(data, indent=1, sort_keys=True).encode()])
    except OSError:  # a read-only home: calibrate again next time
        pass


def report(threads: int | None = None, prepack: bool = True) -> dict:
    """What calibration found (backend, padding, timings; ``cached`` when read from disk), calibrating
    if needed."""
    key = (threads or torch.get_num_threads(), prepack)
    rule(*key)
    return _REPORTS[key]


def _rows_invariant(fn, x: torch.Tensor, counts, offsets, dim: int = 0) -> bool:
    ref = fn(x)
    return all(torch.equal(fn(x.narrow(dim, o, n)), ref.narrow(dim, o, n)) for n in counts for o in offsets)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(x.dtype)


_COUNTS = (1, 2, 3, 5, 7, 9, 13, 17)


def _linear_mats(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(160, k, generator=g), torch.randn(n, k, generator=g))
            for k, n in [(256, 384), (64, 64), (576, 96), (1536, 64)]]


def _linear_ok(backend: str, min_rows: int, multiple: int, mats) -> bool:
    """Whether linears on ``backend`` with rows padded by this rule give each row the same bits
    whatever rows share the product (float32 and bfloat16)."""
    def padded(x, w):
        return mm(pad_dim(x, padded_rows(x.shape[0], min_rows, multiple), 0), w, None, backend)[:x.shape[0]]
    try:
        return all(_rows_invariant(lambda x, w=w.to(dt): padded(x, w), x.to(dt), _COUNTS, (0, 3))
                   for x, w in mats for dt in (torch.float32, torch.bfloat16))
    except RuntimeError:  # backend not built into this torch
        return False


def linear_rule_ok(backend: str, min_rows: int, multiple: int) -> bool:
    """The self-test :func:`calibrate` runs for one linear rule (for tests of the fallback paths)."""
    return _linear_ok(backend, min_rows, multiple, _linear_mats(torch.Generator().manual_seed(1234)))


def calibrate(prepack: bool = True) -> Rule:
    """Run the tests with the current thread count and return the rule (see the module docstring)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1234)
    mats = _linear_mats(g)
    counts, offsets = _COUNTS, (0, 3)
    chosen = next(((b, lo, mult) for b, lo, mult in LINEAR_RULES
                   if (prepack or b != "onednn-packed") and _linear_ok(b, lo, mult, mats)), None)
    qs = torch.randn(2, 3, 2, 160, 64, generator=g)
    kb = torch.randn(2, 3, 2, 64, 64, generator=g)
    # attention's two products for head sizes 32, 64 and 128 (scores: rows x d @ d x 64 keys; values:
    # rows x 64 keys @ 64 x d): the kernel a BLAS picks for few rows depends on these shapes
    prods = [(qs, kb), (qs, kb.transpose(-1, -2))]
    for d in (32, 128):  # keys as the cache holds them, (keys, d), transposed into the product
        prods += [(torch.randn(2, 3, 2, 160, d, generator=g), torch.randn(2, 3, 2, KV_BLOCK, d, generator=g).transpose(-1, -2)),
                  (torch.randn(2, 3, 2, 160, KV_BLOCK, generator=g), torch.randn(2, 3, 2, KV_BLOCK, d, generator=g))]
    mm_chosen = None
    for min_rows, multiple in MATMUL_RULES:
        def bmm(q, k, min_rows=min_rows, multiple=multiple):
            return torch.matmul(pad_dim(q, padded_rows(q.shape[-2], min_rows, multiple), -2), k)[..., :q.shape[-2], :]
        if all(_rows_invariant(lambda x, k=k.to(dt): bmm(x, k), x.to(dt), counts, offsets, dim=-2)
               for x, k in prods for dt in (torch.float32, torch.bfloat16)):
            mm_chosen = (min_rows, multiple)
            break
    # attention scores in one product per query tile: a key's score must not depend on how many
    # whole key blocks share the product (nor on where they start)
    mm_cols = mm_chosen is not None
    if mm_cols:
        kt = torch.randn(2, 3, 64, 8 * KV_BLOCK, generator=g)
        for dt in (torch.float32, torch.bfloat16):
            for rows in (4, 12, 36, 192):
                qq = pad_dim(qs[:, :, 0, :rows].to(dt), padded_rows(rows, *mm_chosen), -2)
                kk = kt.to(dt)
                full = torch.matmul(qq, kk)
                mm_cols = mm_cols and all(torch.equal(torch.matmul(qq, kk[..., o:o + n]), full[..., o:o + n])
                                          for n in range(KV_BLOCK, kk.shape[-1] + 1, KV_BLOCK)
                                          for o in range(0, kk.shape[-1] - n + 1, 3 * KV_BLOCK))
    norm_ok = all(_rows_invariant(lambda x, w=w[0].to(dt): _rms(x, w), x.to(dt), counts, offsets)
                  for x, w in mats for dt in (torch.float32, torch.bfloat16))
    backend, min_rows, multiple = chosen or ("blas", 16, 16)
    mm_min, mm_mult = mm_chosen or (32, 32)
    r = Rule(backend, min_rows, multiple, mm_min, mm_mult, mm_cols, chosen is None)
    _REPORTS[(torch.get_num_threads(), prepack)] = {
        "backend": backend, "min_rows": min_rows, "multiple": multiple, "matmul_min_rows": mm_min,
        "matmul_multiple": mm_mult, "safe_path": chosen is None, "matmul_invariant": mm_chosen is not None,
        "score_columns_invariant": mm_cols, "norms_invariant": norm_ok, "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 3)}
    return r
