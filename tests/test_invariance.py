"""Batch invariance (issue 8): a token's logits never depend on how it was batched.

Everything here is ``torch.equal``, not a tolerance. The negative test turns invariance off and
shows the same checks then fail, so they can fail.
"""
from __future__ import annotations

import pytest
import torch

from dataclasses import replace

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.kernels import calibrate
from gguf_runtime.models import load_model
from gguf_runtime.numerics import Numerics
from helpers import alone, toks

N = 80


@pytest.fixture(scope="module", params=[("llama-tiny-f32.gguf", torch.float32), ("llama-tiny-f32.gguf", torch.bfloat16),
                                        ("llama-tiny-Q8_0.gguf", torch.float32), ("llama-tiny-Q4_K_M.gguf", torch.float32)],
                ids=["f32", "bf16-compute", "Q8_0", "Q4_K_M"])
def model(request, gguf_dir):
    name, dtype = request.param
    return load_model(gguf_dir / name, dtype=dtype)


def test_ubatch_sizes(model):
    t = toks(N, 1)
    ref = alone(model, t)
    for nub in (1, 7, 64):
        assert torch.equal(alone(model, t, nub), ref), f"n_ubatch={nub}"


@pytest.mark.parametrize("n_par", [4, 8])
def test_parallel_sequences_with_random_neighbours(model, n_par):
    t = toks(N, 2)
    ref = alone(model, t)
    g = torch.Generator().manual_seed(n_par)
    seqs = [t] + [toks(int(torch.randint(5, 120, (1,), generator=g)), 100 + k) for k in range(n_par - 1)]
    # interleave the sequences at random, each keeping its own order
    owner = torch.tensor([s for s, q in enumerate(seqs) for _ in q])[torch.randperm(sum(map(len, seqs)), generator=g)].tolist()
    nxt = [iter(q) for q in seqs]
    b = Batch([next(nxt[s]) for s in owner], seq_ids=[(s,) for s in owner], output=[True] * len(owner))
    rows = [j for j, s in enumerate(owner) if s == 0]
    for nub in (7, 64, 512):
        c = Context(model, n_ctx=1024, n_ubatch=nub, n_seq_max=n_par)
        c.decode(b)
        assert torch.equal(c.get_logits()[rows], ref), f"n_ubatch={nub}"


def test_cached_decode_equals_recompute(model):
    t = toks(N, 3)
    ref = alone(model, t)
    c = Context(model, n_ctx=256)
    c.decode(Batch(t[:50], output=[True] * 50))
    got = [c.get_logits()]
    for x in t[50:]:
        c.decode(Batch([x]))
        got.append(c.logits(-1)[None])
    assert torch.equal(torch.cat(got), ref)


def test_one_vs_two_threads(gguf_dir):
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(N, 4)
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = [alone(model, t, nub) for nub in (1, 64)]
        torch.set_num_threads(2)
        b = [alone(model, t, nub) for nub in (1, 64)]
    finally:
        torch.set_num_threads(n0)
    assert all(torch.equal(x, a[0]) for x in a + b)


def test_negative_batch_dependent_path_is_caught(gguf_dir):
    """With invariance off (raw F.linear, fused SDPA), the same checks fail: they can fail."""
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(N, 5)
    fast = Numerics(invariant=False)
    ref = alone(model, t, numerics=fast)
    diffs = [not torch.equal(alone(model, t, nub, numerics=fast), ref) for nub in (1, 7)]
    assert any(diffs)
    # still the same numbers to float tolerance: only the summation order moved
    torch.testing.assert_close(alone(model, t, 1, numerics=fast), ref, rtol=1e-4, atol=1e-4)


def test_two_contexts_with_different_numerics_in_one_process(gguf_dir):
    """Numerics are a value of each context, not a process mode: an invariant and a fast context
    decoding in turn each give exactly what they give alone."""
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(N, 9)
    fast = Numerics(invariant=False)
    steps = [Batch(t[i:i + 16], pos=list(range(i, min(N, i + 16))), output=[True] * len(t[i:i + 16]))
             for i in range(0, N, 16)]

    def run_alone(nx):
        c = Context(model, n_ctx=256, n_ubatch=7, numerics=nx)
        out = []
        for b in steps:
            c.decode(b)
            out.append(c.get_logits())
        return out

    inv_alone, fast_alone = run_alone(None), run_alone(fast)
    a, b = Context(model, n_ctx=256, n_ubatch=7), Context(model, n_ctx=256, n_ubatch=7, numerics=fast)
    for k, step in enumerate(steps):  # interleaved: a, b, a, b, ...
        a.decode(step)
        b.decode(step)
        assert torch.equal(a.get_logits(), inv_alone[k]) and torch.equal(b.get_logits(), fast_alone[k])
    assert not all(torch.equal(x, y) for x, y in zip(inv_alone, fast_alone))  # the two modes really differ


def test_self_test_is_fast_and_picks_a_rule():
    rep = calibrate.report()
    assert rep["norms_invariant"] and rep["min_rows"] >= 1
    assert rep["seconds"] < 10  # "well under 2 s" on an idle machine; loose bound for a loaded CI box


def test_long_sequences_skip_key_blocks_exactly(gguf_dir):
    """300 tokens: 5 query tiles, 5 key blocks; each tile computes only the blocks its queries can
    see (a decode step computes all of its own). Whole-prompt, chunked and cached decode agree."""
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(300, 6)
    c = Context(model, n_ctx=512)
    c.decode(Batch(t, output=[True] * 300))
    ref = c.get_logits()
    for nub in (64, 100):
        c = Context(model, n_ctx=512, n_ubatch=nub)
        c.decode(Batch(t, output=[True] * 300))
        assert torch.equal(c.get_logits(), ref), f"n_ubatch={nub}"
    c = Context(model, n_ctx=512)
    c.decode(Batch(t[:290]))
    for i, x in enumerate(t[290:]):
        c.decode(Batch([x]))
        assert torch.equal(c.logits(-1), ref[290 + i])


@pytest.mark.parametrize("backend", ["blas", "onednn", "per-block-scores"])
def test_fallback_paths_stay_invariant(gguf_dir, backend):
    """The paths the self-test falls back to on other machines: BLAS sgemm linears with their own
    padding rule, oneDNN on plain weights, and one score product per key block."""
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = toks(N, 7)
    rule = Numerics().linear_rule()
    if backend == "per-block-scores":
        rule = replace(rule, mm_cols=False)
    else:
        # the first rule of this backend (4+ rows) that passes the calibration's own self-test here
        b, lo, mult = next(r for r in calibrate.LINEAR_RULES
                           if r[0] == backend and r[1] >= 4 and calibrate.linear_rule_ok(*r))
        rule = replace(rule, backend=b, min_rows=lo, multiple=mult)
    nx = Numerics(rule=rule)
    ref = alone(model, t, numerics=nx)
    for nub in (1, 7):
        assert torch.equal(alone(model, t, nub, numerics=nx), ref), f"{backend} n_ubatch={nub}"


def test_ggml_numerics_keeps_invariance(gguf_dir):
    """Activation rounding per row and block depends on the row alone."""
    model = load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf")
    t = toks(N, 8)
    ggml = Numerics(ggml=True)
    ref = alone(model, t, numerics=ggml)
    for nub in (1, 7):
        assert torch.equal(alone(model, t, nub, numerics=ggml), ref)
    assert not torch.equal(alone(model, t), ref)  # and it does change the numbers
