"""The zoo (issue 15): Qwen2, Qwen3, Phi-3, GPT-2, Mixtral (llama with experts), Qwen3-MoE.

References, all independent of our code: llama.cpp's perplexity figures for its own conversions of
the tiny fixtures (../shared/README.md), transformers on the HF checkpoints those files were converted
from, and llama.cpp's quantized runs. Batch invariance is ``torch.equal`` / identical floats.
"""
from __future__ import annotations

import pytest
import torch

from gguf_runtime import numerics
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.errors import BatchError
from gguf_runtime.models import load_model
from gguf_runtime.models.moe import route
from gguf_runtime.numerics import Numerics
from gguf_runtime.tools.embedding import Embedder
from helpers import alone, tiny_ppl, toks

# ../shared/README.md, "The zoo": llama-perplexity -c 128 --chunks 100 -t 2 on the first 200,000 bytes of
# wikitext-2-test.txt, llama.cpp 0.5.0-dev (commit 0c1e570). EXACT: -b 512 -fa off -ctk f32 -ctv f32 on the
# f32 file (value, +/- estimate); TRANSFORMERS: transformers scoring the same chunks; Q4: the Q4_K_M
# file with llama.cpp's defaults (flash attention, f16 K/V, quantized activations).
EXACT = {"qwen2": (686.1419, 20.36519), "qwen3": (661.0655, 19.70807), "phi3": (1038.8375, 41.84331),
         "gpt2": (788.2236, 21.70314), "mixtral": (1017.7396, 42.59099), "qwen3moe": (667.1095, 18.51390)}
TRANSFORMERS = {"qwen2": 686.1419, "qwen3": 661.0655, "phi3": 1038.8375, "gpt2": 788.2220, "mixtral": 1017.7396,
                "qwen3moe": 667.1094}
Q4 = {"qwen2": 687.7202, "qwen3": 662.2422, "phi3": 1035.3036, "gpt2": 788.8160, "mixtral": 1010.2021,
      "qwen3moe": 668.9639}
ZOO = list(EXACT)
HF = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel",
      "mixtral": "MixtralForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
F32_KV = Numerics(cache_k=torch.float32, cache_v=torch.float32)


def f32(gguf_dir, name):
    return gguf_dir / f"{name}-tiny-f32.gguf"


@pytest.fixture(scope="module")
def models(gguf_dir):
    cache = {}

    def get(name, kind="f32"):
        if (name, kind) not in cache:
            cache[name, kind] = load_model(gguf_dir / f"{name}-tiny-{kind}.gguf")
        return cache[name, kind]
    return get


