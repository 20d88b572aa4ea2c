"""Hybrid memory and hybrid models (issue 21): grouped Mamba2, Jamba (dense and MoE) and Granite 4
hybrid against llama.cpp's perplexity, bitwise invariance across -b/-ub splits and parallel
sequences, the hybrid memory's semantics, HellaSwag with coupled sequences and pooled embeddings
against transformers.

Reference figures: ../shared/README.md, "The zoo" table, column ``llama.cpp -b 512 -fa off -ctk f32
-ctv f32 (exact)``: ``llama-perplexity -c 128 --chunks 100 -t 2`` on the first 200,000 bytes of
wikitext-2 (llama.cpp 0.5.0-dev, commit 0c1e570, vendored in llama-cpp-python 0.3.36).
"""
from __future__ import annotations

import pytest
import torch

from gguf_runtime.batch import Batch, BatchAllocator
from gguf_runtime.context import Context
from gguf_runtime.errors import BatchError, MemoryFullError
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.memory.hybrid import HybridMemory
from gguf_runtime.memory.kv_cache import LayerKV
from gguf_runtime.memory.recurrent import LayerState
from gguf_runtime.models import load_model
from gguf_runtime.tokenizer import Tokenizer
from gguf_runtime.tools import tasks
from gguf_runtime.tools.embedding import Embedder
from gguf_runtime.tools.perplexity import perplexity
from helpers import tiny_ppl, toks, wiki_tokens
from test_tasks import _hf_scores

LLAMA_CPP_PPL = {  # ../shared/README.md, exact column
    "mamba2g": 2844.8503,
    "jamba": 1085.0884,
    "jamba-moe": 1122.5824,
    "granitehybrid": 688.9245,
}
HYBRIDS = ("jamba", "jamba-moe", "granitehybrid")

_models: dict[str, object] = {}


def model(gguf_dir, name: str):
    if name not in _models:
        _models[name] = load_model(gguf_dir / f"{name}-tiny-f32.gguf", device="cpu")
    return _models[name]


def ctx(m, n_seq: int = 1, n_ubatch: int = 512, n_ctx: int = 1024) -> Context:
    return Context(m, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch, n_seq_max=n_seq)


def alone(m, t: list[int]) -> torch.Tensor:
    c = ctx(m)
    c.decode(Batch(t, output=[True] * len(t)))
    return c.get_logits()


# -- llama.cpp's perplexity ----------------------------------------------------------------------
@pytest.mark.slow  # ~15 s alone, a minute on a loaded machine
@pytest.mark.parametrize("name", list(LLAMA_CPP_PPL))
def test_perplexity_matches_llama_cpp(gguf_dir, wikitext, name):
    """-c 128 --chunks 100, four chunks per batch (-b 512) as llama.cpp's exact run."""
    r = tiny_ppl(gguf_dir / f"{name}-tiny-f32.gguf", wikitext, n_batch=512, model=model(gguf_dir, name))
    assert r.n_chunks == 100
    ref = LLAMA_CPP_PPL[name]
    assert abs(r.ppl - ref) / ref < 1e-4, (name, r.ppl, ref)


@pytest.mark.parametrize("name", list(LLAMA_CPP_PPL))
def test_perplexity_identical_across_splits(gguf_dir, wikitext, name):
    """One chunk per batch, or 16 chunks as parallel sequences in ubatches of 512, 37 or 7 tokens:
    the same chunk perplexities, bit for bit."""
    m = model(gguf_dir, name)
    ids, tok = wiki_tokens(gguf_dir / f"{name}-tiny-f32.gguf", wikitext, n_bytes=12_000)
    ref = perplexity(m, ids, n_ctx=128, n_batch=128, n_ubatch=128, n_chunks=6, bos=tok.bos_id)
    assert ref.n_chunks == 6
    for n_batch, n_ubatch in ((2048, 512), (512, 37), (256, 7)):
        r = perplexity(m, ids, n_ctx=128, n_batch=n_batch, n_ubatch=n_ubatch, n_chunks=6, bos=tok.bos_id)
        assert r.chunk_ppl == ref.chunk_ppl, (name, n_batch, n_ubatch)


