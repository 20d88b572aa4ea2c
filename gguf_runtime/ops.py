"""Batch-invariant primitives: a row's result never depends on how many other rows share the call.

Every model computes through these. In invariant mode (the default):

- ``linear`` runs on the backend :func:`self_test` picks (oneDNN's inner product on weights reordered
  once, else on plain weights, else the BLAS sgemm) and pads the row count up to the tile from which
  that backend computes every row the same way at any offset (oneDNN: 2 rows, and 1 where a
  per-shape test allows; MKL's sgemm: 4, its 1-3 row path sums in another order).
- ``attention`` gathers each sequence's keys in position order and works on fixed key blocks of
  ``KV_BLOCK`` (aligned to the key's rank in its sequence), with a float32 softmax whose
  cross-block sums run in a fixed tree, so a query's result depends only on its own visible keys.
- norms and softmaxes reduce along a row only.

``set_invariant(False)`` keeps the backend and drops padding and the fixed-block attention.
``ggml_numerics`` (opt-in) rounds activations as llama.cpp's CPU backend does, inside ``linear``.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import ggml_numerics

KV_BLOCK = 64

_state = {"invariant": os.environ.get("GGUF_RUNTIME_INVARIANT", "1") != "0", "min_rows": 16, "multiple": 1,
          "prepack": os.environ.get("GGUF_RUNTIME_PREPACK", "1") != "0",
          "backend": "blas", "mm_min_rows": 16, "mm_multiple": 1, "mm_cols": False, "f64": False, "threads": 0, "report": None}


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's inner product (the kernel torch's compiled CPU graphs use)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


_PACKED = WeakIdKeyDictionary()  # weight -> (version, oneDNN-blocked copy)
_MASKS = WeakIdKeyDictionary()  # attention mask -> its tile pieces


def _packed(w: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout (kept beside the plain weight, which
    embeddings and other code still read: this doubles linear weights' host memory)."""
    version = -1 if w.is_inference() else w._version  # inference tensors cannot change in place
    hit = _PACKED.get(w)
    if hit is None or hit[0] != version:
        hit = (version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        _PACKED[w] = hit
    return hit[1]


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend != "blas" and x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16) \
            and (b is None or b.dtype == x.dtype):
        return _onednn_linear(x.contiguous(), _packed(w) if backend == "onednn-packed" else w, b)
    return F.linear(x, w, b)


def set_prepack(on: bool) -> None:
    """Allow (default; env ``GGUF_RUNTIME_PREPACK=0`` disallows) oneDNN-blocked weight copies:
    1.3-2x faster linears on CPU, especially for one-row decode, at twice the weights' memory."""
    _state["prepack"] = bool(on)
    _state["threads"] = 0  # rerun the self-test


def set_invariant(on: bool) -> None:
    _state["invariant"] = bool(on)


def is_invariant() -> bool:
    return _state["invariant"]


def padded_rows(n: int) -> int:
    """Rows a batched ``torch.matmul`` (attention) computes for ``n`` query rows in invariant mode
    (the self-test's rule for the BLAS batched product)."""
    if _state["threads"] != torch.get_num_threads():
        self_test()
    return _padded_rows(n, _state["mm_min_rows"], _state["mm_multiple"]) if _state["invariant"] else n


