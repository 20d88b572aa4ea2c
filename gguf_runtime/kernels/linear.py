"""``linear``: ``x @ w.T (+ b)`` whose every row is computed the same way whatever else is in the call.

Invariant numerics run on the backend calibration picks (oneDNN's inner product on weights
reordered once, else on plain weights, else the BLAS sgemm) and pad the row count up to the tile
from which that backend computes every row the same way at any offset (oneDNN: 2 rows, and 1 where
a per-shape test allows; MKL's sgemm: 4, its 1-3 row path sums in another order). Non-invariant
numerics keep the backend and drop the padding. ggml numerics round each activation row as
llama.cpp's CPU backend does for the weight's file type first (:mod:`.ggml`).

``qlinear`` (``--weights quant``) multiplies by a weight still in its GGUF type with the native fused
kernel (``gguf.native.matmul``): no padding and no calibration, since every output is one
fixed-order sum whatever the rows and threads; its bits differ from ``linear``'s (another order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .. import numerics
from . import ggml

_PACKED = WeakIdKeyDictionary()  # weight -> (version, oneDNN-blocked copy)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's inner product (the kernel torch's compiled CPU graphs use)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _packed(w: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout (kept beside the plain weight, which
    embeddings and other code still read: this doubles linear weights' host memory)."""
    version = -1 if w.is_inference() else w._version  # inference tensors cannot change in place
    hit = _PACKED.get(w)
    if hit is None or hit[0] != version:
        hit = (version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        _PACKED[w] = hit
    return hit[1]


def mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, backend: str, fresh: bool = False) -> torch.Tensor:
    """One product on ``backend`` (oneDNN only for CPU float32/bfloat16; else ``F.linear``).
    ``fresh``: ``w`` is a scratch buffer rewritten between calls (lazy weights), so its blocked
    copy is made for this call only, never cached."""
    if backend != "blas" and x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16) \
            and (b is None or b.dtype == x.dtype):
        if backend == "onednn-packed":
            w = torch.ops.mkldnn._reorder_linear_weight(w, None) if fresh else _packed(w)
        return _onednn_linear(x.contiguous(), w, b)
    return F.linear(x, w, b)


