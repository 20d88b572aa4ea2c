"""Mamba (issue 4): llama.cpp's GGUF layout against transformers, the recurrent memory's semantics,
split invariance (``torch.equal``) and llama.cpp's perplexity."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from gguf_runtime.batch import Batch, BatchAllocator
from gguf_runtime.context import Context
from gguf_runtime.errors import BatchError
from gguf_runtime.memory.recurrent import RecurrentMemory
from gguf_runtime.models import load_model
from gguf_runtime.models.mamba import ModelArgs
from gguf_runtime.tools.perplexity import perplexity
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.kernels.ssm import selective_scan
from gguf_runtime.tokenizer import Tokenizer

MAMBA_TINY_PPL = 503.3301  # llama-perplexity -c 128, first 200,000 bytes of wikitext-2-test (../shared/README.md)


def toks(n: int, seed: int) -> list[int]:
    return torch.randint(3, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model(gguf_dir):
    return load_model(gguf_dir / "mamba-tiny-f32.gguf", device="cpu")


@pytest.fixture(scope="module")
def hf_cls():
    return pytest.importorskip("transformers").MambaForCausalLM


def ctx(model, n_seq: int = 1, n_ubatch: int = 512) -> Context:
    return Context(model, n_ctx=4096, n_batch=4096, n_ubatch=n_ubatch, n_seq_max=n_seq)


def alone(model, t: list[int], n_ubatch: int = 512) -> torch.Tensor:
    c = ctx(model, n_ubatch=n_ubatch)
    c.decode(Batch(t, output=[True] * len(t)))
    return c.get_logits()


def states(c: Context, seq_id: int) -> list[torch.Tensor]:
    """Every per-layer state tensor of the sequence's tail cell."""
    cell = c.memory.meta.tail[seq_id]
    return [t[cell].clone() for ts in c.memory.states.values() for t in ts]


# -- the model against transformers -------------------------------------------------------------
def test_metadata_matches_hf_config(model, shared):
    import json
    cfg = json.loads((shared / "models" / "mamba-tiny-hf" / "config.json").read_text())
    a = model.args
    assert isinstance(a, ModelArgs)
    assert (a.n_embd, a.n_layer, a.d_inner, a.d_state, a.d_conv, a.dt_rank, a.n_vocab) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["state_size"],
        cfg["conv_kernel"], cfg["time_step_rank"], cfg["vocab_size"])
    assert a.tied and a.rms_eps == pytest.approx(cfg["layer_norm_epsilon"])


def test_logits_match_transformers(model, shared, hf_cls):
    """Two sequences of different lengths in one batch (equal splits), then single-token steps."""
    assert_two_sequences_then_steps_match(model, hf_cls.from_pretrained(shared / "models" / "mamba-tiny-hf").eval())


def assert_two_sequences_then_steps_match(model, hf):
    """150 and 37 tokens decoded together (equal splits), then 3 single-token steps of the first,
    against transformers' logits of each whole sequence, within 1e-4."""
    a, b = toks(150, 1), toks(37, 2)
    c = ctx(model, n_seq=2, n_ubatch=64)
    c.decode(Batch.from_sequences([a[:-3], b], outputs="all"))
    ours = c.get_logits()
    stepped = []
    for t in a[-3:]:  # decode steps continue sequence 0 (scan_step path)
        c.decode(Batch([t], seq_ids=[(0,)]))
        stepped.append(c.logits(0))
    with torch.inference_mode():
        ref_a, ref_b = hf(torch.tensor([a])).logits[0], hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(ours[:147], ref_a[:147], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[147:], ref_b, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.stack(stepped), ref_a[147:], rtol=0, atol=1e-4)