def _padded_rows(n: int, min_rows: int, multiple: int) -> int:
    n = max(n, min_rows)
    return -(-n // multiple) * multiple


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for x of shape (..., K), w of shape (N, K)."""
    if _state["threads"] != torch.get_num_threads():  # the rule is per thread count
        self_test()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if ggml_numerics.is_enabled() and getattr(w, "ggml_type", None):
        return _ggml_linear(x2, w, b).reshape(*lead, w.shape[0])
    return _linear2(x2, w, b).reshape(*lead, w.shape[0])


def _linear2(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if not _state["invariant"]:
        return _mm(x2, w, b, _state["backend"])
    n = x2.shape[0]
    m = _padded_rows(n, _state["min_rows"], _state["multiple"])
    if m != n and n < _state["min_rows"] and _few_rows_ok(n, w, x2.device):
        m = n
    if m != n:
        x2 = torch.cat([x2, x2.new_zeros(m - n, x2.shape[1])])
    if _state["f64"]:
        y = F.linear(x2.double(), w.double(), None if b is None else b.double()).to(x2.dtype)
    else:
        y = _mm(x2, w, b, _state["backend"])
    return y[:n]


def _ggml_linear(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on activations rounded as ggml's CPU backend rounds them for ``w``'s file type."""
    t = w.ggml_type
    if ggml_numerics.vec_dot_type(t) == "Q8_1" and x2.shape[-1] % 32 == 0 and hasattr(w, "ggml_source"):
        q, d, d16 = ggml_numerics.quantize_q8_0(x2)  # once, for the product and the min term
        y = _linear2((q * d16).flatten(-2).to(x2.dtype), w, b)
        return y + ggml_numerics.q8_1_min_correction(q, d, d16, _block_mins(w)).to(y.dtype)
    return _linear2(ggml_numerics.round_activations(x2, t).to(x2.dtype), w, b)


_MINS = WeakIdKeyDictionary()


def _block_mins(w: torch.Tensor) -> torch.Tensor:
    """The per-block mins (N, K/32) of a Q4_1/Q5_1 weight, from its file bytes."""
    m = _MINS.get(w)
    if m is None:
        import numpy as np

        f, name = w.ggml_source
        bs = {"Q4_1": 20, "Q5_1": 24}[w.ggml_type]
        raw = np.asarray(f.raw(name)).reshape(-1, bs)[:, 2:4].copy().view(np.float16)
        m = torch.from_numpy(raw.astype(np.float32)).view(w.shape[0], -1).to(w.device)
        _MINS[w] = m
    return m


_FEW_ROWS: dict[tuple, bool] = {}


def _few_rows_ok(n: int, w: torch.Tensor, device: torch.device) -> bool:
    """Whether ``n`` (< the rule's minimum) rows need no padding for a weight of this shape: tested
    once per shape, dtype, backend and thread count on random data (the kernel a BLAS picks depends
    on shapes, not values). oneDNN, for instance, computes a single row the same way as many for
    K up to ~1024 and splits its reduction across threads beyond; decode then pads only those."""
    if device.type != "cpu" or _state["f64"]:
        return False
    key = (n, tuple(w.shape), w.dtype, _state["backend"], _state["threads"])
    ok = _FEW_ROWS.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(n)
        wt = torch.randn(tuple(w.shape), generator=g).to(w.dtype)
        x = torch.randn(24, w.shape[1], generator=g).to(w.dtype)
        full = _mm(x, wt, None, _state["backend"])
        ok = all(torch.equal(_mm(x[o:o + n], wt, None, _state["backend"]), full[o:o + n]) for o in (0, 5, 11, 24 - n))
        _PACKED.pop(wt, None)
        _FEW_ROWS[key] = ok
    return ok


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 whatever ``x``'s dtype (as ggml does): half-precision
    elementwise kernels round differently in their vector body and scalar tail, which would make a
    row's result depend on how many rows share the call."""
    xf = x.float()
    if ggml_numerics.is_enabled():  # ggml: sum of float squares in double, 1/sqrtf in float, x * scale * w
        scale = torch.rsqrt(((xf * xf).double().sum(-1, keepdim=True) / xf.shape[-1]).float() + eps)
        y = xf * scale
        return (y * w.float() if w is not None else y).to(x.dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm in float32 (F.layer_norm reduces each row on its own, tested batch-invariant)."""
    return F.layer_norm(x.float(), x.shape[-1:], None if w is None else w.float(),
                        None if b is None else b.float(), eps).to(x.dtype)


def _lanewise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise function so that every element goes through the vectorised body.

    torch's CPU kernels compute transcendental functions with SIMD code (Sleef) in the body of a
    contiguous run and with the scalar libm function in its tail (and at each thread's range end);
    the two can differ in the last bit, so an element's result would depend on where it sits, i.e.
    on the batch shape. Padding the flat tensor to a multiple of 64 x threads puts every element in
    a vector lane, where the result depends on the value alone."""
    if not _state["invariant"]:
        return fn(x)
    flat = x.reshape(-1)
    q = 64 * max(1, torch.get_num_threads())
    pad = (-flat.numel()) % q
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return fn(flat)[: x.numel()].view(x.shape)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place on a contiguous tensor whose size already fills whole vector chunks (else
    :func:`exp`)."""
    if _state["invariant"] and x.is_contiguous() and x.numel() % (64 * max(1, torch.get_num_threads())) == 0:
        return x.exp_()
    return exp(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.silu, x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.softplus, x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.gelu, x)


def exp(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(torch.exp, x)


_EXP_FLOOR = float(torch.tensor(-80.0).exp()) * 1.0001  # just above exp(-80) in float32
Q_TILE = 64  # queries per tile: a tile computes only the key blocks some of its queries can see


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float = 0.0) -> torch.Tensor:
    """Attention of query groups over their key sequences.

    q: ([B,] n_head, n_q, d); k, v: ([B,] n_head_kv, n_kv, d), each group's keys in its sequence's
    position order; mask: ([B,] n_q, n_kv) bool, True where the key is visible. Returns
    ([B,] n_q, n_head, d_v). ``B`` groups of equal shape are computed in one call.

    Invariant mode: keys fall in blocks of ``KV_BLOCK`` aligned to their rank (the KV cache's plan
    already pads each key list to whole blocks with a zero cell; other callers are padded here).
    Queries are taken in tiles of ``Q_TILE``; a tile computes the scores of key blocks 0 to the last
    one any of its queries sees (one product per tile when the self-test found score columns
    invariant, else one per block), the exact row max, ``exp`` lane-wise, and per block the row sums
    and ``p @ V`` with a fixed 64-long reduction; the per-block partials are then added as a
    zero-padded pairwise tree aligned to block 0. A block a query cannot see contributes exact
    zeros to its sums, so how many blocks a tile computes, which queries share it and how many keys
    follow change no bit of a query's result. The ``g`` query heads sharing a KV head are stacked as rows of one product
    (no K/V copies for grouped-query attention), and the row count is padded as a whole.
    """
    if q.dim() == 3:
        return attention(q[None], k[None], v[None], mask[None], scale, softcap)[0]
    B, h, nq, d = q.shape
    hkv, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    out_dtype = q.dtype
    if not _state["invariant"]:  # fastest path: fused SDPA, whose reduction order depends on shapes
        kk = k.repeat_interleave(g, 1) if g > 1 else k
        vv = v.repeat_interleave(g, 1) if g > 1 else v
        m4 = mask[:, None]
        if softcap:
            s = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
            s = (torch.tanh(s / softcap) * softcap).masked_fill(~m4, float("-inf"))
            o = torch.matmul(torch.softmax(s, -1).to(vv.dtype), vv)
        else:
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m4, scale=scale)
        return o.transpose(1, 2).to(out_dtype)
    if _state["threads"] != torch.get_num_threads():
        self_test()
    KV = KV_BLOCK
    nb = max(1, -(-nkv // KV))
    derived = _MASKS.get(mask)  # the layers of a ubatch share one mask: derive its pieces once
    if derived is None:
        derived = _MASKS[mask] = {}
    if nb * KV != nkv:
        k, v, mask = _pad_dim(k, nb * KV, 2), _pad_dim(v, nb * KV, 2), _pad_dim(mask, nb * KV, 2)
    k, v = k.contiguous(), v.contiguous()  # one copy; the products then read K transposed in place
    kT = k.transpose(-1, -2)  # (B, hkv, d, n_kv)
    vb = v.view(B, hkv, nb, KV, dv)
    if nq > Q_TILE:  # (nq, nb): the blocks each query sees something in
        vis = derived.get("vis")
        if vis is None:
            vis = mask.view(B, nq, nb, KV).any(-1)
            vis = derived["vis"] = vis.any(0) if B > 1 else vis[0]
    cols = _state["mm_cols"]
    qg = q.view(B, hkv, g, nq, d)
    out = torch.empty(B, hkv, g, nq, dv, dtype=torch.float32, device=q.device) if nq > Q_TILE else None
    for t0 in range(0, nq, Q_TILE):
        t1 = min(nq, t0 + Q_TILE)
        nt = t1 - t0
        r = g * nt  # the g query heads of a KV head, stacked as rows: row j * nt + i is head j, query i
        m = padded_rows(r)
        # blocks 0 .. nbt-1: from block 0, because the cross-block sum is a tree aligned to it
        if out is None:  # a single tile (decode, short prompts): every block, no host sync
            nbt = nb
        else:
            seen = vis[t0:t1].any(0).nonzero().flatten().tolist()
            if not seen:  # no visible key (cannot happen for a causal query, which sees itself)
                out[:, :, :, t0:t1] = 0
                continue
            nbt = seen[-1] + 1
        if m == r:
            qt = qg[:, :, :, t0:t1].reshape(B, hkv, r, d)
        else:  # one zeroed buffer and one copy (not reshape-copy, then concatenate)
            qt = q.new_zeros(B, hkv, m, d)
            qt[:, :, :r].view(B, hkv, g, nt, d).copy_(qg[:, :, :, t0:t1])
        if cols:  # one product for all the tile's blocks: (B, hkv, m, nbt*KV)
            s = torch.matmul(qt, kT[..., :nbt * KV])
        else:  # one fixed-shape product per block
            s = torch.matmul(qt.unsqueeze(2), kT[..., :nbt * KV].unflatten(-1, (nbt, KV)).transpose(2, 3)
                             ).transpose(2, 3).reshape(B, hkv, m, nbt * KV)
        s = s.float() if s.dtype != torch.float32 else s
        s.mul_(scale)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        hidden = derived.get((t0, nbt, g, m))
        if hidden is None:
            mt = mask[:, t0:t1, :nbt * KV]  # (B, nt, nbt*KV)
            mt = _pad_dim(mt.repeat(1, g, 1) if g > 1 else mt, m, 1)  # (B, m, nbt*KV), rows as in qt
            hidden = derived[(t0, nbt, g, m)] = ~mt[:, None]
        s.masked_fill_(hidden, float("-inf"))
        mx = s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # exact: order-free
        # exp of anything that underflows (x < -87.3, -inf included) takes a slow path on x86
        # (5-20x), so exponentiate max(x, -80) and zero every result <= exp(-80): masked keys stay
        # exact zeros, and terms < 1.9e-35 against a row sum >= 1 (the max key gives exp(0)) are flushed
        p = F.threshold_(_exp_(s.sub_(mx).clamp_(min=-80.0)), _EXP_FLOOR, 0.0).view(B, hkv, m, nbt, KV)
        l_b = p.sum(-1)  # (B, hkv, m, nbt): fixed-length row sums
        o_b = torch.matmul(p.transpose(2, 3).to(v.dtype), vb[:, :, :nbt])  # (B, hkv, nbt, m, dv)
        o_b = o_b.float() if o_b.dtype != torch.float32 else o_b
        l_sum, o_sum = _tree_sum(l_b, -1), _tree_sum(o_b, 2)
        o = (o_sum / l_sum.clamp_min(1e-30).unsqueeze(-1))[:, :, :r].view(B, hkv, g, nt, dv)
        if out is None:
            return o.reshape(B, h, nq, dv).transpose(1, 2).to(out_dtype)
        out[:, :, :, t0:t1] = o
    return out.view(B, h, nq, dv).transpose(1, 2).to(out_dtype)


def _tree_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over the key-block axis ``dim`` as a pairwise tree aligned to block 0 — (0+1), (2+3), ...
    level by level, an odd last element passing up unchanged (as if added to a zero block). For a
    query whose visible blocks end at ``j`` every block past ``j`` is exact zeros, and so is every
    tree node above only such blocks; the result is therefore the same for any number of trailing
    blocks, in log2 steps instead of one add per block."""
    d = dim % t.dim()
    while t.shape[d] > 1:
        n = t.shape[d]
        half = n // 2
        if n % 2 == 0 or t.numel() < 65536:  # pairs summed in one kernel (a small tensor padded with a zero block)
            t = _pad_dim(t, n + n % 2, d).unflatten(d, (-1, 2)).sum(d + 1)
            continue
        even, odd = t.narrow(d, 0, 2 * half).unflatten(d, (half, 2)).unbind(d + 1)
        if n % 2:
            shape = list(t.shape)
            shape[d] = half + 1
            nxt = t.new_empty(shape)
            torch.add(even, odd, out=nxt.narrow(d, 0, half))
            nxt.narrow(d, half, 1).copy_(t.narrow(d, n - 1, 1))
            t = nxt
        else:
            t = even + odd
    return t.squeeze(d)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float64 (as llama-perplexity accumulates it)."""
    return torch.log_softmax(x.double(), dim=-1)


def _rows_invariant(fn, x: torch.Tensor, counts, offsets, dim: int = 0) -> bool:
    ref = fn(x)
    return all(torch.equal(fn(x.narrow(dim, o, n)), ref.narrow(dim, o, n)) for n in counts for o in offsets)


def _pad_dim(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if m == n:
        return x
    shape = list(x.shape)
    shape[dim] = m - n
    return torch.cat([x, x.new_zeros(shape)], dim)


_LINEAR_RULES = [("onednn-packed", 1, 1), ("onednn-packed", 2, 1), ("onednn-packed", 4, 4),
                 ("onednn", 1, 1), ("onednn", 2, 1), ("onednn", 4, 4), ("blas", 1, 1), ("blas", 4, 4), ("blas", 8, 8),
                 ("blas", 16, 1), ("blas", 16, 16), ("blas", 32, 32)]
_MATMUL_RULES = [(4, 4), (8, 8), (16, 1), (16, 16), (32, 32)]


def self_test() -> dict:
    """Find how this machine computes products row-invariantly, with the current thread count (< 2 s).

    Linear layers: the first backend and row-padding rule in ``_LINEAR_RULES`` (oneDNN's inner
    product on weights reordered once into its blocked layout, then on plain weights, then the
    BLAS sgemm; oneDNN is row-invariant from 2 rows and, on the AVX-512 machines measured, 1.3-2x
    faster than MKL's sgemm, whose small-row path is slow) under which every row computed inside a small call
    (1..17 rows, at several offsets, padded by the rule) equals the same row computed inside one
    large call, for float32 and bfloat16 and a few shapes (including K > 1024, where oneDNN splits
    the reduction of a single row across threads). Batched ``torch.matmul`` (attention's per-block
    products) gets its own padding rule the same way. If no linear rule passes, linears run in
    float64 and round back (the safe path), and ``report['safe_path']`` says so. The norms are
    checked too. The fast mode (``set_invariant(False)``) uses the same backend, unpadded.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1234)
    mats = [(torch.randn(160, k, generator=g), torch.randn(n, k, generator=g))
            for k, n in [(256, 384), (64, 64), (576, 96), (1536, 64)]]
    counts, offsets = (1, 2, 3, 5, 7, 9, 13, 17), (0, 3)
    chosen = None
    for backend, min_rows, multiple in _LINEAR_RULES:
        if backend == "onednn-packed" and not _state["prepack"]:
            continue
        def padded(x, w, backend=backend, min_rows=min_rows, multiple=multiple):
            return _mm(_pad_dim(x, _padded_rows(x.shape[0], min_rows, multiple), 0), w, None, backend)[:x.shape[0]]
        try:
            ok = all(_rows_invariant(lambda x, w=w.to(dt): padded(x, w), x.to(dt), counts, offsets)
                     for x, w in mats for dt in (torch.float32, torch.bfloat16))
        except RuntimeError:  # backend not built into this torch
            ok = False
        if ok:
            chosen = (backend, min_rows, multiple)
            break
    qs = torch.randn(2, 3, 2, 160, 64, generator=g)
    kb = torch.randn(2, 3, 2, 64, 64, generator=g)
    mm_chosen = None
    for min_rows, multiple in _MATMUL_RULES:
        def bmm(q, k, min_rows=min_rows, multiple=multiple):
            return torch.matmul(_pad_dim(q, _padded_rows(q.shape[-2], min_rows, multiple), -2), k)[..., :q.shape[-2], :]
        if all(_rows_invariant(lambda x, k=k.to(dt): bmm(x, k), x.to(dt), counts, offsets, dim=-2)
               for x, k in [(qs, kb), (qs, kb.transpose(-1, -2))] for dt in (torch.float32, torch.bfloat16)):
            mm_chosen = (min_rows, multiple)
            break
    # attention scores in one product per query tile: a key's score must not depend on how many
    # whole key blocks share the product (nor on where they start)
    mm_cols = mm_chosen is not None
    if mm_cols:
        kt = torch.randn(2, 3, 64, 8 * KV_BLOCK, generator=g)
        for dt in (torch.float32, torch.bfloat16):
            for rows in (4, 12, 36, 192):
                qq = _pad_dim(qs[:, :, 0, :rows].to(dt), _padded_rows(rows, *mm_chosen), -2)
                kk = kt.to(dt)
                full = torch.matmul(qq, kk)
                mm_cols = mm_cols and all(torch.equal(torch.matmul(qq, kk[..., o:o + n]), full[..., o:o + n])
                                          for n in range(KV_BLOCK, kk.shape[-1] + 1, KV_BLOCK)
                                          for o in range(0, kk.shape[-1] - n + 1, 3 * KV_BLOCK))
    norm_ok = all(_rows_invariant(lambda x, w=w[0].to(dt): rms_norm(x, w, 1e-5), x.to(dt), counts, offsets)
                  for x, w in mats for dt in (torch.float32, torch.bfloat16))
    _state["backend"], _state["min_rows"], _state["multiple"] = chosen or ("blas", 16, 16)
    _state["mm_min_rows"], _state["mm_multiple"] = mm_chosen or (32, 32)
    _state["mm_cols"] = mm_cols
    _state["f64"] = chosen is None
    _state["threads"] = torch.get_num_threads()
    rep = {"backend": _state["backend"], "min_rows": _state["min_rows"], "multiple": _state["multiple"],
           "matmul_min_rows": _state["mm_min_rows"], "matmul_multiple": _state["mm_multiple"],
           "safe_path": chosen is None, "matmul_invariant": mm_chosen is not None, "score_columns_invariant": mm_cols, "norms_invariant": norm_ok,
           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 3)}
    _state["report"] = rep
    return rep


def rope_freqs(dim: int, base: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in float32 and the cos/sin magnitude scale, for the RoPE scaling
    kinds GGUF metadata names (``{arch}.rope.scaling.type``): none, linear (positions / factor) and
    yarn (ggml's ramp between interpolated and extrapolated frequencies over the correction dims
    from beta_fast/beta_slow, magnitude ``attn_factor * (1 + 0.1 ln factor)``). Llama-3 style
    scaling arrives as the ``rope_freqs`` tensor (per-pair frequency divisors) instead."""
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv = 1.0 / (base ** (i / dim))
    mscale = 1.0
    kind = (scaling or {}).get("type", "none")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "yarn":
        factor = scaling["factor"]
        n_orig = scaling.get("original_context_length") or 4096
        corr = lambda n_rot: dim * math.log(n_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo = max(0.0, math.floor(corr(scaling.get("beta_fast", 32.0))))
        hi = min(dim - 1.0, math.ceil(corr(scaling.get("beta_slow", 1.0))))
        ramp = 1 - ((i / 2 - lo) / max(0.001, hi - lo)).clamp(0, 1)  # 1 = keep extrapolated frequency
        inv = (inv / factor) * (1 - ramp) + inv * ramp
        mscale = scaling.get("attn_factor", 1.0) * (1.0 + 0.1 * math.log(factor))
    elif kind not in ("none", None):
        from .errors import UnsupportedError

        raise UnsupportedError(f"unsupported RoPE scaling type '{kind}' (supported: none, linear, yarn)")
    return inv.float(), mscale


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, neox: bool, freq_factors: torch.Tensor | None = None,
         mscale: float = 1.0, ggml_theta: tuple[float, float] | None = None) -> torch.Tensor:
    """Rotate x (n, heads, d_rot...) at integer positions ``pos`` (n,). Normal (GPT-J/llama.cpp
    'norm') rotates adjacent pairs; NeoX rotates halves. Angles in float32 as ggml computes them."""
    d = inv_freq.numel() * 2
    xr, xp = x[..., :d], x[..., d:]
    inv = inv_freq.to(x.device)
    if freq_factors is not None:
        inv = inv / freq_factors.to(x.device)
    if ggml_theta is not None and ggml_numerics.is_enabled():  # (base, freq_scale): ggml's angle recurrence
        theta = ggml_numerics.rope_theta(pos.to(x.device), d // 2, ggml_theta[0], ggml_theta[1], freq_factors)
    else:
        theta = pos.to(x.device, torch.float32).unsqueeze(-1) * inv  # (n, d/2)
    cos, sin = theta.cos().unsqueeze(1), theta.sin().unsqueeze(1)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    xf = xr.float()
    if neox:
        a, b = xf[..., : d // 2], xf[..., d // 2:]
        r = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = xf[..., 0::2], xf[..., 1::2]
        r = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    r = r.to(x.dtype)
    return r if xp.shape[-1] == 0 else torch.cat([r, xp], -1)
