"""`generate`: greedy decoding equals transformers' greedy generate; seeded sampling reproduces."""
from __future__ import annotations

import pytest
import torch

from gguf_runtime.context import Context
from gguf_runtime.tools.generate import Sampler, SamplerParams, generate
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
