"""Session state (issue 16): save/restore of whole contexts and single sequences is exact
(``torch.equal``) for every memory kind; recurrent snapshots give rollback; bad files are one-line
errors that change nothing; ``generate --prompt-cache`` reuses a saved prompt."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.errors import StateError
from gguf_runtime.models import load_model
from gguf_runtime.numerics import Numerics
from tests.helpers import toks

ARCHS = ["llama", "mamba", "mamba2", "gemma3", "jamba"]  # KV, recurrent (x2), iSWA, hybrid
A, B, C, D = toks(19, 1), toks(6, 2), toks(11, 3), toks(4, 4)


@pytest.fixture(scope="module")
def models(gguf_dir):
    return {a: load_model(gguf_dir / f"{a}-tiny-f32.gguf", device="cpu") for a in ARCHS}


def ctx(model, n_seq: int = 1, n_ctx: int = 64, **kw) -> Context:
    return Context(model, n_ctx=n_ctx, n_seq_max=n_seq, **kw)


def dec(c: Context, t: list[int], seq: int = 0) -> torch.Tensor:
    c.decode(Batch(t, seq_ids=[seq] * len(t), output=[True] * len(t)))
    return c.get_logits().clone()


def snapshot(c: Context) -> dict[str, torch.Tensor]:
    """Everything a context holds, to show a failed load changed nothing."""
    t, m = c.memory.state_tensors()
    if c._logits is not None:
        t = {**t, "logits": c._logits.clone(), "out_idx": c._out_idx.clone()}
    return t


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_context_round_trip_is_exact(models, arch, tmp_path):
    m = models[arch]
    c = ctx(m)
    last = dec(c, A)[-1]
    size = c.state_save(tmp_path / "s.state", tokens=A)
    assert size == (tmp_path / "s.state").stat().st_size
    want = dec(c, B)  # A then B in one context
    fresh = ctx(m)
    assert fresh.state_load(tmp_path / "s.state") == A
    assert torch.equal(fresh.logits(-1), last)  # the last decode's outputs come back too
    assert fresh.memory.seq_pos_max(0) == len(A) - 1
    got = dec(fresh, B)
    assert torch.equal(got, want)
    assert not torch.equal(got, dec(ctx(m), B))  # negative control: the restored prefix matters


@pytest.mark.parametrize("arch", ARCHS)
def test_one_sequence_into_another_id_beside_live_sequences(models, arch, tmp_path):
    m = models[arch]
    ref_ab, ref_cd = ctx(m), ctx(m)
    dec(ref_ab, A)
    want_b = dec(ref_ab, B)
    dec(ref_cd, C)
    want_d = dec(ref_cd, D)

    src = ctx(m, n_seq=2)
    src.decode(Batch.from_sequences([C, A], seq_ids=[0, 1]))  # seq 1 holds A
    src.state_save(tmp_path / "seq1.state", seq_id=1, tokens=A)
    src.state_save(tmp_path / "whole.state")

    dst = ctx(m, n_seq=3)
    dec(dst, C, seq=1)  # a live sequence the load must not touch
    assert dst.state_load(tmp_path / "seq1.state", dest_seq_id=2) == A
    assert dst.memory.seq_pos_max(2) == len(A) - 1 and dst.memory.seq_pos_max(0) == -1
    dst.decode(Batch.from_sequences([B, D], seq_ids=[2, 1], outputs="all"))
    got = dst.get_logits()
    assert torch.equal(got[: len(B)], want_b) and torch.equal(got[len(B):], want_d)

    # one sequence out of a whole-context file, into a sequence that held something else
    dst2 = ctx(m, n_seq=2)
    dec(dst2, D, seq=0)
    dst2.state_load(tmp_path / "whole.state", seq_id=1, dest_seq_id=0)
    assert torch.equal(dec(dst2, B, seq=0), want_b)


def test_window_cache_round_trip_after_cells_were_reused(models, tmp_path):
    """Gemma 3's sliding part reuses cells past the window and remembers what each sequence lost."""
    m = models["gemma3"]

    def small() -> Context:  # a sliding part of 256 cells (sized for ubatches of 32), below the 300 tokens
        c = Context(m, n_ctx=320, n_ubatch=32)
        c.memory = m.make_memory(320, 1, c.numerics, n_ubatch=32)
        return c

    long = toks(300, 5)
    c = small()
    c.decode(Batch(long))
    assert c.memory.swa.n_ctx == 256 and int(c.memory.swa.lost[0, 1]) >= 0  # positions were dropped
    c.state_save(tmp_path / "w.state")
    lost = c.memory.swa.lost.clone()
    want = dec(c, B)
    fresh = small()
    fresh.state_load(tmp_path / "w.state")
    assert torch.equal(fresh.memory.swa.lost, lost)
    assert torch.equal(dec(fresh, B), want)
    assert torch.equal(fresh.memory.swa.lost, c.memory.swa.lost)


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_recurrent_rollback_to_a_snapshot(models, arch, tmp_path):
    m = models[arch]
    t1, t2, t3 = 7, 300, 42
    never = ctx(m)  # never goes past A + t1
    dec(never, A)
    dec(never, [t1])
    want = dec(never, B)

    c = ctx(m)
    dec(c, A)
    for t in (t1, t2, t3):
        dec(c, [t])
    state = snapshot(c)
    assert not c.memory.seq_rm(0, 5, -1)  # no snapshot at position 4: refused, nothing changed
    assert same(snapshot(c), state)
    c.state_save(tmp_path / "r.state")
    assert c.memory.seq_rm(0, len(A) + 1, -1)  # back to A + t1 (the end of the second decode)
    assert c.memory.seq_pos_max(0) == len(A)
    assert torch.equal(dec(c, B), want)

    # snapshots survive save/load
    fresh = ctx(m)
    fresh.state_load(tmp_path / "r.state")
    assert fresh.memory.seq_rm(0, len(A) + 1, -1)
    assert torch.equal(dec(fresh, B), want)

    if arch == "jamba":  # the hybrid rolls back through its recurrent part; the KV part follows
        return
    # bounded: with 2 snapshots the end of A (three decodes back) is gone
    c = ctx(m)
    c.memory.n_snapshots = 2
    dec(c, A)
    for t in (t1, t2, t3):
        dec(c, [t])
    assert [s.pos for s in c.memory.snaps[0]] == [len(A), len(A) + 1]
    assert not c.memory.seq_rm(0, len(A), -1)
    assert c.memory.seq_rm(0, 0, -1) and c.memory.seq_pos_max(0) == -1 and not c.memory.snaps


