"""Attention over fixed key blocks in a fixed order: a query's result depends only on its own keys.

Memory views (:mod:`gguf_runtime.memory`) call :func:`attention` behind ``attend``; models never
call it directly. On CPU in float32 the invariant path is the native kernel (``attn_f32`` in
``gguf/_dequant.c``: per query one fixed order over its visible keys only, blocks of 16 keys tied
to their rank); elsewhere, or without the library, the torch kernel below, which reaches the same
guarantee with fixed 64-key blocks, padded rows and a tree of block partials.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .. import numerics
from .calibrate import KV_BLOCK
from .elementwise import exp_, softcap as _softcap
from .linear import matmul_rows, pad_dim

_MASKS = WeakIdKeyDictionary()  # attention mask -> its tile pieces

_EXP_FLOOR = float(torch.tensor(-80.0).exp()) * 1.0001  # just above exp(-80) in float32
Q_TILE = 64  # queries per tile: a tile computes only the key blocks some of its queries can see


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float = 0.0, fold: bool = False) -> torch.Tensor:
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
    follow change no bit of a query's result.

    ``fold``: the key blocks are aligned to absolute positions (a sliding-window cache's plan,
    :mod:`gguf_runtime.memory.kv_cache`) and the per-block partials are added left to right instead
    of as a tree. Leading blocks a query cannot see then add exact zeros in front (``0 + a = a``), so
    a tile computes only the blocks from the first to the last any of its queries sees, and the
    result is the same whether the blocks before the window were dropped, skipped or kept: a
    window's cost is its own length, not its position. The ``g`` query heads sharing a KV head are stacked as rows of one product
    (no K/V copies for grouped-query attention), and the row count is padded as a whole.
    """
    if q.dim() == 3:
        return attention(q[None], k[None], v[None], mask[None], scale, softcap, fold)[0]
    B, h, nq, d = q.shape
    hkv, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    out_dtype = q.dtype
    nx = numerics.current()
    if not nx.invariant:  # fastest path: fused SDPA, whose reduction order depends on shapes
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
    if q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32:
        fn = _native()
        if fn is not None:
            return _native_attention(fn, q, k, v, mask, scale, softcap)
    KV = KV_BLOCK
    nb = max(1, -(-nkv // KV))
    derived = _MASKS.get(mask)  # the layers of a ubatch share one mask: derive its pieces once
    if derived is None:
        derived = _MASKS[mask] = {}
    if nb * KV != nkv:
        k, v, mask = pad_dim(k, nb * KV, 2), pad_dim(v, nb * KV, 2), pad_dim(mask, nb * KV, 2)
    qg = q.view(B, hkv, g, nq, d)
    # K and V gathered head-major, (n_head_kv, B, n_kv, d) seen as (B, n_head_kv, ...) (the KV cache's
    # gather for several groups): compute in that order, (head, group), instead of copying them to
    # (group, head); every (group, head) product and reduction is the same, only their order in the
    # batch changes. ``X, Y`` are the two leading (batch) dimensions in the order computed.
    hm = B > 1 and not k.is_contiguous() and k.transpose(0, 1).is_contiguous() and v.transpose(0, 1).is_contiguous()
    if hm:
        k, v, qg = k.transpose(0, 1), v.transpose(0, 1), qg.transpose(0, 1)
    else:
        k, v = k.contiguous(), v.contiguous()  # one copy; the products then read K transposed in place
    X, Y = k.shape[0], k.shape[1]
    kT = k.transpose(-1, -2)  # (X, Y, d, n_kv)
    vb = v.view(X, Y, nb, KV, dv)
    if nq > Q_TILE:  # (nq, nb): the blocks each query sees something in
        vis = derived.get("vis")
        if vis is None:
            vis = mask.view(B, nq, nb, KV).any(-1)
            vis = derived["vis"] = vis.any(0) if B > 1 else vis[0]
    cols = nx.linear_rule().mm_cols
    out = torch.empty(X, Y, g, nq, dv, dtype=torch.float32, device=q.device) if nq > Q_TILE else None
    for t0 in range(0, nq, Q_TILE):
        t1 = min(nq, t0 + Q_TILE)
        nt = t1 - t0
        r = g * nt  # the g query heads of a KV head, stacked as rows: row j * nt + i is head j, query i
        m = matmul_rows(r)
        # blocks b0 .. nbt-1: from block 0 for the tree sum (aligned to it), from the first one seen
        # when folding
        b0 = 0
        if out is None:  # a single tile (decode, short prompts): every block, no host sync
            nbt = nb
        else:
            seen = vis[t0:t1].any(0).nonzero().flatten().tolist()
            if not seen:  # no visible key (cannot happen for a causal query, which sees itself)
                out[:, :, :, t0:t1] = 0
                continue
            nbt = seen[-1] + 1
            b0 = seen[0] if fold else 0
        nbs = nbt - b0
        if m == r:
            qt = qg[:, :, :, t0:t1].reshape(X, Y, r, d)
        else:  # one zeroed buffer and one copy (not reshape-copy, then concatenate)
            qt = q.new_zeros(X, Y, m, d)
            qt[:, :, :r].view(X, Y, g, nt, d).copy_(qg[:, :, :, t0:t1])
        kTt = kT[..., b0 * KV:nbt * KV]
        if cols:  # one product for all the tile's blocks: (X, Y, m, nbs*KV)
            s = torch.matmul(qt, kTt)
        else:  # one fixed-shape product per block
            s = torch.matmul(qt.unsqueeze(2), kTt.unflatten(-1, (nbs, KV)).transpose(2, 3)
                             ).transpose(2, 3).reshape(X, Y, m, nbs * KV)
        s = s.float() if s.dtype != torch.float32 else s
        s.mul_(scale)
        if softcap:
            s = _softcap(s, softcap)
        hidden = derived.get((t0, b0, nbt, g, m, hm))
        if hidden is None:
            mt = mask[:, t0:t1, b0 * KV:nbt * KV]  # (B, nt, nbs*KV)
            mt = pad_dim(mt.repeat(1, g, 1) if g > 1 else mt, m, 1)  # (B, m, nbs*KV), rows as in qt
            hidden = derived[(t0, b0, nbt, g, m, hm)] = ~mt[None] if hm else ~mt[:, None]
        s.masked_fill_(hidden, float("-inf"))
        mx = s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # exact: order-free
        # exp of anything that underflows (x < -87.3, -inf included) takes a slow path on x86
        # (5-20x), so exponentiate max(x, -80) and zero every result <= exp(-80): masked keys stay
        # exact zeros, and terms < 1.9e-35 against a row sum >= 1 (the max key gives exp(0)) are flushed
        p = F.threshold_(exp_(s.sub_(mx).clamp_(min=-80.0)), _EXP_FLOOR, 0.0).view(X, Y, m, nbs, KV)
        l_b = p.sum(-1)  # (X, Y, m, nbs): fixed-length row sums
        o_b = torch.matmul(p.transpose(2, 3).to(v.dtype), vb[:, :, b0:nbt])  # (X, Y, nbs, m, dv)
        o_b = o_b.float() if o_b.dtype != torch.float32 else o_b
        if fold:
            l_sum, o_sum = _fold_sum(l_b, -1), _fold_sum(o_b, 2)
        else:
            l_sum, o_sum = _tree_sum(l_b, -1), _tree_sum(o_b, 2)
        o = (o_sum / l_sum.clamp_min(1e-30).unsqueeze(-1))[:, :, :r].view(X, Y, g, nt, dv)
        if out is None:
            out = o
            break
        out[:, :, :, t0:t1] = o
    if hm:
        out = out.transpose(0, 1)
    return out.reshape(B, h, nq, dv).transpose(1, 2).to(out_dtype)


_NATIVE: list = []


def _native():
    """The native kernel (resolved once per process; ``None`` without the library)."""
    if not _NATIVE:
        from ..gguf import native

        _NATIVE.append(native.attention())
    return _NATIVE[0]


_NATIVE_KV: list = []


def attention_in_place(q: torch.Tensor, q_idx: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cells: torch.Tensor,
                         mask: torch.Tensor, scale: float, softcap: float, out: torch.Tensor, out_seq: bool = False) -> bool:
    """:func:`attention` of the groups whose queries are rows ``q_idx`` of ``q`` (n, h, d) and whose
    keys are cells ``cells`` of ``kc`` / ``vc`` — a cache layer (n_head_kv, n_cells, d), or any
    tensor whose ``[head, cell]`` is a unit-stride row, such as a ubatch's (n, n_head_kv, d) seen
    transposed; cell -1 is a zero row — written to the same rows of ``out`` (n, h, d_v), or with
    ``out_seq`` to rows ``0 .. B * n_q - 1`` in group order, without gathering the operands: the
    native kernel (``attn_kv_f32``), with the same bits as gathering them and calling
    :func:`attention`. Returns False (nothing done) where that path does not apply: not invariant
    numerics, not CPU float32, key lists not whole blocks of 16, d or d_v over 1024, or no library."""
    if not _NATIVE_KV:
        from ..gguf import native

        _NATIVE_KV.append(native.attention_kv())
    fn = _NATIVE_KV[0]
    if fn is None or not numerics.current().invariant or q.device.type != "cpu" or mask.shape[-1] % 16:
        return False
    if not (q.dtype == kc.dtype == vc.dtype == out.dtype == torch.float32 and q.is_contiguous()
            and kc.stride(2) == 1 and vc.stride(2) == 1 and max(kc.shape[2], vc.shape[2]) <= 1024 and out.is_contiguous()):
        return False
    fn(q, q_idx, kc, vc, cells, mask.contiguous(), scale, softcap, out, out_seq)
    return True


def _native_attention(fn, q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """The C kernel (``attn_f32`` in ``gguf/_dequant.c``): per query one fixed order over its
    visible keys only (lanes tied to a key's rank mod 16 in its block-aligned list), so it meets
    the same invariance argument with no padding of rows and no per-block products."""
    B, h, nq, d = q.shape
    nkv = k.shape[2]
    pad = (-nkv) % 16
    if pad:
        k, v, mask = pad_dim(k, nkv + pad, 2), pad_dim(v, nkv + pad, 2), pad_dim(mask, nkv + pad, 2)
    out = torch.empty(B, nq, h, v.shape[3], dtype=torch.float32)
    fn(q.contiguous(), k.transpose(-1, -2).contiguous(), v.contiguous(), mask.contiguous(), scale, softcap, out)
    return out


def _fold_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over the key-block axis ``dim`` left to right, ``((b0 + b1) + b2) + ...``: exact zeros
    in front of or after a query's visible blocks change nothing, wherever the blocks start."""
    acc = t.select(dim, 0).clone()
    for j in range(1, t.shape[dim]):
        acc += t.select(dim, j)
    return acc


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
            t = pad_dim(t, n + n % 2, d).unflatten(d, (-1, 2)).sum(d + 1)
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
