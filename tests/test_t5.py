"""T5 (issue 21): the encoder-decoder against transformers, Context.encode then decode, the UGM
tokenizer, generation, invariance of decoding.

References: ``../shared/models/t5-tiny-hf/t5-reference.npz`` (transformers 5.24, float32: encoder ids
and mask, decoder ids, logits, encoder states, greedy ids) and transformers run here on the same HF
checkpoint.

A property of the fixture: its HF checkpoint has *separate* encoder and decoder embeddings
(``encoder.embed_tokens`` != ``decoder.embed_tokens``), while llama.cpp's GGUF has one
``token_embd`` (the decoder's). The GGUF therefore cannot reproduce the npz as it stands; the npz is
checked with the encoder's embedding put back from the checkpoint (the rest of the math is the
GGUF's), and the GGUF as it stands is checked against transformers given the same single embedding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.errors import BatchError, UnsupportedError
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.models import load_model
from gguf_runtime.models.t5 import relative_bucket
from gguf_runtime.tokenizer import Tokenizer
from gguf_runtime.tools.generate import Sampler, SamplerParams, generate


@pytest.fixture(scope="module")
def path(gguf_dir):
    return gguf_dir / "t5-tiny-f32.gguf"


@pytest.fixture(scope="module")
def model(path):
    return load_model(path, device="cpu")


@pytest.fixture(scope="module")
def ref(shared):
    z = np.load(shared / "models" / "t5-tiny-hf" / "t5-reference.npz")
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def enc_embd(shared):
    from safetensors import safe_open

    with safe_open(str(shared / "models" / "t5-tiny-hf" / "model.safetensors"), "pt") as f:
        return f.get_tensor("encoder.embed_tokens.weight")


def enc_ids(ref) -> list[list[int]]:
    return [r[m.astype(bool)].tolist() for r, m in zip(ref["encoder_input_ids"], ref["encoder_attention_mask"])]


def encode_with(model, c: Context, batch: Batch, embd: torch.Tensor | None) -> None:
    """``c.encode(batch)``, the encoder reading ``embd`` (the checkpoint's encoder embedding) when given."""
    if embd is None:
        return c.encode(batch)
    own = model.token_embd.weight
    model.token_embd.weight = torch.nn.Parameter(embd, requires_grad=False)
    try:
        c.encode(batch)
    finally:
        model.token_embd.weight = own


def test_relative_buckets_match_transformers():
    transformers = pytest.importorskip("transformers")
    rel = torch.arange(-300, 300)
    for bidirectional in (True, False):
        hf = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(relative_bucket(rel, bidirectional, 32), hf)


def test_ugm_tokenizer_matches_transformers_ids(path, ref):
    tok = Tokenizer.from_gguf(GGUFFile(path))
    assert tok.model == "t5" and tok.add_eos and not tok.add_bos and tok.eos_id == 1
    for text, ids in zip(ref["sentences"], enc_ids(ref)):
        assert tok.encode(str(text)) == ids
    # the precompiled charsmap normalizes (full-width letters, runs of spaces)
    assert tok.encode("ｆｕｌｌ   width") == tok.encode("full width")
    assert tok.decode(tok.encode("Each contributor grants you a license."), skip_special=True) == \
        "Each contributor grants you a license."


def test_ugm_tokenizer_matches_sentencepiece(path, shared):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shared / "models" / "t5-tiny-hf" / "spiece.model"))
    tok = Tokenizer.from_gguf(GGUFFile(path))
    text = (shared / "data" / "wikitext-2-test.txt").read_text()[:6000]
    for line in text.splitlines()[:60]:
        assert tok.encode(line, add_special=False) == sp.encode(line), line


def test_encode_decode_logits_match_transformers_reference(model, ref, enc_embd):
    """The npz's float32 logits and encoder states: max abs difference <= 1e-4 (the four sentences
    in one encode and one decode batch)."""
    c = Context(model, n_ctx=128, n_seq_max=4)
    ids = enc_ids(ref)
    encode_with(model, c, Batch.from_sequences(ids, outputs="all"), enc_embd)
    want = np.concatenate([ref["encoder_last_hidden_state"][i][:len(s)] for i, s in enumerate(ids)])
    assert np.abs(c.get_embeddings().numpy() - want).max() <= 1e-4
    c.decode(Batch.from_sequences(ref["decoder_input_ids"].tolist(), outputs="all"))
    got = c.get_logits().numpy().reshape(ref["logits"].shape)
    assert np.abs(got - ref["logits"]).max() <= 1e-4
    # negative control: the GGUF's single embedding in the encoder gives other logits
    c2 = Context(model, n_ctx=128, n_seq_max=4)
    c2.encode(Batch.from_sequences(ids, outputs="all"))
    c2.decode(Batch.from_sequences(ref["decoder_input_ids"].tolist(), outputs="all"))
    assert np.abs(c2.get_logits().numpy().reshape(ref["logits"].shape) - ref["logits"]).max() > 1e-2