def test_bad_files_are_one_line_errors_and_change_nothing(models, gguf_dir, tmp_path):
    llama, mamba = models["llama"], models["mamba"]
    src = ctx(llama)
    dec(src, A)
    good = tmp_path / "good.state"
    src.state_save(good, tokens=A)
    data = good.read_bytes()

    c = ctx(llama)
    dec(c, C)
    before = snapshot(c)

    def fails(path, match, target=c, **kw):
        with pytest.raises(StateError, match=match) as e:
            target.state_load(path, **kw)
        assert "\n" not in str(e.value)

    (tmp_path / "trunc.state").write_bytes(data[: len(data) // 2])
    fails(tmp_path / "trunc.state", "truncated")
    (tmp_path / "short.state").write_bytes(data[:5])
    fails(tmp_path / "short.state", "truncated")
    flipped = bytearray(data)
    flipped[-100] ^= 0x40
    (tmp_path / "flip.state").write_bytes(bytes(flipped))
    fails(tmp_path / "flip.state", "checksum")
    (tmp_path / "junk.state").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"x" * 64)
    fails(tmp_path / "junk.state", "not a gguf-runtime state file")
    fails(tmp_path / "missing.state", "cannot read")
    fails(good, "sequence 3 out of range", seq_id=0, dest_seq_id=3)
    fails(good, "made for a llama model, this context runs mamba", target=ctx(mamba))
    fails(good, "another llama model", target=ctx(load_model(gguf_dir / "llama-tiny-Q8_0.gguf", device="cpu")))
    fails(good, "numerics.invariant", target=ctx(llama, numerics=Numerics(invariant=False)))
    fails(good, "numerics.cache_k", target=ctx(llama, numerics=Numerics(cache_k=torch.float16, cache_v=torch.float16)))
    fails(good, "needs 19 KV cells but only 16", target=ctx(llama, n_ctx=16))
    assert same(snapshot(c), before)

    # a failed load leaves a live context as it was, and it still loads a good file afterwards
    assert c.state_load(good) == A
    assert torch.equal(dec(c, B), dec(src, B))

    # a write that cannot happen is one line and leaves nothing behind
    with pytest.raises(StateError, match="cannot write"):
        src.state_save(tmp_path / "no" / "such" / "dir.state")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_recurrent_load_needs_a_free_cell_per_sequence(models, tmp_path):
    m = models["mamba"]
    src = ctx(m, n_seq=2)
    src.decode(Batch.from_sequences([A, C]))
    src.state_save(tmp_path / "two.state")
    small = ctx(m, n_seq=1)
    with pytest.raises(StateError, match="sequence 1 does not fit"):
        small.state_load(tmp_path / "two.state")
    small.state_load(tmp_path / "two.state", seq_id=1, dest_seq_id=0)  # one of them fits
    assert small.memory.seq_pos_max(0) == len(C) - 1


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_generate_prompt_cache_reuses_the_prompt(gguf_dir, arch, tmp_path):
    cache = tmp_path / "prompt.state"
    model = str(gguf_dir / f"{arch}-tiny-f32.gguf")
    cmd = [sys.executable, "-m", "gguf_runtime.cli.main", "generate", "-m", model,
           "-p", "Once upon a time there was a little", "-n", "8", "-s", "5", "--prompt-cache", str(cache)]
    run = lambda c: subprocess.run(c, capture_output=True, text=True)  # noqa: E731
    first = run(cmd)
    saved = cache.read_bytes()
    second = run(cmd + ["--prompt-cache-ro"])
    for r in (first, second):
        assert r.returncode == 0, r.stderr
    assert first.stdout == second.stdout and len(first.stdout) > len("Once upon a time there was a little") + 1
    assert "reused 0 of 14 prompt tokens" in first.stderr and "/    14 tokens (" in first.stderr
    # the second run evaluates only the last prompt token (for its logits), as llama.cpp does
    assert "reused 13 of 14 prompt tokens" in second.stderr and "/     1 tokens (" in second.stderr
    assert cache.read_bytes() == saved  # read-only: not rewritten
    if arch == "llama":  # a cache made for another model is one line and exit code 2
        bad = run([model.replace("llama", "mamba") if x == model else x for x in cmd])
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(errors) == 1
        assert "made for a llama model, this context runs mamba" in errors[0]
