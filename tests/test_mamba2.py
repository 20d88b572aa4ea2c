"""Mamba2 (issue 9): llama.cpp's GGUF layout against transformers' Mamba2, the SSD scan against the
plain recurrence, split invariance (``torch.equal``), memory semantics and llama.cpp's perplexity."""
from __future__ import annotations

import json

import gguf
import pytest
import torch

from gguf_runtime.batch import Batch
from gguf_runtime.errors import GGUFFormatError
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.kernels.ssd import CHUNK, SSDState, ssd_scan
from gguf_runtime.tokenizer import Tokenizer
from test_mamba import alone, assert_steps_bitwise_invariant, assert_two_sequences_then_steps_match, ctx, states  # shared with Mamba's tests

MAMBA2_TINY_PPL = 685.9431  # llama-perplexity -c 128 --chunks 100, first 200,000 bytes (../shared/README.md)


def toks(n: int, seed: int, vocab: int = 2048) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model(gguf_dir):
    return load_model(gguf_dir / "mamba2-tiny-f32.gguf", device="cpu")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


# -- the model against transformers -------------------------------------------------------------
def test_metadata_matches_hf_config(model, shared):
    cfg = json.loads((shared / "models" / "mamba2-tiny-hf" / "config.json").read_text())
    a = model.args
    assert (a.n_embd, a.n_layer, a.d_state, a.d_conv, a.n_head, a.head_dim, a.n_group, a.n_vocab) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["state_size"], cfg["conv_kernel"], cfg["num_heads"],
        cfg["head_dim"], cfg["n_groups"], cfg["vocab_size"])
    assert a.d_inner == cfg["expand"] * cfg["hidden_size"] and not a.tied
    assert a.rms_eps == pytest.approx(cfg["layer_norm_epsilon"])


def test_logits_match_transformers(model, shared, transformers):
    """Two sequences of different lengths in one batch (equal splits, chunk boundaries crossed),
    then single-token decode steps on one of them."""
    assert_two_sequences_then_steps_match(model, transformers.Mamba2ForCausalLM.from_pretrained(shared / "models" / "mamba2-tiny-hf").eval())


def write_gguf(hf, path, skip: str = "") -> None:
    """A transformers Mamba2 written in llama.cpp's layout (convert_hf_to_gguf.py Mamba2Model):
    A as -exp(A_log), conv weight squeezed, A/D as (heads, 1), the norm as (groups, d_inner/groups);
    tied models have no output tensor. ``skip``: a metadata key (suffix) to leave out."""
    cfg, sd = hf.config, {k: v.detach().float() for k, v in hf.state_dict().items()}
    d_inner = cfg.expand * cfg.hidden_size
    w = gguf.GGUFWriter(str(path), "mamba2")
    keys = {"embedding_length": cfg.hidden_size, "block_count": cfg.num_hidden_layers,
            "ssm.conv_kernel": cfg.conv_kernel, "ssm.inner_size": d_inner, "ssm.state_size": cfg.state_size,
            "ssm.time_step_rank": cfg.num_heads, "ssm.group_count": cfg.n_groups}
    for k, v in keys.items():
        if k != skip:
            w.add_uint32(f"mamba2.{k}", v)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    T, MT = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    tensors = {T[MT.TOKEN_EMBD] + ".weight": sd["backbone.embeddings.weight"],
               T[MT.OUTPUT_NORM] + ".weight": sd["backbone.norm_f.weight"]}
    if not cfg.tie_word_embeddings:
        tensors[T[MT.OUTPUT] + ".weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, n = f"backbone.layers.{i}.", lambda t, s="": T[t].format(bid=i) + s  # noqa: E731
        tensors |= {
            n(MT.ATTN_NORM, ".weight"): sd[p + "norm.weight"],
            n(MT.SSM_IN, ".weight"): sd[p + "mixer.in_proj.weight"],
            n(MT.SSM_CONV1D, ".weight"): sd[p + "mixer.conv1d.weight"].squeeze(1),
            n(MT.SSM_CONV1D, ".bias"): sd[p + "mixer.conv1d.bias"],
            n(MT.SSM_DT, ".bias"): sd[p + "mixer.dt_bias"],
            n(MT.SSM_A): -torch.exp(sd[p + "mixer.A_log"]).unsqueeze(-1),
            n(MT.SSM_D): sd[p + "mixer.D"].unsqueeze(-1),
            n(MT.SSM_NORM, ".weight"): sd[p + "mixer.norm.weight"].view(cfg.n_groups, -1),
            n(MT.SSM_OUT, ".weight"): sd[p + "mixer.out_proj.weight"],
        }
    for name, t in tensors.items():
        w.add_tensor(name, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def grouped_hf(transformers):
    """A random Mamba2 with 2 groups of 4 heads and tied embeddings (what the shared model lacks)."""
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=64, state_size=16, num_heads=8, head_dim=16,
                                    expand=2, n_groups=2, conv_kernel=4, num_hidden_layers=2, chunk_size=16,
                                    tie_word_embeddings=True, initializer_range=0.2, layer_norm_epsilon=1e-5)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-trivial norm weights, group by group
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2.5)
    return hf


def test_grouped_tied_model_matches_transformers(grouped_hf, tmp_path):
    path = tmp_path / "grouped.gguf"
    write_gguf(grouped_hf, path)
    m = load_model(path, device="cpu")
    assert (m.args.n_group, m.args.n_head, m.args.tied) == (2, 8, True)
    t = toks(150, 3, vocab=96)
    with torch.inference_mode():
        ref = grouped_hf(torch.tensor([t])).logits[0]
    assert ref.std() > 0.1  # a model whose logits move
    torch.testing.assert_close(alone(m, t, n_ubatch=13), ref, rtol=0, atol=1e-4)