def _hf_from_gguf(hf_cls, shared, path):
    """transformers' Mamba with the GGUF's tensors dequantized by gguf-py (an independent reader)."""
    hf = hf_cls.from_pretrained(shared / "models" / "mamba-tiny-hf").eval()
    names = {"ssm_in.weight": "mixer.in_proj.weight", "ssm_conv1d.weight": "mixer.conv1d.weight",
             "ssm_conv1d.bias": "mixer.conv1d.bias", "ssm_x.weight": "mixer.x_proj.weight",
             "ssm_dt.weight": "mixer.dt_proj.weight", "ssm_dt.bias": "mixer.dt_proj.bias", "ssm_a": "mixer.A_log",
             "ssm_d": "mixer.D", "ssm_out.weight": "mixer.out_proj.weight", "attn_norm.weight": "norm.weight"}
    sd = hf.state_dict()
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).float()
        if t.name == "token_embd.weight":
            key = "backbone.embeddings.weight"
        elif t.name == "output_norm.weight":
            key = "backbone.norm_f.weight"
        else:
            _, i, kind = t.name.split(".", 2)
            key = f"backbone.layers.{i}.{names[kind]}"
            w = torch.log(-w) if kind == "ssm_a" else w
        sd[key] = w.reshape(sd[key].shape)
    sd["lm_head.weight"] = sd["backbone.embeddings.weight"]
    hf.load_state_dict(sd)
    return hf


@pytest.mark.parametrize("name", ["mamba-tiny-q8_0.gguf", "mamba-tiny-Q4_K_M.gguf"])
def test_quantized_files(gguf_dir, shared, hf_cls, name):
    m = load_model(gguf_dir / name, device="cpu")
    t = toks(100, 3)
    with torch.inference_mode():
        ref = _hf_from_gguf(hf_cls, shared, gguf_dir / name)(torch.tensor([t])).logits[0]
    torch.testing.assert_close(alone(m, t), ref, rtol=0, atol=1e-4)


# -- the scan ------------------------------------------------------------------------------------
def test_scan_matches_float64_recurrence_and_needs_alignment():
    g = torch.Generator().manual_seed(0)
    S, T, D, N = 3, 70, 64, 16
    x, B, C = (torch.randn(S, T, k, generator=g) for k in (D, N, N))
    dt = torch.nn.functional.softplus(torch.randn(S, T, D, generator=g) - 1)
    A = -torch.rand(N, D, generator=g) * 8
    h, ref = torch.zeros(S, N, D, dtype=torch.float64), []
    for t in range(T):  # the plain recurrence, token by token, in float64
        a = torch.exp(dt[:, t, None].double() * A.double())
        h = a * h + (dt[:, t] * x[:, t]).double()[:, None] * B[:, t, :, None].double()
        ref.append((h * C[:, t, :, None].double()).sum(1))
    state = torch.zeros(S, 3, N, D)
    y = selective_scan(x, dt, A, B, C, state, torch.zeros(S, dtype=torch.long))
    torch.testing.assert_close(y.double(), torch.stack(ref, 1), rtol=1e-5, atol=1e-5)

    def pieces(step: int, aligned: bool) -> torch.Tensor:
        st, out = torch.zeros(S, 3, N, D), []
        for p in range(0, T, step):
            sl = slice(p, p + step)
            pos0 = torch.full((S,), p if aligned else 0)
            out.append(selective_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], st, pos0))
        return torch.cat(out, 1)

    assert torch.equal(pieces(7, True), y) and torch.equal(pieces(1, True), y)
    misaligned = pieces(7, False)  # chunks restarted at each ubatch: right values, other bits
    torch.testing.assert_close(misaligned, y, rtol=1e-5, atol=1e-5)
    assert not torch.equal(misaligned, y)


# -- split invariance: bitwise -------------------------------------------------------------------
def assert_steps_bitwise_invariant(model, t):
    """Logits and states of ``t`` decoded at once equal those of decode calls of 1, 7 or 64 tokens."""
    ref_c = ctx(model)
    ref_c.decode(Batch(t, output=[True] * len(t)))
    ref, ref_state = ref_c.get_logits(), states(ref_c, 0)
    for step in (1, 7, 64):  # separate decode calls of `step` tokens
        c = ctx(model)
        out = []
        for p in range(0, len(t), step):
            c.decode(Batch(t[p:p + step], output=[True] * len(t[p:p + step])))
            out.append(c.get_logits())
        assert torch.equal(torch.cat(out), ref), f"{step} tokens per decode"
        assert all(torch.equal(x, y) for x, y in zip(states(c, 0), ref_state))
    return ref, ref_state