# -- bitwise invariance of decode ----------------------------------------------------------------
@pytest.mark.parametrize("name", HYBRIDS)
def test_steps_and_neighbours_bitwise_invariant(gguf_dir, name):
    """A sequence decoded at once, in steps of 1, 7 or 33 tokens, or beside three other sequences in
    ubatches of 5, 36 or 400 tokens: the same logits (torch.equal)."""
    m = model(gguf_dir, name)
    t = toks(70, 1)
    ref = alone(m, t)
    for step in (1, 7, 33):
        c = ctx(m)
        out = []
        for p in range(0, len(t), step):
            c.decode(Batch(t[p:p + step], output=[True] * len(t[p:p + step])))
            out.append(c.get_logits())
        assert torch.equal(torch.cat(out), ref), (name, step)
    others = [toks(n, 10 + n) for n in (5, 90, 31)]
    for n_ubatch in (5, 36, 400):
        c = ctx(m, n_seq=4, n_ubatch=n_ubatch)
        c.decode(Batch.from_sequences([others[0], t, others[1], others[2]], outputs="all"))
        got = c.get_logits()[len(others[0]):len(others[0]) + len(t)]
        assert torch.equal(got, ref), (name, n_ubatch)
    # negative control: the check can fail (another sequence's logits differ)
    assert not torch.equal(alone(m, others[1])[:70], ref)


# -- the hybrid memory ---------------------------------------------------------------------------
def test_view_routes_layers_to_their_part(gguf_dir):
    m = model(gguf_dir, "jamba")
    assert m.args.n_head_kv == [0, 2, 0, 2]
    c = ctx(m)
    mem = c.memory
    assert isinstance(mem, HybridMemory) and mem.attn.layers == [1, 3] and mem.recr.layers == [0, 2]
    b = Batch(toks(4, 2), output=[True] * 4)
    ubs = mem.split(BatchAllocator(b, m.args.n_vocab, 1, mem), 512)
    assert all(u.equal_seqs for u in ubs)
    view = mem.apply(ubs[0])
    assert isinstance(view.layer(1), LayerKV) and view.layer(1).il == 0 and view.layer(3).il == 1
    assert isinstance(view.layer(0), LayerState) and view.layer(2).i == 1


def test_seq_rm_refused_by_the_recurrent_part_changes_nothing(gguf_dir):
    m = model(gguf_dir, "jamba")
    t = toks(30, 3)
    c = ctx(m, n_seq=2)
    c.decode(Batch.from_sequences([t, t[:10]], outputs="all"))
    mem = c.memory
    kv_before = (mem.attn.pos.clone(), mem.attn.seq.clone())
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0), mem.seq_pos_max(1)) == (29, 29, 9)
    assert mem.attn.seq_pos_min(0) == 0  # the KV part holds every position; the hybrid answers what both hold
    for p0, p1 in ((10, -1), (0, 20), (5, 12)):
        assert mem.seq_rm(0, p0, p1) is False
        assert torch.equal(mem.attn.pos, kv_before[0]) and torch.equal(mem.attn.seq, kv_before[1])
        assert mem.seq_pos_max(0) == 29
    assert mem.seq_rm(-1, 5, 10) is False and torch.equal(mem.attn.seq, kv_before[1])
    assert mem.seq_rm(0, 30, -1) is True and mem.seq_pos_max(0) == 29  # nothing after the state
    assert mem.seq_rm(0, 0, -1) is True
    assert mem.seq_pos_max(0) == -1 and mem.attn.seq_pos_max(0) == -1 and mem.seq_pos_max(1) == 9
    c.decode(Batch(t, seq_ids=[(0,)] * 30, output=[True] * 30))  # starts again from nothing
    assert torch.equal(c.get_logits(), alone(m, t))
    mem.seq_keep(1)
    assert mem.seq_pos_max(0) == -1 and mem.attn.n_used == 10 and mem.recr.n_used == 1
    with pytest.raises(BatchError, match="memory ends at position 9"):
        c.decode(Batch([5], pos=[3], seq_ids=[(1,)]))


def test_prepare_checks_both_parts_before_writing(gguf_dir):
    m = model(gguf_dir, "granitehybrid")
    # the KV part is full: nothing is written to either part
    c = ctx(m, n_seq=2, n_ctx=40)
    c.decode(Batch(toks(30, 4), output=[False] * 30))
    recr_meta, kv_pos = c.memory.recr.meta.copy(), c.memory.attn.pos.clone()
    with pytest.raises(MemoryFullError, match="KV cache full"):
        c.decode(Batch(toks(20, 5), seq_ids=[(1,)] * 20))
    assert c.memory.recr.meta == recr_meta and torch.equal(c.memory.attn.pos, kv_pos)
    # several ubatches: the last one overflows the KV part, so not even the first is written
    c = ctx(m, n_seq=2, n_ctx=40, n_ubatch=4)
    c.decode(Batch(toks(30, 4), output=[False] * 30))
    with pytest.raises(MemoryFullError):
        c.decode(Batch(toks(12, 5), seq_ids=[(1,)] * 12))
    assert c.memory.recr.meta == recr_meta and torch.equal(c.memory.attn.pos, kv_pos)
    assert c.memory.seq_pos_max(1) == -1


