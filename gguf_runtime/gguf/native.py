"""The native dequantization loops (``_dequant.c``): compiled once per machine, loaded with ctypes.

``kernel(qtype)`` returns a function ``(blocks, out)`` that fills ``out`` ((n, block_size) float32,
contiguous, CPU) from ``blocks`` ((n, type_size) uint8, contiguous, CPU) in one fused pass per
block, with gguf-py's float32 operations in gguf-py's order (bit-identical results; see the C
file), or ``None`` when there is no native loop for the type or no usable library.

The library is built on first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``;
``-O3 -ffp-contract=off -march=native``, with OpenMP when the compiler has it) into
``$GGUF_RUNTIME_CACHE/native/`` (default ``~/.cache/gguf-runtime``), named by a hash of the source,
the compiler (path, size, mtime), the flags and the CPU's model and flags, and published
atomically (a failed build leaves a ``.failed`` note instead, so it is not retried); later
processes only load it. Blocks are split over ``torch.get_num_threads()`` threads; each block is
computed alone, so the thread count never changes a result.

``matmul(qtype)`` returns the fused dequantize-and-multiply of the same library (``qmm_<type>``:
``--weights quant``), ``lanes()`` its partial sums per output; ``attention()`` its fixed-order
attention (``kernels.attention``'s CPU float32 path), ``nll()`` its row-invariant token
log-likelihoods (``tools.perplexity.token_nll`` on CPU float32).

``GGUF_RUNTIME_NATIVE=0`` turns the native path off (the torch kernels of ``dequant`` run instead).
No compiler, a failed build or a library that does not load also leaves the torch kernels in
charge; the reason is logged at debug level, once per process.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

T = GGMLQuantizationType
log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_dequant.c")
ABI = 12
TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.MXFP4, T.NVFP4,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.TQ1_0, T.TQ2_0,
         T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M)
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])  # first that builds


def _grid(cls) -> np.ndarray:
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


def _iq1_rows() -> np.ndarray:
    """IQ1 grid rows plus delta, then minus delta (gguf-py's float32 sums)."""
    g = _grid(gq.IQ1_S)
    return np.ascontiguousarray(np.concatenate([g + gq.IQ1_S.delta, g - gq.IQ1_S.delta]), dtype=np.float32)


@lru_cache(maxsize=None)
def _tables() -> tuple[np.ndarray, ...]:
    """gguf-py's own grids and sign patterns, handed to the library, which keeps the pointers (the
    arrays live as long as the process: this cache holds them)."""
    return (_grid(gq.IQ3_XXS), _grid(gq.IQ3_S), _grid(gq.IQ2_XXS), _grid(gq.IQ2_XS), _grid(gq.IQ2_S),
            _iq1_rows(), np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy())


def enabled() -> bool:
    return os.environ.get("GGUF_RUNTIME_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return Path(os.environ.get("GGUF_RUNTIME_CACHE", Path.home() / ".cache" / "gguf-runtime")) / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read(1 << 16)
        return "|".join(sorted({ln.split(":", 1)[1].strip() for ln in info.splitlines()
                                if ln.startswith(("model name", "flags", "Features", "CPU part"))}))
    except OSError:
        return platform.processor()


def _key(cc: str, flags: list[str]) -> str:
    real = os.path.realpath(cc)
    st = os.stat(real)  # the compiler's identity without running it (start-up cost)
    parts = [SOURCE.read_text(), real, f"{st.st_size}:{st.st_mtime_ns}", " ".join(flags), _cpu(), platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _build(cc: str, flags: list[str], so: Path) -> bool:
    from ..atomic import AtomicFile, atomic_write

    so.parent.mkdir(parents=True, exist_ok=True)
    f = AtomicFile(so)
    try:
        r = subprocess.run([cc, *_BASE_FLAGS, *flags, "-o", str(f.tmp), str(SOURCE)],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        f.abort()
        log.debug("native dequant: %s %s failed: %s", cc, " ".join(flags), e)
        return False
    if r.returncode != 0:
        f.abort()
        log.debug("native dequant: %s %s failed: %s", cc, " ".join(flags), r.stderr.strip()[-500:])
        try:  # remembered, so later processes do not try this build again
            atomic_write(so.with_suffix(".failed"), [r.stderr.encode()[-4000:]])
        except OSError:
            pass
        return False
    f.commit()
    return True


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded library (built first if needed), or ``None`` (reason logged at debug level)."""
    cc = _compiler()
    if cc is None:
        log.debug("native dequant: no C compiler found (set CC); using the torch kernels")
        return None
    for flags in _FLAG_SETS:
        so = cache_dir() / f"dequant-{_key(cc, flags)}.so"
        try:
            if not so.exists() and (so.with_suffix(".failed").exists() or not _build(cc, flags, so)):
                continue
            lib = ctypes.CDLL(str(so))
            if lib.dq_abi() != ABI:
                raise OSError(f"ABI {lib.dq_abi()}, expected {ABI}")
        except OSError as e:
            log.debug("native dequant: cannot use %s: %s", so, e)
            continue
        lib.dq_set_tables.argtypes = [ctypes.c_void_p] * len(_tables())
        lib.dq_set_tables(*(t.ctypes.data for t in _tables()))
        for t in TYPES:
            fn = getattr(lib, "dq_" + t.name.lower())
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            fn.restype = None
        lib.attn_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2 + [
            ctypes.c_void_p, ctypes.c_int]
        lib.attn_f32.restype = None
        lib.attn_kv_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 11 + [ctypes.c_float] * 2 + [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.attn_kv_f32.restype = None
        lib.nll_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.nll_f32.restype = None
        P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.rms_f32.argtypes = [P, P, I, I, F, P, ctypes.c_int]
        lib.rope_f32.argtypes = [P, P, P, I, I, I, I, ctypes.c_int, P, ctypes.c_int]
        lib.silu_f32.argtypes = [P, P, I, P, ctypes.c_int]
        lib.gelu_tanh_f32.argtypes = [P, P, I, P, ctypes.c_int]
        for fn in (lib.rms_f32, lib.rope_f32, lib.silu_f32, lib.gelu_tanh_f32):
            fn.restype = None
        for name in QMM_TYPES.values():
            fn = getattr(lib, "qmm_" + name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int]
            fn.restype = None
        lib.qmm_many.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p,
                                                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        lib.qmm_many.restype = None
        log.debug("native dequant: %s (%s)", so, " ".join(flags) or "no extra flags")
        return lib
    return None


def _lib() -> ctypes.CDLL | None:
    """The library when the native path is on (``GGUF_RUNTIME_NATIVE``) and it loads, else ``None``."""
    return library() if enabled() else None


QMM_TYPES = {T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1", T.Q8_0: "q8_0",
             T.IQ4_NL: "iq4_nl", T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k",
             T.Q6_K: "q6_k", T.IQ4_XS: "iq4_xs", T.F32: "f32", T.F16: "f16_1", T.BF16: "bf16_1"}


def lanes() -> int:
    """The partial sums per output of :func:`matmul` (its ``K`` must be a multiple), 0 without the library."""
    lib = _lib()
    return 0 if lib is None else lib.qmm_lanes()


def matmul(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor], None] | None:
    """The fused dequantize-and-multiply for weights of ``qtype`` as ``fn(raw, n, k, x, y)``: ``y``
    ((m, n) float32) = ``x`` ((m, k) float32) @ W.T, W being ``raw`` (n rows of k / block_size blocks,
    uint8, contiguous, CPU). Each output is one fixed-order sum (see the C file), so a row's result
    does not depend on the other rows nor on the thread count. ``None`` when unavailable."""
    name = QMM_TYPES.get(qtype)
    lib = _lib() if name is not None else None
    if lib is None:
        return None
    fn = getattr(lib, "qmm_" + name)

    def run(raw: torch.Tensor, n: int, k: int, x: torch.Tensor, y: torch.Tensor) -> None:
        # the caller's contract (contiguous CPU float32 x and y, contiguous bytes): checked where
        # the weight is set up (kernels.linear.qmatmul) and the rows made (qlinear), not per call
        fn(raw.data_ptr(), n, k, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())

    return run


def matmul_group(parts: list[tuple[GGMLQuantizationType, torch.Tensor, int]], k: int):
    """:func:`matmul` of one ``x`` by several weights at once (``qmm_many``), as ``fn(x, ys)`` with
    ``ys`` one (m, n_i) float32 output per part ``(qtype, raw, n_i)`` (all ``k`` columns); each
    product exactly the single call's. ``None`` when unavailable or a type has no kernel."""
    lib = _lib()
    if lib is None or any(QMM_TYPES.get(q) is None for q, _, _ in parts):
        return None
    n = len(parts)
    fns = (ctypes.c_void_p * n)(*(ctypes.cast(getattr(lib, "qmm_" + QMM_TYPES[q]), ctypes.c_void_p).value
                                  for q, _, _ in parts))
    raws = [r for _, r, _ in parts]  # kept alive with the plan
    ws = (ctypes.c_void_p * n)(*(r.data_ptr() for r in raws))
    ns = (ctypes.c_int64 * n)(*(int(m) for _, _, m in parts))
    fn, Ptrs = lib.qmm_many, ctypes.c_void_p * n

    def run(x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        fn(n, fns, ws, ns, k, x.data_ptr(), x.shape[0], Ptrs(*(y.data_ptr() for y in ys)), torch.get_num_threads())

    run.raws = raws
    return run


def attention() -> Callable[..., None] | None:
    """The library's fixed-order attention (``attn_f32``, see the C file) as ``fn(q, kT, v, mask,
    scale, cap, out)`` on contiguous CPU float32 tensors (mask: bool), or ``None`` when unavailable."""
    lib = _lib()
    if lib is None:
        return None
    fn = lib.attn_f32

    def run(q, kT, v, mask, scale: float, cap: float, out) -> None:
        B, H, NQ, D = q.shape
        HKV, NKV, DV = v.shape[1], v.shape[2], v.shape[3]
        fn(q.data_ptr(), kT.data_ptr(), v.data_ptr(), mask.data_ptr(), B, H, HKV, NQ, NKV, D, DV,
           float(scale), float(cap), out.data_ptr(), torch.get_num_threads())

    return run


def attention_kv() -> Callable[..., None] | None:
    """The fixed-order attention on operands left in place (``attn_kv_f32``, see the C file) as
    ``fn(q, q_idx, k, v, cells, mask, scale, cap, out, out_seq)``: ``q`` (n, H, D) contiguous; ``k``
    / ``v`` CPU float32 tensors whose element ``[h, c]`` (a (D,) or (DV,) row, unit stride) is head
    h's key / value of cell c — a cache layer (HKV, CELLS, D) or a ubatch's (n, HKV, D) transposed;
    ``q_idx`` (B * NQ,) and ``cells`` (B * NKV,, -1 for a zero row) int64, ``mask`` (B, NQ, NKV) bool,
    NKV a multiple of 16; ``out`` (n, H, DV), or (B * NQ, H, DV) in group order with ``out_seq``.
    The same bits as :func:`attention` on the gathered operands. ``None`` when unavailable."""
    lib = _lib()
    if lib is None:
        return None
    fn = lib.attn_kv_f32

    def run(q, q_idx, k, v, cells, mask, scale: float, cap: float, out, out_seq: bool = False) -> None:
        B, NQ, NKV = mask.shape
        fn(q.data_ptr(), q_idx.data_ptr(), k.data_ptr(), v.data_ptr(), cells.data_ptr(), mask.data_ptr(),
           B, q.shape[1], k.shape[0], NQ, NKV, k.stride(0), k.stride(1), v.stride(0), v.stride(1), q.shape[2],
           v.shape[2], scale, cap, out.data_ptr(), int(out_seq), torch.get_num_threads())

    return run


def nll() -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor] | None:
    """The library's row-invariant ``-log softmax(logits)[target]`` (``nll_f32``, see the C file) as
    ``fn(logits, rows, targets)`` -> float64 (n,): ``logits`` (R, V) CPU float32 with unit column
    stride, ``rows`` int64 indices into it (``None``: every row), ``targets`` one int64 per scored
    row. ``None`` when unavailable."""
    lib = _lib()
    if lib is None:
        return None
    fn = lib.nll_f32

    def run(logits: torch.Tensor, rows: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.contiguous()
        if rows is not None:
            rows = rows.contiguous()
        n = targets.numel()
        if n and not (0 <= int(targets.min()) and int(targets.max()) < logits.shape[1]):
            raise IndexError(f"target token out of range for {logits.shape[1]} logits")
        out = torch.empty(n, dtype=torch.float64)
        fn(logits.data_ptr(), None if rows is None else rows.data_ptr(), n, logits.shape[1], logits.stride(0),
           targets.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    return run


def rowwise() -> ctypes.CDLL | None:
    """The library for the row-wise kernels of the CPU float32 forward (``rms_f32``, ``rope_f32``,
    ``silu_f32``, ``gelu_tanh_f32``; see the C file), called through ``kernels.elementwise`` and ``kernels.rope`` on
    contiguous float32 tensors; ``None`` when unavailable."""
    return _lib()


def kernel(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """The native loop for ``qtype`` as ``fn(blocks, out)``, or ``None`` (see the module docstring)."""
    lib = _lib() if qtype in TYPES else None
    if lib is None:
        return None
    fn = getattr(lib, "dq_" + qtype.name.lower())

    def run(b: torch.Tensor, out: torch.Tensor) -> None:
        assert b.is_contiguous() and out.is_contiguous() and out.dtype == torch.float32
        fn(b.data_ptr(), out.data_ptr(), b.shape[0], torch.get_num_threads())

    return run
