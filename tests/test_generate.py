"""`generate`: greedy decoding equals transformers' greedy generate; seeded sampling reproduces;
`generate_parallel` gives each sequence exactly what `generate` gives it alone, on every memory kind."""
from __future__ import annotations

import pytest
import torch

from gguf_runtime.context import Context
from gguf_runtime.tools.generate import Sampler, SamplerParams, generate, generate_parallel
from gguf_runtime.models import load_model


@pytest.fixture(scope="module")
def llama(gguf_dir):
    return load_model(gguf_dir / "llama-tiny-f32.gguf")


PROMPT = [1, 450, 1023, 77, 301, 12, 999, 5]


def test_greedy_matches_transformers(llama, shared):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", dtype=torch.float32).eval()
    ours = list(generate(Context(llama, n_ctx=64), PROMPT, 24, Sampler(SamplerParams(temp=0))))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(PROMPT):].tolist()


def test_sampling_seeded_and_top_k_1_is_greedy(llama):
    run = lambda p: list(generate(Context(llama, n_ctx=64), PROMPT, 16, Sampler(p)))  # noqa: E731
    a, b = run(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)), run(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    c = run(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8))
    assert a == b and a != c
    assert run(SamplerParams(temp=0.7, top_k=1, seed=3)) == run(SamplerParams(temp=0))


def test_top_p_and_min_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -3.0])
    draws = {Sampler(SamplerParams(temp=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=s))(logits) for s in range(200)}
    # softmax: p0=.72, p1=.26 -> cumulative .98 > .9 after two tokens
    assert draws == {0, 1}
    draws = {Sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=s))(logits) for s in range(200)}
    assert draws == {0}


# --- generate_parallel ---------------------------------------------------------------------------

def _sampled(seed: int) -> Sampler:
    return Sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))


def _parallel(model, n_predict, samplers, is_eog=None, n_ctx=256) -> list[list[int]]:
    outs = [[] for _ in samplers]
    ctx = Context(model, n_ctx=n_ctx, n_seq_max=len(samplers))
    for step in generate_parallel(ctx, PROMPT, n_predict, samplers, is_eog=is_eog):
        for s, t in step:
            outs[s].append(t)
    return outs


def test_parallel_greedy_matches_transformers(llama, shared):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = _parallel(llama, 16, [Sampler(SamplerParams(temp=0)) for _ in range(4)])
    assert outs == [ref[0, len(PROMPT):].tolist()] * 4


# one file per memory kind: KV cache, iSWA, recurrent (Mamba, Mamba2), hybrid, encoder-decoder (cross)
@pytest.mark.parametrize("name", ["llama-tiny-Q4_0", "gemma3-tiny-f32", "mamba-tiny-f32", "mamba2-tiny-f32",
                                  "jamba-tiny-f32", "t5-tiny-f32"])
def test_parallel_sequence_i_equals_a_lone_run_with_seed_plus_i(name, gguf_dir):
    """The prompt is decoded once and shared (seq_cp); each step decodes all sequences in one batch.
    Batch invariance makes sequence i's tokens those of ``generate`` alone with seed 7 + i."""
    model = load_model(gguf_dir / f"{name}.gguf")
    alone = [list(generate(Context(model, n_ctx=64), PROMPT, 12, _sampled(7 + i))) for i in range(3)]
    assert len({tuple(a) for a in alone}) == 3  # the seeds differ: a mix-up of sequences would show
    assert _parallel(model, 12, [_sampled(7 + i) for i in range(3)]) == alone


def test_parallel_sequence_stopping_early_leaves_the_others_unchanged(llama):
    alone = [list(generate(Context(llama, n_ctx=64), PROMPT, 12, _sampled(3 + i))) for i in range(3)]
    stop = alone[1][4]  # sequence 1 ends at its fifth token; treat that token as end-of-generation
    first = lambda a: a[: a.index(stop) + 1] if stop in a else a  # noqa: E731
    outs = _parallel(llama, 12, [_sampled(3 + i) for i in range(3)], is_eog=lambda t: t == stop)
    assert outs == [first(a) for a in alone] and len(outs[1]) == alone[1].index(stop) + 1 <= 5


def test_parallel_checks_n_seq_max(llama):
    with pytest.raises(ValueError, match="exceed the context's n_seq_max = 2"):
        next(generate_parallel(Context(llama, n_ctx=64, n_seq_max=2), PROMPT, 4, [_sampled(i) for i in range(3)]))
