"""Helpers the test modules share: wikitext tokens, tiny-model perplexity, random token lists,
decoding one batch alone. Reference figures live beside the tests that use them, each with its
provenance."""
from __future__ import annotations

from pathlib import Path

import torch

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.models import load_model
from gguf_runtime.tokenizer import Tokenizer
from gguf_runtime.tools.perplexity import perplexity

WIKI_BYTES = 200_000  # ../shared/README.md: llama-perplexity -c 128 over the first 200,000 bytes


def wiki_tokens(gguf_path: Path, wikitext: Path, n_bytes: int = WIKI_BYTES) -> tuple[torch.Tensor, Tokenizer]:
    """The first ``n_bytes`` of wikitext-2 tokenized as llama-perplexity does (special tokens added
    as the vocabulary says)."""
    tok = Tokenizer.from_gguf(GGUFFile(gguf_path))
    text = wikitext.read_bytes()[:n_bytes].decode("utf-8", errors="ignore")
    return torch.tensor(tok.encode(text, add_special=True)), tok


def tiny_ppl(gguf_path: Path, wikitext: Path, n_ctx: int = 128, n_chunks: int = 100, n_batch: int = 2048,
             n_ubatch: int = 512, model=None):
    """``llama-perplexity -c n_ctx --chunks n_chunks`` on the first 200,000 bytes of wikitext-2."""
    toks, tok = wiki_tokens(gguf_path, wikitext)
    model = model or load_model(gguf_path, device="cpu")
    return perplexity(model, toks, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_chunks=n_chunks,
                      bos=tok.bos_id if tok.add_bos else None)


def toks(n: int, seed: int, lo: int = 3, hi: int = 2048) -> list[int]:
    """``n`` random token ids in ``[lo, hi)``."""
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, t: list[int], n_ubatch: int = 512, n_ctx: int = 256, numerics=None) -> torch.Tensor:
    """Logits of every token of ``t`` decoded as one sequence in a fresh context."""
    c = Context(model, n_ctx=n_ctx, n_ubatch=n_ubatch, numerics=numerics)
    c.decode(Batch(t, output=[True] * len(t)))
    return c.get_logits()
