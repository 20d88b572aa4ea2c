"""Batch, micro-batch splits, KV cache and the Llama graph (issue 3, items 2-5 and 8)."""
from __future__ import annotations

import pytest
import torch

from gguf_runtime.batch import Batch, BatchAllocator
from gguf_runtime.context import Context
from gguf_runtime.errors import BatchError, MemoryFullError
from gguf_runtime.memory.kv_cache import KVCache
from gguf_runtime.models import load_model


@pytest.fixture(scope="module")
def llama(gguf_dir):
    return load_model(gguf_dir / "llama-tiny-f32.gguf")


@pytest.fixture(scope="module")
def hf_llama(shared):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", dtype=torch.float32).eval()


def rand_tokens(n, seed=0, vocab=2048):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- batch validation ------------------------------------------------------------------------------
def test_batch_errors(llama):
    ctx = Context(llama, n_ctx=64, n_batch=32, n_seq_max=2)
    with pytest.raises(BatchError, match="empty batch"):
        ctx.decode(Batch([]))
    with pytest.raises(BatchError, match="invalid seq_id"):
        ctx.decode(Batch([5, 6], seq_ids=[0, 2]))
    with pytest.raises(BatchError, match="invalid token"):
        ctx.decode(Batch([5, 4096]))
    with pytest.raises(BatchError, match="exceeds n_batch"):
        ctx.decode(Batch(rand_tokens(33)))
    ctx.decode(Batch([5, 6, 7]))
    with pytest.raises(BatchError, match="must continue"):
        ctx.decode(Batch([8], pos=[7]))
    with pytest.raises(BatchError, match="not continuous"):
        ctx.decode(Batch([8, 9], pos=[0, 2], seq_ids=[1, 1]))
    with pytest.raises(BatchError, match="decreasing"):
        ctx.decode(Batch([8, 9], pos=[1, 0], seq_ids=[1, 1]))
    # omitted positions continue the sequence in memory
    ctx.decode(Batch([8, 9]))
    assert ctx.memory.seq_pos_max(0) == 4
    with pytest.raises(BatchError, match="not marked as an output"):
        ctx.logits(0)
    with pytest.raises(BatchError, match="out of range"):
        ctx.logits(-2)


def test_context_overflow_leaves_memory_untouched(llama):
    ctx = Context(llama, n_ctx=16, n_batch=16, n_ubatch=4)
    ctx.decode(Batch(rand_tokens(10)))
    with pytest.raises(MemoryFullError, match="KV cache full"):
        ctx.decode(Batch(rand_tokens(8)))
    assert ctx.memory.n_used == 10 and ctx.memory.seq_pos_max(0) == 9


# -- splits ----------------------------------------------------------------------------------------
def _ragged_batch():
    # three sequences of lengths 5, 3, 7, interleaved in the user's order
    seqs = {0: rand_tokens(5, 1), 1: rand_tokens(3, 2), 2: rand_tokens(7, 3)}
    order = [0, 1, 2, 2, 0, 1, 2, 0, 2, 0, 1, 2, 0, 2, 2]
    it = {s: iter(t) for s, t in seqs.items()}
    toks = [next(it[s]) for s in order]
    return Batch(toks, seq_ids=[(s,) for s in order], output=[True] * len(order)), seqs, order


def test_split_simple_equal_seq():
    b, seqs, order = _ragged_batch()
    a = BatchAllocator(b, 2048, 4)
    ubs = list(a.split_simple(4))
    assert [u.n_tokens for u in ubs] == [4, 4, 4, 3]
    assert torch.cat([u.idx for u in ubs]).tolist() == list(range(15))

    a = BatchAllocator(b, 2048, 4)
    ubs = list(a.split_equal(6))
    for u in ubs:
        assert u.equal_seqs and u.n_tokens == u.n_seqs * u.n_seq_tokens
        sid = [s[0] for s in u.seq_ids]
        # sequence-major layout, one sequence per block, distinct sequences
        blocks = [sid[i * u.n_seq_tokens:(i + 1) * u.n_seq_tokens] for i in range(u.n_seqs)]
        assert all(len(set(bl)) == 1 for bl in blocks) and len({bl[0] for bl in blocks}) == u.n_seqs
    assert sorted(torch.cat([u.idx for u in ubs]).tolist()) == list(range(15))
    # each sequence's tokens stay in order across ubatches
    for s in seqs:
        got = [int(i) for u in ubs for i, q in zip(u.idx, u.seq_ids) if q[0] == s]
        assert got == sorted(got)
    # first ubatch: 3 sequences, 2 tokens each (6 // 3)
    assert (ubs[0].n_seqs, ubs[0].n_seq_tokens) == (3, 2)

    a = BatchAllocator(b, 2048, 4)
    ubs = list(a.split_seq(4))
    assert all(len({q[0] for q in u.seq_ids}) == 1 for u in ubs)
    assert sorted(torch.cat([u.idx for u in ubs]).tolist()) == list(range(15))