def padded_rows(n: int, min_rows: int, multiple: int) -> int:
    n = max(n, min_rows)
    return -(-n // multiple) * multiple


def pad_dim(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """``x`` zero-padded to length ``m`` along ``dim``."""
    n = x.shape[dim]
    if m == n:
        return x
    shape = list(x.shape)
    shape[dim] = m - n
    return torch.cat([x, x.new_zeros(shape)], dim)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           source: ggml.FileWeight | None = None, fresh: bool = False) -> torch.Tensor:
    """``x @ w.T (+ b)`` for x of shape (..., K), w of shape (N, K). ``source``: the weight's GGUF
    type (and file, for Q4_1/Q5_1 block mins), which ggml numerics round the activations for.
    ``fresh``: ``w`` is a reused scratch buffer (see :func:`mm`); the product is the same."""
    nx = numerics.current()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if nx.ggml and source is not None:
        return _ggml_linear(x2, w, b, source, nx, fresh).reshape(*lead, w.shape[0])
    return _linear2(x2, w, b, nx, fresh).reshape(*lead, w.shape[0])


def _linear2(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nx: numerics.Numerics,
             fresh: bool = False) -> torch.Tensor:
    r = nx.linear_rule()
    if not nx.invariant:
        return mm(x2, w, b, r.backend, fresh)
    n = x2.shape[0]
    m = padded_rows(n, r.min_rows, r.multiple)
    if m != n and n < r.min_rows and _few_rows_ok(n, w, x2.device, r):
        m = n
    if m != n:
        x2 = torch.cat([x2, x2.new_zeros(m - n, x2.shape[1])])
    if r.f64:
        y = F.linear(x2.double(), w.double(), None if b is None else b.double()).to(x2.dtype)
    else:
        y = mm(x2, w, b, r.backend, fresh)
    return y[:n]


def _ggml_linear(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, src: ggml.FileWeight,
                 nx: numerics.Numerics, fresh: bool = False) -> torch.Tensor:
    """``linear`` on activations rounded as ggml's CPU backend rounds them for the weight's file type."""
    if ggml.vec_dot_type(src.qtype) == "Q8_1" and x2.shape[-1] % 32 == 0:
        q, d, d16 = ggml.quantize_q8_0(x2)  # once, for the product and the min term
        y = _linear2((q * d16).flatten(-2).to(x2.dtype), w, b, nx, fresh)
        return y + ggml.q8_1_min_correction(q, d, d16, src.block_mins(w.device)).to(y.dtype)
    return _linear2(ggml.round_activations(x2, src.qtype).to(x2.dtype), w, b, nx, fresh)


def qmatmul(qtype, raw: torch.Tensor, shape: tuple[int, int]):
    """The native fused product for a weight of ``qtype`` held as ``raw`` (its GGUF bytes, ``shape``
    = (out, in)), or ``None`` where it does not apply (not on CPU, no native library or no kernel
    for the type, ``in`` not a multiple of its lanes). Resolved once per weight, at load."""
    from ..gguf import native

    fn = native.matmul(qtype) if raw.device.type == "cpu" else None
    lanes = native.lanes() if fn is not None else 0
    return fn if lanes and shape[1] % lanes == 0 and raw.is_contiguous() else None


def fused_product_applies(x: torch.Tensor) -> bool:
    """Whether the native fused products (:func:`qlinear`, ``layers.project``) take input ``x``:
    float32 on CPU, ggml numerics off (they round activations as llama.cpp does instead)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not numerics.current().ggml


def qlinear(x: torch.Tensor, raw: torch.Tensor, kernel, shape: tuple[int, int],
            b: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T (+ b)`` with W ((out, in) = ``shape``) given as its GGUF bytes ``raw``, multiplied by
    ``kernel`` (from :func:`qmatmul`); ``None`` where that does not apply (x not float32, ggml
    numerics), and the caller dequantizes instead."""
    if not fused_product_applies(x):
        return None
    n, k = shape
    flat = x.dim() == 2 and x.is_contiguous()  # (the usual case: no reshapes, one op less per call)
    x2 = x if flat else x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n)
    kernel(raw, n, k, x2, y)
    if b is not None:
        y += b
    return y if flat else y.reshape(*x.shape[:-1], n)


_FEW_ROWS: dict[tuple, bool] = {}


def tiled_randn(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A (rows, cols) float32 matrix of at most 64 random rows, tiled: for the self-checks that a
    kernel computes the same way for some shape (the values only have to round differently in
    different kernels; drawing a vocabulary head's worth of normals took seconds at start-up)."""
    tile = torch.randn(min(64, shape[0]), shape[1], generator=g)
    return tile.repeat(-(-shape[0] // tile.shape[0]), 1)[:shape[0]].contiguous()


def _few_rows_ok(n: int, w: torch.Tensor, device: torch.device, r) -> bool:
    """Whether ``n`` (< the rule's minimum) rows need no padding for a weight of this shape: tested
    once per shape, dtype, backend and thread count on random data (the kernel a BLAS picks depends
    on shapes, not values). oneDNN, for instance, computes a single row the same way as many for
    K up to ~1024 and splits its reduction across threads beyond; decode then pads only those."""
    if device.type != "cpu" or r.f64:
        return False
    key = (n, tuple(w.shape), w.dtype, r.backend, torch.get_num_threads())
    ok = _FEW_ROWS.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(n)
        wt = tiled_randn(tuple(w.shape), g).to(w.dtype)
        x = torch.randn(24, w.shape[1], generator=g).to(w.dtype)
        full = mm(x, wt, None, r.backend)
        ok = all(torch.equal(mm(x[o:o + n], wt, None, r.backend), full[o:o + n]) for o in (0, 5, 11, 24 - n))
        _PACKED.pop(wt, None)
        _FEW_ROWS[key] = ok
    return ok


def matmul_rows(n: int) -> int:
    """Rows a batched ``torch.matmul`` (attention) computes for ``n`` query rows under the numerics
    in force (the calibrated rule for the batched product)."""
    nx = numerics.current()
    if not nx.invariant:
        return n
    r = nx.linear_rule()
    return padded_rows(n, r.mm_min_rows, r.mm_multiple)