def test_bad_metadata_is_one_line_error(grouped_hf, tmp_path):
    path = tmp_path / "no_state.gguf"
    write_gguf(grouped_hf, path, skip="ssm.state_size")
    with pytest.raises(GGUFFormatError, match=r"mamba2\.ssm\.state_size") as e:
        load_model(path, device="cpu")
    assert "\n" not in str(e.value)


# -- the SSD scan against the recurrence ---------------------------------------------------------
def recurrence(x, dt, A, B, C):
    """llama.cpp's ssm_scan, one token at a time, in float64: returns y and the state after each token."""
    S, T, H, P = x.shape
    G = B.shape[2]
    Bh, Ch = (t.double().repeat_interleave(H // G, 2) for t in (B, C))
    h = torch.zeros(S, H, P, B.shape[-1], dtype=torch.float64)
    ys, hs = [], []
    for t in range(T):
        d = dt[:, t].double()
        h = torch.exp(d * A.double()).view(S, H, 1, 1) * h + (d.unsqueeze(-1) * x[:, t].double()).unsqueeze(-1) * Bh[:, t].unsqueeze(2)
        ys.append(torch.einsum("shpn,shn->shp", h, Ch[:, t]))
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def test_ssd_scan_matches_recurrence_and_is_split_invariant():
    g = torch.Generator().manual_seed(0)
    S, T, H, P, G, N = 2, 150, 4, 8, 2, 16
    x, B, C = torch.randn(S, T, H, P, generator=g), torch.randn(S, T, G, N, generator=g), torch.randn(S, T, G, N, generator=g)
    dt, A = torch.rand(S, T, H, generator=g) * 0.3, -torch.rand(H, generator=g) * 4
    y_ref, h_ref = recurrence(x, dt, A, B, C)

    def run(cuts):
        st = SSDState(*[torch.zeros(S, *s) for s in SSDState.shapes(H, P, G, N).values()])
        ys, p = [], 0
        for n in cuts:
            y, st = ssd_scan(x[:, p:p + n], dt[:, p:p + n], A, B[:, p:p + n], C[:, p:p + n], st,
                             torch.full((S,), p % CHUNK))
            ys.append(y)
            p += n
        return torch.cat(ys, 1), st

    y, st = run([T])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    b = T // CHUNK * CHUNK  # the carried state is the one at the last boundary reached
    torch.testing.assert_close(st.h.double(), h_ref[:, b - 1], rtol=1e-4, atol=1e-4)
    for cuts in ([1] * T, [7] * 21 + [3], [64, 64, 22], [13, 100, 37]):
        y2, st2 = run(cuts)
        assert torch.equal(y2, y) and all(torch.equal(a, b) for a, b in zip(st2, st)), cuts


# -- split invariance through the context: bitwise ------------------------------------------------
def test_ubatch_split_and_neighbours_are_bitwise_invariant(model):
    t = toks(80, 4)  # 2 chunks and a tail
    ref, ref_state = assert_steps_bitwise_invariant(model, t)
    # beside other sequences, one of which is 30 tokens ahead (other chunk offsets in the same ubatch)
    other = toks(110, 5)
    for n_ubatch in (2, 14, 128):  # 1 / 7 / 64 tokens of each of the two sequences per ubatch
        c = ctx(model, n_seq=3, n_ubatch=n_ubatch)
        c.decode(Batch(other[:30], seq_ids=[(1,)] * 30))
        c.decode(Batch.from_sequences([t, other[30:110], toks(9, 6)], outputs="all"))
        assert torch.equal(c.get_logits()[:80], ref), f"n_ubatch={n_ubatch}"
        assert all(torch.equal(x, y) for x, y in zip(states(c, 0), ref_state))
        assert torch.equal(c.get_logits()[80:160], alone(model, other[:110])[30:])


# -- recurrent memory semantics -------------------------------------------------------------------
def test_seq_cp_rm_and_shared_prefix(model):
    prefix, conts = toks(70, 7), [toks(n, 20 + n) for n in (5, 60, 1)]  # the prefix leaves a 6-token tail
    refs = [alone(model, prefix + c)[len(prefix):] for c in conts]
    c = ctx(model, n_seq=3, n_ubatch=16)
    c.decode(Batch(prefix, output=[False] * 70))
    c.memory.seq_cp(0, 1)
    c.memory.seq_cp(0, 2)
    c.decode(Batch.from_sequences(conts, outputs="all"))
    out = c.get_logits().split([len(x) for x in conts])
    assert all(torch.equal(o, r) for o, r in zip(out, refs))
    m = c.memory
    assert m.seq_rm(1, 10, -1) is False  # a state cannot be rewound
    assert m.seq_rm(1, -1, -1) is True and m.seq_pos_max(1) == -1
    c.decode(Batch(prefix + conts[1], seq_ids=[(1,)] * 130, output=[True] * 130))  # restarts from zero
    assert torch.equal(c.get_logits()[70:], refs[1])


# -- llama.cpp's perplexity -----------------------------------------------------------------------
def test_perplexity_matches_llama_cpp(model, gguf_dir, wikitext):
    tok = Tokenizer.from_gguf(GGUFFile(gguf_dir / "mamba2-tiny-f32.gguf"))
    ids = torch.tensor(tok.encode(wikitext.read_bytes()[:200_000].decode("utf-8")))
    r = perplexity(model, ids, n_ctx=128, n_chunks=100, bos=tok.bos_id)
    assert r.n_chunks == 100
    assert abs(r.ppl - MAMBA2_TINY_PPL) / MAMBA2_TINY_PPL < 1e-4