def test_ubatch_split_and_neighbours_are_bitwise_invariant(model):
    t = toks(90, 4)
    ref, ref_state = assert_steps_bitwise_invariant(model, t)
    # beside 4 other sequences of other lengths, interleaved at random, one of them 13 tokens ahead
    # (other chunk offsets in the same ubatch); ubatches of 5 sequences x 1, 7 or 64 tokens
    g = torch.Generator().manual_seed(5)
    head, seqs = toks(13, 9), [t] + [toks(n, 10 + k) for k, n in enumerate((3, 40, 95, 17))]
    owner = torch.tensor([s for s, q in enumerate(seqs) for _ in q])[torch.randperm(sum(map(len, seqs)), generator=g)]
    nxt = [iter(q) for q in seqs]
    batch = Batch([next(nxt[s]) for s in owner.tolist()], seq_ids=[(s,) for s in owner.tolist()],
                  output=[True] * len(owner))
    for n_ubatch in (5, 35, 320):
        c = ctx(model, n_seq=5, n_ubatch=n_ubatch)
        c.decode(Batch(head, seq_ids=[(3,)] * 13))
        c.decode(batch)
        mine = (owner == 0).nonzero().flatten().tolist()
        assert torch.equal(torch.stack([c.logits(i) for i in mine]), ref), f"n_ubatch={n_ubatch}"
        assert all(torch.equal(x, y) for x, y in zip(states(c, 0), ref_state))
        other = (owner == 3).nonzero().flatten().tolist()  # user order holds for the others too
        assert torch.equal(torch.stack([c.logits(i) for i in other]), alone(model, head + seqs[3])[13:])


def test_perplexity_chunks_per_batch_invariant(model, gguf_dir, wikitext):
    """Several chunks per batch (parallel sequences) and any -b / -ub give the same PPL bits."""
    tok = Tokenizer.from_gguf(GGUFFile(gguf_dir / "mamba-tiny-f32.gguf"))
    ids = torch.tensor(tok.encode(wikitext.read_bytes()[:20_000].decode("utf-8")))
    ref = perplexity(model, ids, n_ctx=128, n_batch=128, n_ubatch=128, n_chunks=4, bos=tok.bos_id)
    for n_batch, n_ubatch in ((2048, 512), (512, 37), (64, 7)):
        r = perplexity(model, ids, n_ctx=128, n_batch=n_batch, n_ubatch=n_ubatch, n_chunks=4, bos=tok.bos_id)
        assert r.chunk_ppl == ref.chunk_ppl, (n_batch, n_ubatch)


@pytest.mark.slow
def test_perplexity_matches_llama_cpp(model, gguf_dir, wikitext):
    """All 683 chunks at -c 128, four chunks per batch in ubatches of 4 x 16 tokens (test_perplexity
    checks the default -b 2048)."""
    tok = Tokenizer.from_gguf(GGUFFile(gguf_dir / "mamba-tiny-f32.gguf"))
    ids = torch.tensor(tok.encode(wikitext.read_bytes()[:200_000].decode("utf-8")))
    r = perplexity(model, ids, n_ctx=128, n_batch=512, n_ubatch=64, bos=tok.bos_id)
    assert r.n_chunks == 683
    assert abs(r.ppl - MAMBA_TINY_PPL) / MAMBA_TINY_PPL < 1e-4


# -- recurrent memory semantics -------------------------------------------------------------------
def test_seq_cp_and_shared_prefix_equal_independent_runs(model):
    prefix, conts = toks(20, 6), [toks(n, 20 + n) for n in (5, 9, 1)]
    refs = [alone(model, prefix + c)[len(prefix):] for c in conts]
    # 1) prefix on sequence 0, copied to 1 and 2 (shared, copied on write), then continued together
    c = ctx(model, n_seq=3, n_ubatch=7)
    c.decode(Batch(prefix, output=[False] * 20))
    c.memory.seq_cp(0, 1)
    c.memory.seq_cp(0, 2)
    assert c.memory.n_used == 1 and [c.memory.seq_pos_max(s) for s in range(3)] == [19] * 3
    c.decode(Batch.from_sequences(conts, outputs="all"))
    out = c.get_logits().split([len(x) for x in conts])
    assert all(torch.equal(o, r) for o, r in zip(out, refs))
    assert c.memory.n_used == 3
    # 2) one batch: prefix tokens carry all three sequence ids, computed once for the set
    c = ctx(model, n_seq=3, n_ubatch=16)
    b = Batch(prefix + sum(conts, []), seq_ids=[(0, 1, 2)] * 20 + [(s,) for s, x in enumerate(conts) for _ in x],
              output=[False] * 20 + [True] * sum(map(len, conts)))
    c.decode(b)
    out = c.get_logits().split([len(x) for x in conts])
    assert all(torch.equal(o, r) for o, r in zip(out, refs))