def test_outputs_in_user_order_and_negative_index(llama):
    b, seqs, order = _ragged_batch()
    ctx = Context(llama, n_ctx=64, n_ubatch=4, n_seq_max=3)
    ctx.decode(b)
    got = ctx.get_logits()
    for s, toks in seqs.items():
        c = Context(llama, n_ctx=64)
        c.decode(Batch(toks, output=[True] * len(toks)))
        rows = [i for i, q in enumerate(order) if q == s]
        assert torch.equal(got[rows], c.get_logits())
    assert torch.equal(ctx.logits(-1), got[-1]) and torch.equal(ctx.logits(3), got[3])


# -- KV cache sequence operations ----------------------------------------------------------------
def test_kv_seq_ops():
    kv = KVCache(n_layer=1, n_ctx=16, n_seq_max=3, n_head_kv=1, head_dim_k=4)
    b = BatchAllocator(Batch(list(range(1, 7)), seq_ids=[0, 0, 0, 1, 1, 1]), 100, 3, kv)
    for u in kv.split(b, 8):
        kv.apply(u)
    assert (kv.seq_pos_min(0), kv.seq_pos_max(0), kv.seq_pos_max(1)) == (0, 2, 2)
    kv.seq_cp(0, 2, 0, 2)  # positions [0, 2)
    assert (kv.seq_pos_min(2), kv.seq_pos_max(2), kv.n_used) == (0, 1, 6)
    kv.seq_rm(0, 1, -1)
    assert kv.seq_pos_max(0) == 0 and kv.n_used == 5  # pos 2 freed; pos 1 still held by seq 2
    kv.seq_add(1, 1, -1, 10)
    assert kv.pos[kv.seq[:, 1]].sort().values.tolist() == [0, 11, 12] and kv.has_shift
    kv.seq_div(1, 10, -1, 2)
    assert kv.pos[kv.seq[:, 1]].sort().values.tolist() == [0, 5, 6]
    kv.seq_keep(2)
    assert kv.n_used == 2 and kv.seq_pos_max(0) == -1 and kv.seq_pos_max(1) == -1
    kv.seq_rm(-1)
    assert kv.n_used == 0


def test_seq_add_rerotates_cached_keys(llama):
    """Shifting a cached sequence by +d equals having decoded it at positions +d (K re-rotation)."""
    toks = rand_tokens(12, 5)
    a = Context(llama, n_ctx=64)
    a.decode(Batch(toks[:8], pos=list(range(3, 11))))
    a.memory.seq_add(0, 0, -1, -3)  # now at 0..7
    a.decode(Batch(toks[8:], output=[True] * 4))
    b = Context(llama, n_ctx=64)
    b.decode(Batch(toks, output=[False] * 8 + [True] * 4))
    torch.testing.assert_close(a.get_logits(), b.get_logits(), rtol=1e-4, atol=1e-4)


def test_seq_cp_shares_prefix(llama):
    """A prefix decoded once and copied to other sequences gives each the logits of a full decode."""
    pre, ends = rand_tokens(9, 7), [rand_tokens(4, 10 + k) for k in range(3)]
    ctx = Context(llama, n_ctx=64, n_seq_max=3)
    ctx.decode(Batch(pre, seq_ids=[(0, 1, 2)] * len(pre)))
    ctx.decode(Batch.from_sequences(ends, outputs="all"))
    for k, e in enumerate(ends):
        c = Context(llama, n_ctx=64)
        c.decode(Batch(pre + e, output=[False] * 9 + [True] * 4))
        assert torch.equal(ctx.get_logits()[4 * k:4 * k + 4], c.get_logits())


