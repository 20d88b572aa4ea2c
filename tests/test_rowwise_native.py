"""The native row-wise kernels of the CPU float32 forward (``rms_f32``, ``rope_f32``, ``silu_f32``,
``gelu_tanh_f32``)
and token log-likelihoods (``nll_f32``): against float64 references, a row's result independent of
the other rows and of the operand's layout, RoPE bit-identical to the torch formula it replaces,
and the same bits from a build without AVX-512."""
from __future__ import annotations

import ctypes
import importlib
import math
import platform

import pytest
import torch
import torch.nn.functional as F

from gguf_runtime import kernels
from gguf_runtime.gguf import native
from gguf_runtime.tools.perplexity import token_nll

E = importlib.import_module("gguf_runtime.kernels.elementwise")
pytestmark = pytest.mark.skipif(native.rowwise() is None, reason="no native library (no C compiler on this machine)")


def _torch_path(monkeypatch):
    monkeypatch.setattr(E, "_ROWWISE", [None])


def test_rms_norm_matches_float64_and_is_row_invariant():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 576, generator=g) * 3, torch.randn(576, generator=g)
    y = kernels.rms_norm(x, w, 1e-5)
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 1e-5
    for i in (0, 17, 36):
        assert torch.equal(kernels.rms_norm(x[i:i + 1], w, 1e-5), y[i:i + 1])
    wide = torch.randn(37, 2 * 576, generator=g)
    wide[:, ::2] = x  # the same rows, strided: the same bits (layout never picks the path)
    assert torch.equal(kernels.rms_norm(wide[:, ::2], w, 1e-5), y)
    assert torch.equal(kernels.rms_norm(x, None, 1e-5) * w, y)  # (x * s) * w, as the weighted kernel


def test_rms_norm_grouped_weight_uses_the_torch_path():
    """A weight that is not one value per column (Mamba2's grouped norm) broadcasts as torch does."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 4, 2, 8, generator=g), torch.randn(2, 8, generator=g)
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert (kernels.rms_norm(x, w, 1e-6).double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("dh,d", [(64, 64), (80, 32)])
def test_rope_is_the_torch_formula_bit_for_bit(monkeypatch, neox, dh, d):
    g = torch.Generator().manual_seed(2)
    x, pos = torch.randn(29, 5, dh, generator=g), torch.arange(29) * 7 + 3
    inv = kernels.rope_freqs(d, 10000.0)[0]
    fast = kernels.rope(x, pos, inv, neox)
    _torch_path(monkeypatch)
    assert torch.equal(fast, kernels.rope(x, pos, inv, neox))


def test_silu_and_swiglu_match_float64():
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(33, 1000, generator=g) * 8, torch.randn(33, 1000, generator=g)
    ref = F.silu(x.double())
    y = kernels.silu(x)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max() < 1e-6
    assert torch.equal(kernels.swiglu(x, u), y * u)
    assert torch.equal(kernels.silu(x[5:6]), y[5:6])
    edge = torch.tensor([-1e4, -100.0, -87.5, -20.0, -0.0, 0.0, 1e-30, 20.0, 100.0, float("inf"), float("-inf")])
    ye, re = kernels.silu(edge), F.silu(edge.double())
    assert torch.allclose(ye.double(), re, rtol=1e-6, atol=1e-36, equal_nan=True)  # silu(-inf) is NaN in both


def test_gelu_tanh_and_geglu_match_float64():
    g = torch.Generator().manual_seed(5)
    x, u = torch.randn(33, 1000, generator=g) * 6, torch.randn(33, 1000, generator=g)
    xd = x.double()
    ref = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    y = kernels.gelu_tanh(x)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 2e-6
    assert torch.equal(kernels.geglu(x, u), y * u)
    assert torch.equal(kernels.gelu_tanh(x[7:8]), y[7:8])
    edge = torch.tensor([-1e4, -30.0, -5.0, -1e-20, 0.0, 1e-20, 5.0, 30.0, 1e4])
    re = F.gelu(edge.double(), approximate="tanh")
    assert torch.allclose(kernels.gelu_tanh(edge).double(), re, rtol=2e-6, atol=1e-30)


def test_portable_build_gives_the_same_bits(tmp_path):
    cc = native._compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler for x86-64")
    so = tmp_path / "portable.so"
    assert native._build(cc, ["-fopenmp"], so)
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.rms_f32.argtypes = [P, P, I, I, ctypes.c_float, P, ctypes.c_int]
    lib.silu_f32.argtypes = [P, P, I, P, ctypes.c_int]
    lib.nll_f32.argtypes = [P, P, I, I, I, P, P, ctypes.c_int]
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(7, 333, generator=g) * 4, torch.randn(333, generator=g)
    y = torch.empty_like(x)
    lib.rms_f32(x.data_ptr(), w.data_ptr(), 7, 333, 1e-5, y.data_ptr(), 2)
    assert torch.equal(y, kernels.rms_norm(x, w, 1e-5))
    u = w.expand_as(x).contiguous()
    lib.silu_f32(x.data_ptr(), u.data_ptr(), x.numel(), y.data_ptr(), 2)
    assert torch.equal(y, kernels.swiglu(x, u))
    lib.gelu_tanh_f32.argtypes = [P, P, I, P, ctypes.c_int]
    lib.gelu_tanh_f32(x.data_ptr(), u.data_ptr(), x.numel(), y.data_ptr(), 2)
    assert torch.equal(y, kernels.geglu(x, u))
    logits, t = torch.randn(5, 50257, generator=g) * 5, torch.randint(0, 50257, (5,), generator=g)
    out = torch.empty(5, dtype=torch.float64)
    lib.nll_f32(logits.data_ptr(), None, 5, 50257, 50257, t.data_ptr(), out.data_ptr(), 2)
    assert torch.equal(out, token_nll(logits, t))
    assert math.isfinite(float(out.sum()))
