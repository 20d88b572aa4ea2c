"""The native attention kernel (``attn_f32``, kernels.attention's CPU float32 path): softmax
attention against a float64 reference, and the invariance argument it has to meet — a query's
result depends only on its visible keys, whatever rows, groups or extra key blocks share the call —
and the same bits from a build for a machine without AVX-512 (plain C, no intrinsics: the same IEEE
operations however the compiler vectorises them)."""
from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from gguf_runtime.gguf import native
from gguf_runtime.kernels import attention
pytestmark = pytest.mark.skipif(native.attention() is None, reason="no native library (no C compiler on this machine)")


def _case(B=2, h=6, hkv=2, nq=21, nkv=100, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, nq, d, generator=g)
    k = torch.randn(B, hkv, nkv, d, generator=g)
    v = torch.randn(B, hkv, nkv, d, generator=g)
    pos = torch.arange(nkv)
    qpos = torch.arange(nkv - nq, nkv)
    mask = (pos[None, :] <= qpos[:, None]).expand(B, nq, nkv).clone()
    mask[1, :, :7] = False  # the second group's first keys hidden (a window, say)
    return q, k, v, mask


def _reference(q, k, v, mask, scale, softcap=0.0):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("softcap", [0.0, 50.0])
def test_matches_float64_softmax_attention(softcap):
    q, k, v, mask = _case()
    out = attention(q, k, v, mask, 0.125, softcap)
    assert out.shape == (2, 21, 6, 64)
    assert (out.double() - _reference(q, k, v, mask, 0.125, softcap)).abs().max() < 2e-6


def test_a_query_depends_on_its_visible_keys_only():
    q, k, v, mask = _case()
    full = attention(q, k, v, mask, 0.125)
    for i in (0, 7, 20):  # alone, in another group batch
        assert torch.equal(attention(q[1:, :, i:i + 1], k[1:], v[1:], mask[1:, i:i + 1], 0.125)[:, 0], full[1:, i])
    # one more key block after the keys, hidden: nothing changes (keys come in 16-aligned blocks)
    g = torch.Generator().manual_seed(9)
    k2 = torch.cat([k, torch.randn(2, 2, 28, 64, generator=g)], 2)
    v2 = torch.cat([v, torch.randn(2, 2, 28, 64, generator=g)], 2)
    m2 = torch.cat([mask, torch.zeros(2, 21, 28, dtype=torch.bool)], 2)
    assert torch.equal(attention(q, k2, v2, m2, 0.125), full)
    # a whole hidden block of 64 keys in front (a sliding window's dropped blocks): the same
    k3 = torch.cat([torch.randn(2, 2, 64, 64, generator=g), k], 2)
    v3 = torch.cat([torch.randn(2, 2, 64, 64, generator=g), v], 2)
    m3 = torch.cat([torch.zeros(2, 21, 64, dtype=torch.bool), mask], 2)
    assert torch.equal(attention(q, k3, v3, m3, 0.125), full)
    # a query that sees nothing gets zeros
    m4 = mask.clone()
    m4[0, 3] = False
    assert torch.equal(attention(q, k, v, m4, 0.125)[0, 3], torch.zeros(6, 64))


# (heads, KV heads, d, d_v): 3, 4, 1 and 8 query heads per KV head; d_v not a multiple of 64
SHAPES = [(6, 2, 64, 64), (8, 2, 32, 80), (4, 4, 16, 16), (8, 1, 256, 256)]


@pytest.mark.parametrize("h,hkv,d,dv", SHAPES)
def test_portable_build_gives_the_same_bits(tmp_path, h, hkv, d, dv):
    cc = native._compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler for x86-64")
    so = tmp_path / "portable.so"
    assert native._build(cc, ["-fopenmp"], so)
    fn = ctypes.CDLL(str(so)).attn_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2 + [ctypes.c_void_p, ctypes.c_int]
    q, k, v, mask = _case(h=h, hkv=hkv, nkv=96, d=d)
    v = torch.randn(2, hkv, 96, dv, generator=torch.Generator().manual_seed(5))
    for cap in (0.0, 30.0):
        out = torch.empty(2, 21, h, dv)
        kT = k.transpose(-1, -2).contiguous()
        fn(q.data_ptr(), kT.data_ptr(), v.data_ptr(), mask.data_ptr(), 2, h, hkv, 21, 96, d, dv, 0.125, cap,
           out.data_ptr(), 2)
        assert torch.equal(out, attention(q, k, v, mask, 0.125, cap))