# -- numbers -----------------------------------------------------------------------------------------
def test_llama_tiny_matches_transformers(llama, hf_llama):
    toks = rand_tokens(96, 3)
    ctx = Context(llama, n_ctx=128)
    ctx.decode(Batch(toks, output=[True] * len(toks)))
    with torch.no_grad():
        ref = hf_llama(torch.tensor([toks])).logits[0]
    err = (ctx.get_logits() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5


def test_logits_independent_of_split_and_cache(llama):
    toks = rand_tokens(70, 11)
    ref = Context(llama, n_ctx=128, n_ubatch=512)
    ref.decode(Batch(toks, output=[True] * 70))
    full = ref.get_logits()
    for nub in (1, 7, 64):
        c = Context(llama, n_ctx=128, n_ubatch=nub)
        c.decode(Batch(toks, output=[True] * 70))
        assert (c.get_logits() - full).abs().max() <= 1e-5 * full.abs().max()
        assert torch.equal(c.get_logits(), full), f"n_ubatch={nub}"
    # cached decode, one token per call
    c = Context(llama, n_ctx=128)
    rows = []
    for t in toks:
        c.decode(Batch([t]))
        rows.append(c.logits(-1))
    assert torch.equal(torch.stack(rows), full)


@pytest.mark.registry
def test_smollm2_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32)
    ctx = Context.from_file(smollm2, n_ctx=64)
    toks = [1] + rand_tokens(40, 4, vocab=49152)
    ctx.decode(Batch(toks, output=[True] * len(toks)))
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0]
    rel = (ctx.get_logits() - ref).abs() / ref.abs().max()
    assert rel.max() < 1e-4


@pytest.mark.parametrize("params", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=["linear", "yarn"])
def test_rope_scaling_matches_transformers(gguf_dir, shared, params):
    """GGUF rope.scaling.{type,factor,original_context_length} semantics vs transformers' RoPE."""
    transformers = pytest.importorskip("transformers")
    from gguf_runtime.gguf.reader import GGUFFile

    cfg = transformers.LlamaConfig.from_pretrained(shared / "models" / "llama-tiny-hf")
    cfg.rope_parameters = {"rope_theta": 10000.0, **params}
    hf = transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", config=cfg, dtype=torch.float32).eval()
    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    f.metadata.update({"llama.rope.scaling.type": params["rope_type"], "llama.rope.scaling.factor": params["factor"],
                       "llama.rope.scaling.original_context_length": params.get("original_max_position_embeddings", 0)})
    model = load_model(f)
    assert model.args.rope_scaling["type"] == params["rope_type"]
    toks = rand_tokens(120, 9)
    ctx = Context(model, n_ctx=128)
    ctx.decode(Batch(toks, output=[True] * len(toks)))
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0]
    assert (ctx.get_logits() - ref).abs().max() / ref.abs().max() < 1e-5
    # and the scaling changed something (the test can fail)
    plain = Context(load_model(gguf_dir / "llama-tiny-f32.gguf"), n_ctx=128)
    plain.decode(Batch(toks, output=[True] * len(toks)))
    assert (plain.get_logits() - ref).abs().max() / ref.abs().max() > 1e-3


def test_missing_or_misshapen_tensor_is_one_line_error(gguf_dir):
    from gguf_runtime.errors import GGUFFormatError, UnsupportedError
    from gguf_runtime.gguf.reader import GGUFFile

    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    del f.tensor_infos["blk.1.ffn_up.weight"]
    with pytest.raises(GGUFFormatError, match=r"llama tensor missing: blk.1.ffn_up.weight"):
        load_model(f)
    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    f.metadata["llama.feed_forward_length"] = 500
    with pytest.raises(GGUFFormatError, match=r"has shape \(512, 256\), expected \(500, 256\)"):
        load_model(f)
    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    f.metadata["general.architecture"] = "rwkv9"
    with pytest.raises(UnsupportedError, match="unknown architecture 'rwkv9'"):
        load_model(f)