@pytest.mark.parametrize("name", ("jamba", "granitehybrid"))
def test_seq_cp_and_coupled_prefix_equal_independent_runs(gguf_dir, name):
    m = model(gguf_dir, name)
    prefix, conts = toks(20, 8), [toks(n, 30 + n) for n in (5, 9, 1, 70)]
    refs = [alone(m, prefix + x)[len(prefix):] for x in conts]
    c = ctx(m, n_seq=4, n_ubatch=7)
    c.decode(Batch(prefix, output=[False] * 20))
    for s in (1, 2, 3):
        c.memory.seq_cp(0, s)
    assert [c.memory.seq_pos_max(s) for s in range(4)] == [19] * 4
    c.decode(Batch.from_sequences(conts, outputs="all"))
    out = c.get_logits().split([len(x) for x in conts])
    assert all(torch.equal(o, r) for o, r in zip(out, refs))
    # one batch: the prefix tokens carry all four sequence ids (computed once for the set)
    c = ctx(m, n_seq=4, n_ubatch=16)
    c.decode(Batch(prefix + sum(conts, []), seq_ids=[(0, 1, 2, 3)] * 20 + [(s,) for s, x in enumerate(conts) for _ in x],
                   output=[False] * 20 + [True] * sum(map(len, conts))))
    out = c.get_logits().split([len(x) for x in conts])
    assert all(torch.equal(o, r) for o, r in zip(out, refs))


def test_seq_add_moves_both_parts(gguf_dir):
    """No RoPE in Jamba's attention: shifting positions leaves the keys, so a shifted sequence
    continues exactly as one decoded at the shifted positions."""
    m = model(gguf_dir, "jamba")
    t = toks(12, 9)
    c = ctx(m)
    c.decode(Batch(t[:8]))
    c.memory.seq_add(0, 0, -1, 100)
    assert c.memory.seq_pos_max(0) == 107 and c.memory.attn.seq_pos_min(0) == 100
    c.decode(Batch(t[8:], output=[True] * 4))
    assert torch.equal(c.get_logits(), alone(m, t)[8:])


# -- tools on hybrid models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hs_tasks(shared):
    return tasks.load_hellaswag(tasks.read_prompt_file(shared / "data" / "hellaswag_val_full.txt.bz2").decode("utf-8"))


@pytest.mark.slow  # ~15 s alone, a minute on a loaded machine
def test_hellaswag_jamba_coupled_sequences_match_transformers(gguf_dir, shared, hs_tasks):
    """The shared context's state (KV cells and Mamba states) copied into four sequences scores
    every ending as transformers' Jamba scores it run whole; packing many tasks changes no bit."""
    transformers = pytest.importorskip("transformers")
    f = GGUFFile(gguf_dir / "jamba-tiny-f32.gguf")
    m, tok = model(gguf_dir, "jamba"), Tokenizer.from_gguf(f)
    chosen = tasks.select_hellaswag(hs_tasks, 6)
    packed = tasks.hellaswag(tasks.make_task_context(m), tok, chosen)
    single = tasks.hellaswag(tasks.make_task_context(m, max_seqs=4), tok, chosen)
    assert packed.scores == single.scores and packed.n_tasks == 6
    hf = transformers.JambaForCausalLM.from_pretrained(shared / "models" / "jamba-tiny-hf", dtype=torch.float32).eval()
    for scores, ref in zip(packed.scores, _hf_scores(hf, tok, chosen)):
        assert scores == pytest.approx(ref, abs=5e-5)


@pytest.mark.slow  # ~15 s alone, a minute on a loaded machine
def test_pooled_embeddings_across_ubatches_match_transformers(gguf_dir, shared):
    """Mean-pooled Granite-hybrid embeddings of 12 texts, many sequences per batch in ubatches of
    24 tokens: each equals the text embedded alone (torch.equal) and the mean of transformers' final
    hidden states (1e-5)."""
    transformers = pytest.importorskip("transformers")
    f = GGUFFile(gguf_dir / "granitehybrid-tiny-f32.gguf")
    m, tok = model(gguf_dir, "granitehybrid"), Tokenizer.from_gguf(f)
    texts = [f"The licence grants you the right number {k} to copy" + " and modify" * k for k in range(12)]
    ids = [tok.encode(t, add_special=True) for t in texts]
    many = Embedder(m, pooling="mean", n_batch=512, n_ubatch=24).embed_tokens(ids)
    for s, e in zip(ids, many):
        assert torch.equal(Embedder(m, pooling="mean", n_batch=512, n_ubatch=512).embed_tokens([s])[0], e)
    hf = transformers.GraniteMoeHybridModel.from_pretrained(shared / "models" / "granitehybrid-tiny-hf",
                                                            dtype=torch.float32).eval()
    for s, e in zip(ids[:4], many):
        with torch.inference_mode():
            h = hf(torch.tensor([s])).last_hidden_state[0].double().mean(0)
        assert torch.allclose(e.double(), h, atol=1e-5), (e.double() - h).abs().max()