@pytest.mark.parametrize("h,hkv,d,dv", SHAPES)
def test_attention_in_place_on_the_cache_is_the_gathered_attention(h, hkv, d, dv):
    """``attention_in_place`` (the KV cache's path: queries by row index, keys by cell index, no
    gathers) gives the bits of gathering the operands and calling :func:`attention`."""
    import importlib

    mod = importlib.import_module("gguf_runtime.kernels.attention")
    g = torch.Generator().manual_seed(11)
    n_cells, B, nq, nkv = 300, 2, 5, 64
    kc, vc = torch.randn(hkv, n_cells + 1, d, generator=g), torch.randn(hkv, n_cells + 1, dv, generator=g)
    kc[:, -1], vc[:, -1] = 0, 0  # the pad cell
    q = torch.randn(B * nq + 3, h, d, generator=g)  # three rows no group reads
    q_idx = torch.randperm(B * nq + 3, generator=g)[:B * nq]
    cells = torch.randperm(n_cells, generator=g)[:B * nkv]
    cells[nkv - 9:nkv] = n_cells  # the first group's list padded with the pad cell
    mask = torch.rand(B, nq, nkv, generator=g) < 0.7
    mask[0, :, nkv - 9:] = False
    mask[1, 2] = False  # a query that sees nothing
    out = torch.full((B * nq + 3, h, dv), 7.0)
    assert mod.attention_in_place(q, q_idx, kc, vc, cells, mask, 0.125, 20.0, out)
    qq = q[q_idx].view(B, nq, h, d).transpose(1, 2)
    kk = kc[:, cells].view(hkv, B, nkv, d).transpose(0, 1)
    vv = vc[:, cells].view(hkv, B, nkv, dv).transpose(0, 1)
    ref = attention(qq, kk, vv, mask, 0.125, 20.0).reshape(B * nq, h, dv)
    assert torch.equal(out[q_idx], ref)
    rest = torch.ones(B * nq + 3, dtype=torch.bool)
    rest[q_idx] = False
    assert torch.equal(out[rest], torch.full((3, h, dv), 7.0))  # rows no group owns are left alone


def test_torch_fallback_is_invariant_too(gguf_dir, monkeypatch):
    """Where the library is missing (no compiler, GGUF_RUNTIME_NATIVE=0, CUDA) the torch kernel
    runs: a model's logits still do not depend on the batch split, and agree with the native ones
    to float32 rounding."""
    import importlib

    from gguf_runtime.batch import Batch
    from gguf_runtime.context import Context
    from gguf_runtime.models import load_model
    from helpers import toks

    mod = importlib.import_module("gguf_runtime.kernels.attention")
    m = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(80, 4)

    def logits(n_ubatch):
        c = Context(m, n_ctx=128, n_ubatch=n_ubatch)
        c.decode(Batch(t, output=[True] * len(t)))
        return c.get_logits().clone()

    fast = logits(512)
    monkeypatch.setattr(mod, "_NATIVE", [None])
    monkeypatch.setattr(mod, "_NATIVE_KV", [None])
    slow = logits(512)
    assert torch.equal(logits(9), slow)
    assert not torch.equal(slow, fast) and (slow - fast).abs().max() < 1e-3 * fast.abs().max()


def test_attention_in_place_on_a_ubatch_with_zero_rows():
    """The encoder's use: keys and values are the ubatch's own (n, heads, d) rows seen transposed
    (strided, not a cache), padding cells are -1 (zero rows, masked), and each group's outputs go
    to rows in group order (``out_seq``) — the bits of gathering, zero-padding and :func:`attention`."""
    import importlib

    mod = importlib.import_module("gguf_runtime.kernels.attention")
    g = torch.Generator().manual_seed(12)
    n, h, d, B, L, Lk = 40, 12, 32, 3, 13, 64
    qkv = torch.randn(n, 3, h, d, generator=g)  # a fused projection: q, k, v are strided slices
    q, k, v = qkv[:, 0].contiguous(), qkv[:, 1], qkv[:, 2]
    idx = torch.randperm(n, generator=g)[:B * L].view(B, L)
    cells = torch.full((B, Lk), -1, dtype=torch.long)
    cells[:, :L] = idx
    mask = torch.zeros(B, L, Lk, dtype=torch.bool)
    mask[:, :, :L] = torch.rand(B, L, L, generator=g) < 0.8
    out = torch.empty(B * L, h, d)
    assert mod.attention_in_place(q, idx.flatten(), k.transpose(0, 1), v.transpose(0, 1), cells.flatten(), mask,
                                    0.2, 0.0, out, out_seq=True)
    kk = torch.zeros(B, h, Lk, d)
    vv = torch.zeros(B, h, Lk, d)
    kk[:, :, :L], vv[:, :, :L] = k[idx].transpose(1, 2), v[idx].transpose(1, 2)
    ref = attention(q[idx].transpose(1, 2), kk, vv, mask, 0.2).reshape(B * L, h, d)
    assert torch.equal(out, ref)
