"""Gemma 2 / Gemma 3 and the iSWA (sliding-window) KV memory (issue 14).

References: transformers on the HF checkpoints in ../shared/models (gemma2-tiny-hf, gemma3-tiny-hf:
the GGUF files are llama.cpp's conversions of them), llama.cpp's perplexity figures in
../shared/README.md, llama.cpp's sliding-window rule (``llama_hparams::is_masked_swa``, standard
type: a key at position p0 is masked for a query at p1 when ``p1 - p0 >= n_swa``).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_ppl, toks

from gguf_runtime.batch import Batch, BatchAllocator
from gguf_runtime.context import Context
from gguf_runtime.errors import MemoryFullError
from gguf_runtime.memory.kv_iswa import KVCacheISWA, swa_cells
from gguf_runtime.models import load_model

FAMILIES = ["gemma2", "gemma3"]
HF_CLASS = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# ../shared/README.md, zoo table: llama-perplexity -c 128 --chunks 100 -t 2 -b 512 -fa off -ctk f32
# -ctv f32 on the first 200,000 bytes of wikitext-2 (llama.cpp 0.5.0-dev, commit 0c1e570)
LLAMA_CPP_EXACT = {"gemma2": 798.5702, "gemma3": 838.7090}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def models(gguf_dir):
    return {f: load_model(gguf_dir / f"{f}-tiny-f32.gguf") for f in FAMILIES}


def context(model, n_ctx=1024, n_ubatch=512, swa_full=False, sized=64, n_seq_max=1):
    """A context whose sliding cache is sized for ``sized``-token ubatches (window 32 + 64 -> 256
    cells, so a few hundred tokens make it reuse cells; larger ubatches are split to 64)."""
    c = Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch, swa_full=swa_full, n_seq_max=n_seq_max)
    if not swa_full:
        c.memory = model.make_memory(n_ctx, n_seq_max, c.numerics, n_ubatch=sized)
    return c


def logits_of(model, t, n_ctx=1024, n_ubatch=512, swa_full=False):
    c = context(model, n_ctx, n_ubatch, swa_full)
    c.decode(Batch(t, output=[True] * len(t)))
    return c.get_logits(), c


# -- the model files ---------------------------------------------------------------------------------
def test_hparams(models):
    a2, a3 = models["gemma2"].args, models["gemma3"].args
    assert a2.swa_layers == [True, False, True, False] and a2.window == 32  # HF layer_types
    assert (a2.attn_softcap, a2.final_softcap) == (50.0, 30.0)
    assert a3.swa_layers == [True] * 5 + [False] and a3.window == 32
    assert (a3.rope_base, a3.rope_base_swa, a3.final_softcap) == (1e6, 1e4, 0.0)
    assert a2.attn_scale == a3.attn_scale == 1 / math.sqrt(32)  # query_pre_attn_scalar = head_dim = 32


@pytest.mark.parametrize("fam", FAMILIES)
def test_matches_transformers(models, shared, fam):
    """Logits of 100 tokens (the 32-token window crossed three times) against transformers on the
    checkpoint llama.cpp converted."""
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, HF_CLASS[fam]).from_pretrained(
        shared / "models" / f"{fam}-tiny-hf", dtype=torch.float32, attn_implementation="eager").eval()
    t = [1] + toks(99, 5)
    ours, _ = logits_of(models[fam], t, n_ctx=256)
    with torch.no_grad():
        ref = hf(torch.tensor([t])).logits[0]
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, err
    # the window matters: transformers attending globally everywhere is far from both
    glob = getattr(transformers, HF_CLASS[fam]).from_pretrained(
        shared / "models" / f"{fam}-tiny-hf", dtype=torch.float32, attn_implementation="eager",
        sliding_window=4096).eval()
    with torch.no_grad():
        far = glob(torch.tensor([t])).logits[0]
    assert (ours - far).abs().max() / ref.abs().max() > 100 * err


# -- the sliding-window memory -----------------------------------------------------------------------
def test_window_rule_is_llama_cpp(models):
    """A key is visible to a query ``d`` positions ahead iff 0 <= d < n_swa (is_masked_swa)."""
    m = models["gemma3"]
    _, c = logits_of(m, toks(100, 1), n_ctx=256)
    ub = next(BatchAllocator(Batch([7]), m.args.n_vocab, 1, c.memory).split_simple(1))
    g = c.memory.swa.apply(ub).groups[0]
    kpos = ub.pos[0] - g.dist[0]
    assert set(kpos[g.mask[0]].tolist()) == set(range(100 - 32 + 1, 101))
    assert int(kpos[0]) % 64 == 0  # key blocks aligned to absolute positions


def test_window_cache_reuses_cells_and_changes_no_bit(models):
    """320 tokens through a 256-cell sliding cache (window 32 + ubatch 64, padded) give the same
    bits as the full-size cache (swa_full), in any ubatch split, alone or beside another sequence."""
    m = models["gemma3"]
    t = [1] + toks(319, 2)
    ref, cref = logits_of(m, t, swa_full=True)
    assert cref.memory.swa.n_ctx == 1024
    win, c = logits_of(m, t)
    assert c.memory.swa.n_ctx == swa_cells(32, 1024, 1, 64) == 256
    assert int(c.memory.swa.lost[0, 1]) > 0  # cells were reused: positions dropped
    assert torch.equal(win, ref)
    for nub in (7,):
        assert torch.equal(logits_of(m, t, n_ubatch=nub)[0], ref), nub
    # token by token at the end, and beside a second sequence sharing the ubatches
    c = context(m, n_seq_max=2)
    assert c.memory.swa.n_ctx == 256
    other = [1] + toks(319, 9)
    c.decode(Batch(t[:300] + other[:300], list(range(300)) * 2, [[0]] * 300 + [[1]] * 300, [True] * 300 + [False] * 300))
    assert torch.equal(c.get_logits(), ref[:300])
    rows = []
    for i in range(300, 320):
        c.decode(Batch([t[i], other[i]], [i, i], [[0], [1]], [True, False]))
        rows.append(c.logits(0))
    assert torch.equal(torch.stack(rows), ref[300:])
    # negative control: torch.equal sees a one-token change inside the window
    t2 = list(t)
    t2[310] = t2[310] + 1
    assert not torch.equal(logits_of(m, t2)[0][315], ref[315])


def test_seq_rm_on_window_cache(models):
    """A removal after which the next position would need a dropped key returns False and changes
    nothing; a possible one leaves a state that continues bit-exactly like the full cache."""
    m = models["gemma2"]
    t = [1] + toks(319, 3)
    _, c = logits_of(m, t)
    mem: KVCacheISWA = c.memory
    lo, hi = mem.swa.lost[0].tolist()
    assert lo == 0 and hi >= 60
    before = (mem.swa.pos.clone(), mem.swa.seq.clone(), mem.base.pos.clone(), mem.base.seq.clone())
    assert mem.seq_rm(0, 50) is False  # positions 19..49 were dropped
    assert mem.seq_rm(0, hi + 5) is False  # the next position, hi + 5, would see hi
    after = (mem.swa.pos, mem.swa.seq, mem.base.pos, mem.base.seq)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert mem.seq_rm(0, 300) is True  # positions 269.. are all held
    assert mem.seq_pos_max(0) == 299
    c.decode(Batch(t[300:], output=[True] * 20))
    assert torch.equal(c.get_logits(), logits_of(m, t, swa_full=True)[0][300:])
    assert mem.seq_rm(0, 0) is True and mem.seq_pos_max(0) == -1  # everything: always possible
    assert mem.swa.lost[0].tolist() == [-1, -1]


def test_shift_into_dropped_positions_is_refused(models):
    """seq_add bringing dropped positions back into a window: the next decode is refused before
    anything is written; with swa_full the shift works."""
    m = models["gemma2"]
    t = [1] + toks(319, 4)
    _, c = logits_of(m, t)
    c.memory.seq_rm(0, 10, 20)  # a hole in the middle: always possible
    c.memory.seq_add(0, 20, -1, -500)  # positions 20.. -> -480..: those below 0 go, the rest shift back
    used = c.memory.swa.n_used
    with pytest.raises(MemoryFullError, match="swa_full"):
        c.decode(Batch([5]))
    assert c.memory.swa.n_used == used
    _, f = logits_of(m, t, swa_full=True)
    f.memory.seq_rm(0, 10, 20)
    f.memory.seq_add(0, 20, -1, -500)
    f.decode(Batch([5]))
    assert torch.isfinite(f.logits(-1)).all()


def test_kv_bytes_bounded(models):
    """The sliding layers hold window + ubatch cells, not n_ctx."""
    m = models["gemma3"]
    full = Context(m, n_ctx=8192, swa_full=True).memory.nbytes
    win = Context(m, n_ctx=8192).memory.nbytes
    per_cell_layer = 2 * 2 * 32 * 4  # K and V, 2 KV heads x 32, float32
    assert full == 6 * 8193 * per_cell_layer
    assert win == (1 * 8193 + 5 * 769) * per_cell_layer


# -- perplexity against llama.cpp --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_tiny_perplexity_matches_llama_cpp(models, gguf_dir, wikitext, fam):
    """-c 128 --chunks 100 (16 chunks decoded as parallel sequences) within 0.01% of llama.cpp's
    exact column, and the same digits with -b 512 -ub 7 (4 sequences, 7-token ubatches)."""
    path = gguf_dir / f"{fam}-tiny-f32.gguf"
    r = tiny_ppl(path, wikitext, model=models[fam])
    assert abs(r.ppl / LLAMA_CPP_EXACT[fam] - 1) < 1e-4, r.ppl
    r2 = tiny_ppl(path, wikitext, n_batch=512, n_ubatch=7, model=models[fam])
    assert f"{r2.ppl:.4f}" == f"{r.ppl:.4f}" and r2.chunk_ppl == r.chunk_ppl


# ../shared/README.md, zoo table: llama.cpp's defaults (flash attention, f16 K/V, quantized
# activations) on the Q4_K_M files, same chunks as LLAMA_CPP_EXACT
LLAMA_CPP_Q4 = {"gemma2": 796.8950, "gemma3": 835.5979}


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_tiny_q4_k_m_within_llama_cpp_quantized_spread(gguf_dir, wikitext, fam):
    """The Q4_K_M files: dequantized weights with float32 activations, and ggml numerics (activations
    rounded as llama.cpp's CPU backend rounds them, f16 K/V), both within 0.1% of llama.cpp's figure
    (measured: +0.024% / -0.009% for gemma2, +0.037% / -0.005% for gemma3)."""
    from gguf_runtime import numerics
    from gguf_runtime.numerics import Numerics

    path = gguf_dir / f"{fam}-tiny-Q4_K_M.gguf"
    m = load_model(path)
    plain = tiny_ppl(path, wikitext, model=m).ppl
    with numerics.use(Numerics(ggml=True)):
        ggml = tiny_ppl(path, wikitext, model=m).ppl
    for got in (plain, ggml):
        assert abs(got / LLAMA_CPP_Q4[fam] - 1) < 1e-3, (plain, ggml)
    assert abs(plain / LLAMA_CPP_EXACT[fam] - 1) > 1e-4  # the quantized file really differs from f32


# gemma-3-270m Q4_K_M (gguf_runtime.fixtures.gemma3_path) on wikitext-2-test.txt, -c 512, first
# chunk's PPL (BOS first, second half scored): transformers 5.24 loading the same GGUF
# (from_pretrained(gguf_file=...), dequantized to float32, eager attention) -> 7.076674748739094
GEMMA3_270M_TRANSFORMERS_CHUNK1 = 7.076674748739094
# llama-perplexity (the tree vendored in llama-cpp-python 0.3.36, built here on CPU, 2 threads) over
# the whole file, -c 512 --chunks 20:
# - on the Q4_K_M file, -b 512 -fa off -ctk f32 -ctv f32 -> "Final estimate: PPL = 16.6672 +/- 0.73022"
#   (its defaults, flash attention and f16 K/V: 16.6255 +/- 0.72793);
# - on the same weights written as F32 (every tensor dequantized by gguf-py's `quants.dequantize`
#   into an F32 GGUF, metadata unchanged), -b 512 -fa off -ctk f32 -ctv f32
#   -> "[1]7.0769, ... Final estimate: PPL = 16.5622 +/- 0.72421".
# The two files hold the same weight values; the 0.63% between them is llama.cpp's arithmetic on
# quantized weights (Q8_0/Q8_K-rounded activations), which this model's outlier activations amplify.
GEMMA3_270M_LLAMA_CPP_C512 = 16.6672
GEMMA3_270M_LLAMA_CPP_F32_WEIGHTS_C512 = 16.5622


def _gemma3_270m_ppl(path, wikitext, n_chunks, numerics=None):
    from gguf_runtime import numerics as nxm
    from gguf_runtime.gguf.reader import GGUFFile
    from gguf_runtime.tokenizer import Tokenizer
    from gguf_runtime.tools.perplexity import perplexity

    tok = Tokenizer.from_gguf(GGUFFile(path))
    ids = torch.tensor(tok.encode(wikitext.read_text(encoding="utf-8"), add_special=True))
    with nxm.use(numerics or nxm.current()):
        return perplexity(load_model(path), ids, n_ctx=512, n_batch=512, n_chunks=n_chunks, bos=tok.bos_id)


@pytest.mark.slow
@pytest.mark.registry
def test_gemma3_270m_matches_transformers_on_the_gguf(gemma3, wikitext):
    """The real model's first 512-token chunk (crossing its 512-token window) against transformers
    computing from the same dequantized GGUF."""
    r = _gemma3_270m_ppl(gemma3, wikitext, 1)
    assert abs(r.chunk_ppl[0] / GEMMA3_270M_TRANSFORMERS_CHUNK1 - 1) < 1e-4, r.chunk_ppl[0]


@pytest.mark.slow
@pytest.mark.registry
def test_gemma3_270m_perplexity_matches_llama_cpp(gemma3, wikitext):
    """Issue 14's target, 20 chunks of 512: the default (float32) arithmetic equals llama.cpp on the
    same weight values in float32 within 0.01%, and ggml numerics (Q8-rounded activations, f32 K/V)
    are within 0.5% of llama.cpp on the Q4_K_M file itself. Rounding activations to Q8 makes this
    model chaotic in the products' last bits (an activation near a rounding step flips, and its
    outliers amplify it): on one 2-core Zen 5 box the same code gave 16.5905 with oneDNN's products
    and 16.6528 with the BLAS sgemm (llama.cpp there: 16.6672), on an Intel Xeon within 0.3%; the
    bound covers the products' order, not a model error (the float32 assertion is the tight one)."""
    from gguf_runtime.numerics import Numerics

    r = _gemma3_270m_ppl(gemma3, wikitext, 20)
    assert abs(r.ppl / GEMMA3_270M_LLAMA_CPP_F32_WEIGHTS_C512 - 1) < 1e-4, r.ppl
    g = _gemma3_270m_ppl(gemma3, wikitext, 20, Numerics(ggml=True, cache_k=torch.float32, cache_v=torch.float32))
    assert abs(g.ppl / GEMMA3_270M_LLAMA_CPP_C512 - 1) < 5e-3, g.ppl


def test_softcap_in_place_is_softcap():
    from gguf_runtime import kernels

    g = torch.Generator().manual_seed(1)
    for shape in ((3, 262144), (5, 1001), (1, 7)):
        x = torch.randn(*shape, generator=g) * 40
        assert torch.equal(kernels.softcap_(x.clone(), 30.0), kernels.softcap(x, 30.0))
