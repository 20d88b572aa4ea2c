"""ggml numerics (opt-in): activations rounded as llama.cpp's CPU backend rounds them (issue 7)."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from gguf_runtime import kernels as ops
from gguf_runtime.kernels import ggml as gn
from gguf_runtime.numerics import Numerics, use


def test_q8_0_rounding_matches_gguf_py():
    """Away from exact ties (random data has none) ggml's Q8_0 activation quantizer and gguf-py's
    Q8_0 reference give the same scale and integers."""
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(0)) * 3
    q, _, d16 = gn.quantize_q8_0(x)
    raw = quants.quantize(x.numpy(), T.Q8_0).reshape(7, -1, 34)
    ref_d = raw[..., :2].copy().view(np.float16).astype(np.float32)
    ref_q = raw[..., 2:].copy().view(np.int8).astype(np.float32)
    assert np.array_equal(d16.numpy(), ref_d) and np.array_equal(q.numpy(), ref_q)


def test_q8_k_rounding_is_exact_on_the_grid():
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    q, d = gn.quantize_q8_k(x)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    # the value of largest magnitude in each block maps to -127 (iscale = -127 / max)
    xb = x.view(3, 2, 256)
    i = xb.abs().argmax(-1, keepdim=True)
    assert torch.equal(q.gather(-1, i), torch.full_like(d, -127))
    assert (gn.round_activations(x, "Q4_K") - x).abs().max() <= d.abs().max() / 2 + 1e-6


def test_vec_dot_types():
    assert [gn.vec_dot_type(t) for t in ("Q4_0", "Q4_1", "Q6_K", "IQ4_NL", "F16", "F32")] == \
        ["Q8_0", "Q8_1", "Q8_K", "Q8_0", "F16", None]


def test_linear_rounds_only_file_typed_weights(gguf_dir):
    from gguf_runtime.models import load_model

    m = load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf")
    lin = m.blk[0].attn_q
    w = lin.weight
    assert lin.source.qtype == "Q4_K" and m.blk[0].ffn_down.source.qtype == m.blk[0].ffn_down.source.file.info(
        "blk.0.ffn_down.weight").qtype.name
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2))
    plain = lin(x)
    with use(Numerics(ggml=True)):
        emu = lin(x)
        assert torch.equal(emu, ops.linear(gn.round_activations(x, "Q4_K"), torch.nn.Parameter(w.detach().clone(), requires_grad=False)))
        assert not torch.equal(emu, plain)
        torch.testing.assert_close(emu, plain, rtol=0.05, atol=0.05)