@pytest.fixture(scope="module")
def ppl512(models, gguf_dir, wikitext):
    """Our -b 2048 -ub 512 run of each f32 fixture (computed once)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_ppl(f32(gguf_dir, name), wikitext, model=models(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name", ZOO)
def test_f32_perplexity_matches_llama_cpp(name, ppl512):
    r = ppl512(name)
    ppl, err = EXACT[name]
    assert r.n_chunks == 100
    assert abs(r.ppl - ppl) / ppl < 1e-4, f"{name}: {r.ppl:.4f} vs llama.cpp {ppl}"
    assert abs(r.ppl_err - err) / err < 1e-3
    assert abs(r.ppl - TRANSFORMERS[name]) / TRANSFORMERS[name] < 1e-5  # float32 math, as transformers'


@pytest.mark.parametrize("name", ZOO)
def test_perplexity_identical_across_batch_splits(name, models, gguf_dir, wikitext, ppl512):
    """-b 512 gives the same float over all 100 chunks; -ub 7 the same per-chunk NLLs (12 chunks here,
    all 100 in the slow test)."""
    ref = ppl512(name)
    m = models(name)
    assert tiny_ppl(f32(gguf_dir, name), wikitext, n_batch=512, model=m).ppl == ref.ppl
    r7 = tiny_ppl(f32(gguf_dir, name), wikitext, n_ubatch=7, n_chunks=12, model=m)
    assert r7.chunk_nll == ref.chunk_nll[:12]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_perplexity_ubatch_7_all_chunks(name, models, gguf_dir, wikitext, ppl512):
    assert tiny_ppl(f32(gguf_dir, name), wikitext, n_ubatch=7, model=models(name)).ppl == ppl512(name).ppl


def test_gpt2_exact_column_needs_ggml_gelu_table(models, gguf_dir, wikitext, ppl512):
    """llama.cpp's CPU GELU reads an f16 table: with ggml numerics (which use it) and f32 K/V, GPT-2's
    perplexity is llama.cpp's exact column to 4 decimals; the plain tanh GELU gives transformers' figure."""
    nx = Numerics(ggml=True, cache_k=torch.float32, cache_v=torch.float32)
    with numerics.use(nx):
        r = tiny_ppl(f32(gguf_dir, "gpt2"), wikitext, model=models("gpt2"))
    assert abs(r.ppl - EXACT["gpt2"][0]) < 1.5e-4, f"{r.ppl:.5f}"
    assert abs(r.ppl_err - EXACT["gpt2"][1]) < 2e-5
    assert abs(ppl512("gpt2").ppl - TRANSFORMERS["gpt2"]) < 1.5e-4  # without the table: transformers' number
    assert abs(ppl512("gpt2").ppl - r.ppl) > 1e-3  # the table is what moves it


def test_ggml_gelu_table_values():
    """ggml_gelu on the CPU: inputs rounded to f16, tanh GELU rounded to f16; saturation at +/-10."""
    from gguf_runtime.kernels.elementwise import gelu_ggml, gelu_tanh
    x = torch.linspace(-12, 12, 20001)
    with numerics.use(Numerics(ggml=True)):
        y = gelu_tanh(x)
    assert torch.equal(y, gelu_ggml(x))
    ref = torch.nn.functional.gelu(x.half().double(), approximate="tanh").half().float()  # the formula in f64
    pos, mid, neg = (x >= 0) & (x < 10), (x > -3) & (x < 0), (x > -10) & (x <= -3)
    assert torch.equal(y[pos], ref[pos])
    assert ((y[mid] - ref[mid]).abs() <= ref[mid].abs() * 2 ** -10).all() and (y[mid] != ref[mid]).float().mean() < 0.01
    # below -3 ggml's float32 ``1 + tanh(...)`` cancels: tiny values, off by up to 2x, as llama.cpp computes them
    assert (y[neg] - ref[neg]).abs().max() < 1e-4 and (y[neg] != ref[neg]).any()
    assert torch.equal(y[x >= 10], x[x >= 10]) and torch.all(y[x <= -10] == 0)
    assert not torch.equal(y, gelu_tanh(x))  # the default path is the float32 formula


@pytest.mark.parametrize("name", ZOO)
def test_q4_k_m_within_llama_cpp_quantized_spread(name, gguf_dir, wikitext, models):
    """Dequantized weights with float32 activations, and ggml numerics (activations quantized as
    llama.cpp's CPU backend does, f16 K/V): both within 0.1% of llama.cpp's Q4_K_M figure (its own f32
    runs with and without flash attention / f16 K/V already differ by up to 0.01%)."""
    path, m = gguf_dir / f"{name}-tiny-Q4_K_M.gguf", models(name, "Q4_K_M")
    plain = tiny_ppl(path, wikitext, model=m).ppl
    with numerics.use(Numerics(ggml=True)):
        ggml = tiny_ppl(path, wikitext, model=m).ppl
    for got in (plain, ggml):
        assert abs(got - Q4[name]) / Q4[name] < 1e-3, f"{name}: {plain:.4f} / {ggml:.4f} vs {Q4[name]}"
    assert abs(plain - EXACT[name][0]) / EXACT[name][0] > 1e-4  # the quantized file really differs from f32


@pytest.mark.parametrize("name", ZOO)
def test_logits_match_transformers(name, models, shared):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, HF[name]).from_pretrained(shared / "models" / f"{name}-tiny-hf",
                                                         dtype=torch.float32).eval()
    t = toks(96, 11)
    with torch.inference_mode():
        ref = hf(torch.tensor([t])).logits[0]
    got = alone(models(name), t)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# -- mixture of experts: batch invariance ----------------------------------------------------------
N = 80


@pytest.fixture(scope="module", params=[("mixtral", "f32"), ("qwen3moe", "f32"), ("mixtral", "Q4_K_M")],
                ids=["mixtral", "qwen3moe", "mixtral-Q4_K_M"])
def moe_model(request, models):
    return models(*request.param)


def test_moe_ubatch_sizes(moe_model):
    t = toks(N, 21)
    ref = alone(moe_model, t)
    for nub in (1, 7, 64):
        assert torch.equal(alone(moe_model, t, nub), ref), f"n_ubatch={nub}"


@pytest.mark.parametrize("n_par", [4, 8])
def test_moe_random_neighbours(moe_model, n_par):
    """The sequence's tokens share experts with random other sequences' tokens in every ubatch: the
    per-expert groups change size and membership, the rows' bits do not."""
    t = toks(N, 22)
    ref = alone(moe_model, t)
    g = torch.Generator().manual_seed(n_par)
    seqs = [t] + [toks(int(torch.randint(5, 120, (1,), generator=g)), 200 + k) for k in range(n_par - 1)]
    owner = torch.tensor([s for s, q in enumerate(seqs) for _ in q])[torch.randperm(sum(map(len, seqs)), generator=g)].tolist()
    nxt = [iter(q) for q in seqs]
    b = Batch([next(nxt[s]) for s in owner], seq_ids=[(s,) for s in owner], output=[True] * len(owner))
    rows = [j for j, s in enumerate(owner) if s == 0]
    for nub in (7, 64, 512):
        c = Context(moe_model, n_ctx=1024, n_ubatch=nub, n_seq_max=n_par)
        c.decode(b)
        assert torch.equal(c.get_logits()[rows], ref), f"n_ubatch={nub}"


def test_moe_check_can_fail(models):
    """Negative control: with invariance off the same comparison fails, and the experts really are
    shared unevenly (so grouping by expert is exercised)."""
    m = models("mixtral")
    t = toks(N, 23)
    fast = Numerics(invariant=False)
    ref = alone(m, t, numerics=fast)
    assert any(not torch.equal(alone(m, t, nub, numerics=fast), ref) for nub in (1, 7))
    blk = m.blk[0]
    x = blk.ffn_norm(m.token_embd(torch.tensor(t)))
    sel, w = route(blk.ffn_gate_inp(x), 2)
    counts = torch.bincount(sel.flatten(), minlength=4)
    assert (counts > 0).all() and counts.max() > counts.min()
    torch.testing.assert_close(w.sum(-1), torch.ones(N))  # renormalised top-2


@pytest.mark.parametrize("name,kind", [("mixtral", "Q4_K_M"), ("qwen3moe", "f32")])
def test_moe_lazy_weights_equal_resident(name, kind, gguf_dir, models):
    """--weights lazy dequantizes one expert at a time: the same bits as the resident weights."""
    t = toks(40, 24)
    lazy = load_model(gguf_dir / f"{name}-tiny-{kind}.gguf", weights="lazy")
    assert lazy.blk[0].ffn_up_exps.lazy is not None and lazy.blk[0].ffn_up_exps.weight is None
    assert torch.equal(alone(lazy, t, 7), alone(models(name, kind), t))


def test_moe_routing_matches_transformers(models, shared):
    """Top-2 experts and weights of every token equal transformers' Mixtral router on the same input."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(shared / "models" / "mixtral-tiny-hf", dtype=torch.float32).eval()
    m = models("mixtral")
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    sel, w = route(m.blk[1].ffn_gate_inp(x), 2)
    with torch.inference_mode():
        logits = torch.nn.functional.linear(x, hf.model.layers[1].mlp.gate.weight)
    p = logits.softmax(-1)
    hw, hsel = p.topk(2, -1)
    hw = hw / hw.sum(-1, keepdim=True)
    assert torch.equal(sel, hsel)
    torch.testing.assert_close(w, hw, rtol=1e-6, atol=1e-7)


# -- embeddings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embeddings_equal_transformers_hidden_states(pooling, models, shared):
    """Qwen3 (as Qwen3-Embedding is used) with --pooling last / mean: transformers' final hidden states
    (after the final norm) of each text, pooled the same way."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Model.from_pretrained(shared / "models" / "qwen3-tiny-hf", dtype=torch.float32).eval()
    seqs = [toks(n, 30 + n) for n in (1, 5, 37, 64, 90)]
    emb = Embedder(models("qwen3"), pooling=pooling, n_batch=256, n_ubatch=7).embed_tokens(seqs, normalize_mode=-1)
    for s, e in zip(seqs, emb):
        with torch.inference_mode():
            h = hf(torch.tensor([s])).last_hidden_state[0]
        ref = h[-1] if pooling == "last" else h.double().mean(0).float()
        torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-5)
    alone_ = Embedder(models("qwen3"), pooling=pooling).embed_tokens(seqs[2:3], normalize_mode=-1)[0]
    assert torch.equal(alone_, emb[2])  # batched with others, split in 7-token ubatches: the same bits


# -- errors ----------------------------------------------------------------------------------------
def test_gpt2_position_past_table_is_one_line_error(models):
    m = models("gpt2")
    c = Context(m, n_ctx=2048)
    with pytest.raises(BatchError, match="past gpt2's 1024 learned positions"):
        c.decode(Batch([5, 6], pos=[1023, 1024]))


@pytest.mark.parametrize("name", ZOO)
def test_our_q4_k_m_scores_as_llama_cpps(name, gguf_dir, wikitext, tmp_path):
    """`gguf-runtime quantize F32 OUT Q4_K_M` on each family writes a file whose perplexity is within
    1% of llama.cpp's own Q4_K_M file's figure (llama-quantize's mix for these shapes), and which is not
    simply the f32 model."""
    from gguf_runtime.convert.quantize import quantize

    out = quantize(f32(gguf_dir, name), tmp_path / f"{name}-ours-Q4_K_M.gguf", "Q4_K_M", progress=False)
    ppl = tiny_ppl(out, wikitext).ppl
    assert abs(ppl - Q4[name]) / Q4[name] < 0.01, f"{name}: ours {ppl:.4f} vs llama.cpp {Q4[name]}"
    assert abs(ppl - EXACT[name][0]) / EXACT[name][0] > 1e-4