def test_gguf_as_is_matches_transformers_with_its_embedding(model, ref, shared):
    """The GGUF unchanged against transformers whose encoder reads the same (decoder) embedding."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(shared / "models" / "t5-tiny-hf", dtype=torch.float32).eval()
    hf.encoder.embed_tokens.weight.data.copy_(hf.decoder.embed_tokens.weight.data)
    ids = enc_ids(ref)
    dec = ref["decoder_input_ids"].tolist()
    c = Context(model, n_ctx=128, n_seq_max=4)
    c.encode(Batch.from_sequences(ids, outputs="all"))
    c.decode(Batch.from_sequences(dec, outputs="all"))
    got = c.get_logits().view(4, 16, -1)
    with torch.inference_mode():
        for k, s in enumerate(ids):
            want = hf(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([dec[k]])).logits[0]
            assert (got[k] - want).abs().max() <= 1e-4


def test_decode_steps_and_neighbours_bitwise_invariant(model, ref):
    """The decoder stepped one token at a time, or beside other sequences in small ubatches, gives
    the logits of the whole decoder input at once (torch.equal)."""
    ids, dec = enc_ids(ref), ref["decoder_input_ids"].tolist()
    c = Context(model, n_ctx=128, n_seq_max=4)
    c.encode(Batch.from_sequences(ids[:1], outputs="all"))
    c.decode(Batch(dec[0], output=[True] * 16))
    whole = c.get_logits().clone()
    c = Context(model, n_ctx=128, n_seq_max=4)
    c.encode(Batch.from_sequences(ids[:1], outputs="all"))
    steps = []
    for t in dec[0]:
        c.decode(Batch([t], seq_ids=[(0,)]))
        steps.append(c.logits(-1))
    assert torch.equal(torch.stack(steps), whole)
    for n_ubatch in (22, 64):  # the encoder needs whole sequences per ubatch (22 tokens at most here)
        c = Context(model, n_ctx=128, n_ubatch=n_ubatch, n_seq_max=4)
        c.encode(Batch.from_sequences([ids[2], ids[0], ids[1]], outputs="all"))
        c.decode(Batch.from_sequences([dec[2], dec[0][:16], dec[1][:7]], outputs="all"))
        assert torch.equal(c.get_logits()[16:32], whole), n_ubatch
    # the encoder: one sequence alone or beside others
    c = Context(model, n_ctx=128, n_seq_max=4)
    c.encode(Batch.from_sequences(ids[:1], outputs="all"))
    alone = c.get_embeddings().clone()
    c.encode(Batch.from_sequences([ids[3], ids[0]], outputs="all"))
    assert torch.equal(c.get_embeddings()[len(ids[3]):], alone)


def test_generate_greedy_matches_transformers(model, ref, shared, path):
    """generate: the prompt goes through the encoder, the decoder starts from decoder_start_token_id
    (0) and is stepped one cached token at a time; the greedy ids are transformers' (its encoder
    reading the GGUF's embedding, as above)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(shared / "models" / "t5-tiny-hf", dtype=torch.float32).eval()
    hf.encoder.embed_tokens.weight.data.copy_(hf.decoder.embed_tokens.weight.data)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    for s in enc_ids(ref)[:2]:
        out = list(generate(Context(model, n_ctx=128), s, 24, Sampler(SamplerParams(temp=0)), is_eog=tok.is_eog))
        with torch.inference_mode():
            want = hf.generate(torch.tensor([s]), max_new_tokens=24, do_sample=False, num_beams=1)[0, 1:].tolist()
        assert out == want[:len(out)] and len(out) == len(want), (out, want)


def test_errors_are_one_line(model, path):
    c = Context(model, n_ctx=64)
    with pytest.raises(BatchError, match="no encoder output"):
        c.decode(Batch([0]))
    llama = Context.from_file(path.parent / "llama-tiny-f32.gguf", n_ctx=64)
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        llama.encode(Batch([1, 2]))