def test_seq_rm_keep_add(model):
    t = toks(30, 7)
    c = ctx(model, n_seq=2)
    c.decode(Batch.from_sequences([t, t[:10]], outputs="all"))
    first = c.get_logits()[:30]
    m = c.memory
    assert (m.seq_pos_min(0), m.seq_pos_max(0), m.seq_pos_max(1)) == (29, 29, 9)
    assert m.seq_rm(0, 10, -1) is False and m.seq_rm(0, 0, 20) is False  # a state cannot be rewound
    assert m.seq_rm(-1, 5, 10) is False
    assert m.seq_rm(0, 30, -1) is True and m.seq_pos_max(0) == 29  # nothing after the state: no-op
    assert m.seq_rm(0, 0, -1) is True and m.seq_pos_max(0) == -1 and m.seq_pos_max(1) == 9
    c.decode(Batch(t, seq_ids=[(0,)] * 30, output=[True] * 30))  # starts again from a zero state
    assert torch.equal(c.get_logits(), first)
    m.seq_add(1, 0, -1, 5)
    assert m.seq_pos_max(1) == 14
    m.seq_div(1, 0, -1, 2)
    assert m.seq_pos_max(1) == 7
    m.seq_keep(0)
    assert m.seq_pos_max(1) == -1 and m.seq_pos_max(0) == 29 and m.n_used == 1
    with pytest.raises(BatchError, match="memory ends at position 29"):
        c.decode(Batch([5], pos=[3], seq_ids=[(0,)]))


def _ubatches(mem, seqs: list[list[int]], seq_ids: list[int], n_ubatch: int = 64):
    b = Batch.from_sequences(seqs, seq_ids=seq_ids, outputs="all")
    ubs = mem.split(BatchAllocator(b, 100, mem.n_seq_max, mem), n_ubatch)
    mem.prepare(ubs)
    return ubs


def test_memory_slots_contiguous_in_ubatch_order():
    """Generic shapes (per layer, extras); each set's state follows it into contiguous slots."""
    mem = RecurrentMemory(2, 6, {"conv": [(3, 4), (2, 4)], "ssm": (5,), "more": (2,)})
    assert [t.shape for t in mem.states["conv"]] == [(6, 3, 4), (6, 2, 4)]
    for ub in _ubatches(mem, [[1, 2], [3], [4, 5, 6]], [4, 1, 5]):
        v = mem.apply(ub)
        ids = torch.tensor([ub.seq_ids[s * ub.n_seq_tokens][0] for s in range(ub.n_seqs)], dtype=torch.float)
        # a new sequence starts from zeros, a continued one finds what it wrote
        assert torch.equal(v.layer(0)["ssm"][:, 0], torch.where(v.pos0 == 0, 0.0, ids))
        v.layer(0)["ssm"] = ids.view(-1, 1).expand(-1, 5)
        v.layer(1)["more"].fill_(7.0)
    # sequences 5 and 1 continue, in this order: their states come back contiguous, in ubatch order
    (ub,) = _ubatches(mem, [[7], [8]], [5, 1])
    v = mem.apply(ub)
    assert v.n_seqs == 2 and v.layer(0)["ssm"][:, 0].tolist() == [5.0, 1.0]
    assert v.layer(0)["ssm"].data_ptr() == mem.states["ssm"][0][v.start].data_ptr()  # a view of the slots
    assert v.pos0.tolist() == [3, 1]
    assert torch.equal(v.layer(1)["more"], torch.full((2, 2), 7.0))
    assert [mem.seq_pos_max(s) for s in (4, 1, 5)] == [1, 1, 3]
    tail4 = mem.meta.tail[4]
    assert mem.states["ssm"][0][tail4][0] == 4.0  # a sequence outside the ubatch keeps its state
    with pytest.raises(BatchError, match="equal-split"):
        mem.apply(next(BatchAllocator(Batch([1, 2]), 100, 6, mem).split_simple(8)))
