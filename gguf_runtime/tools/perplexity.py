"""Perplexity with llama-perplexity's semantics (tools/perplexity/perplexity.cpp).

The text is tokenized once (with BOS when the vocabulary adds one) and cut into
``n_chunk = n_tokens // n_ctx`` chunks of ``n_ctx`` tokens. ``n_seq = max(1, n_batch // n_ctx)`` chunks
are decoded together as parallel sequences of one context (``n_seq * n_ctx`` cells), the memory being
cleared between groups; with ``n_batch < n_ctx`` each chunk is decoded in ``ceil(n_ctx / n_batch)``
batches. The first token of each chunk is replaced by BOS; only the second half of each chunk is scored
(``first = n_ctx // 2``: the logits at positions ``first .. n_ctx - 2`` predict tokens
``first + 1 .. n_ctx - 1``), each token's log-softmax being computed in double from float32
differences as llama.cpp does. After each chunk the running ``[i]ppl`` is recorded, and the final
estimate carries llama.cpp's uncertainty ``ppl * sqrt((<nll^2> - <nll>^2) / (count - 1))``.

The memory comes from the model (``make_memory``), so attention and recurrent models go through the
same code. Because every op is batch-invariant, the result does not depend on ``n_batch`` /
``n_ubatch``: the same PPL to every printed digit.

    >>> from gguf_runtime.models import load_model
    >>> r = perplexity(load_model("llama-tiny-f32.gguf"), tokens, n_ctx=128, bos=1)
    >>> r.ppl, r.ppl_err, r.chunk_ppl[:3]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .. import kernels
from ..batch import Batch
from ..context import Context
from ..errors import BatchError
from ..gguf import native
from ..kernels.linear import pad_dim
from .distributed import Dist, Runner

ChunkHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (chunk index, logits (n, V), targets (n,))


@dataclass
class PerplexityResult:
    ppl: float  # final estimate
    ppl_err: float  # llama.cpp's +/- uncertainty
    chunk_ppl: list[float]  # running PPL after each chunk: llama.cpp's "[i]ppl," values
    chunk_nll: list[float] = field(default_factory=list)  # mean NLL of each chunk's scored tokens
    n_ctx: int = 0
    n_chunks: int = 0
    n_scored: int = 0  # tokens scored (n_chunks * (n_ctx - 1 - n_ctx // 2))
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens decoded per second (n_chunks * n_ctx / seconds), as llama.cpp's throughput."""
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds else 0.0


def check_batch(n_ctx: int, n_batch: int) -> None:
    """llama-perplexity's constraints on -c and -b."""
    if n_ctx < 4:
        raise BatchError(f"context size -c {n_ctx} is too small for perplexity (need at least 4)")
    if n_batch <= 0:
        raise BatchError(f"batch size -b must be positive, got {n_batch}")
    if n_batch >= n_ctx and n_batch % n_ctx:
        raise BatchError(f"batch size -b {n_batch} must be below -c {n_ctx} or a multiple of it")


def check_params(n_tokens: int, n_ctx: int, n_batch: int) -> int:
    """Validates -c / -b against the token count; returns n_chunk_max."""
    check_batch(n_ctx, n_batch)
    if n_tokens < 2 * n_ctx:
        raise BatchError(f"the text tokenizes to only {n_tokens} tokens; perplexity with -c {n_ctx} "
                         f"needs at least {2 * n_ctx}")
    return n_tokens // n_ctx


def make_context(model, n_ctx: int, n_batch: int = 2048, n_ubatch: int = 512, swa_full: bool = False) -> Context:
    """The context llama-perplexity creates: n_seq = max(1, n_batch // n_ctx) sequences of n_ctx
    (``swa_full``: sliding-window layers keep every position, llama.cpp's --swa-full)."""
    n_seq = max(1, n_batch // n_ctx)
    return Context(model, n_ctx=n_seq * n_ctx, n_batch=min(n_batch, n_seq * n_ctx), n_ubatch=n_ubatch,
                   n_seq_max=n_seq, swa_full=swa_full)


def _as_context(ctx_or_model, n_ctx: int, n_batch: int, n_ubatch: int) -> Context:
    if not isinstance(ctx_or_model, Context):
        return make_context(ctx_or_model, n_ctx, n_batch, n_ubatch)
    ctx, n_seq = ctx_or_model, max(1, n_batch // n_ctx)
    if ctx.n_seq_max < n_seq or ctx.n_ctx < n_seq * n_ctx or ctx.n_batch < min(n_batch, n_seq * n_ctx):
        raise BatchError(f"context (n_ctx={ctx.n_ctx}, n_batch={ctx.n_batch}, n_seq_max={ctx.n_seq_max}) is too "
                         f"small for -c {n_ctx} -b {n_batch}; use perplexity.make_context")
    return ctx


def chunk_logits(ctx: Context, tokens: torch.Tensor, n_ctx: int, n_batch: int, n_chunk: int,
                 bos: int | None, ids: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Decodes chunks as llama-perplexity does and yields ``(i, logits, targets)`` per chunk, in order:
    float32 logits of positions first .. n_ctx-2 and the tokens they predict. ``ids``: only these
    chunks (default ``0 .. n_chunk-1``), ``n_seq`` at a time in the order given."""
    first = n_ctx // 2
    n_seq = max(1, n_batch // n_ctx)
    n_parts = -(-n_ctx // n_batch)
    ids = list(range(n_chunk)) if ids is None else list(ids)
    for g in range(0, len(ids), n_seq):
        group = ids[g:g + n_seq]
        ns = len(group)
        chunk = torch.stack([tokens[c * n_ctx:(c + 1) * n_ctx] for c in group]).clone()
        if bos is not None:
            chunk[:, 0] = bos
        ctx.memory.clear()
        logits, done = None, 0  # the scored rows; several parts (n_ctx > n_batch) are copied into one tensor
        for j in range(n_parts):
            p0, p1 = j * n_batch, min(n_ctx, (j + 1) * n_batch)
            pos = torch.arange(p0, p1).repeat(ns)
            seq_ids = [(s,) for s in range(ns) for _ in range(p1 - p0)]
            out = pos >= first
            ctx.decode(Batch(chunk[:, p0:p1].reshape(-1), pos, seq_ids, out))
            if not out.any():
                continue
            part = ctx.get_logits()
            if n_parts == 1:
                logits = part
                break
            if logits is None:  # n_ctx > n_batch: one sequence (a large -c would otherwise hold two copies)
                logits = part.new_empty(n_ctx - first, part.shape[-1])
            logits[done:done + part.shape[0]] = part
            done += part.shape[0]
            del part
        logits = logits.view(ns, n_ctx - first, -1)
        for s, c in enumerate(group):
            start = c * n_ctx
            yield c, logits[s, :-1], tokens[start + first + 1:start + n_ctx]


def token_nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(target) per row in float64, computed as llama.cpp does: float32 differences to the
    row max, exponentials summed in double. ``rows``: score ``logits[rows]`` (without gathering them
    all: a 262k vocabulary makes every row 1 MiB).

    On CPU float32 the native library computes it (``native.nll``: one fixed order per row, no
    temporaries). Elsewhere rows are taken ``_NLL_ROWS`` at a time, the last piece padded with zero rows, and exponentiated
    lane-wise (``kernels.exp``): every piece has the same shape and every element goes through the
    same code, so a row's value does not depend on which rows share the call (a lone row's sum
    would otherwise be split across threads, in another order)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        fn = native.nll()
        if fn is not None:  # (rows need unit column stride: almost always so already)
            return fn(logits if logits.stride(-1) == 1 else logits.contiguous(), rows, targets.reshape(-1).long())
    n = targets.numel() if rows is None else rows.numel()
    targets = targets.to(logits.device).view(-1, 1)
    if rows is not None:
        rows = rows.to(logits.device)
    out = []
    for r in range(0, n, _NLL_ROWS):  # rows at a time: a 262k vocabulary's temporaries stay small
        x = (logits[r:r + _NLL_ROWS] if rows is None else logits.index_select(0, rows[r:r + _NLL_ROWS])).float()
        t = targets[r:r + _NLL_ROWS]
        k = x.shape[0]
        if k < _NLL_ROWS:
            x, t = pad_dim(x, _NLL_ROWS, 0), pad_dim(t, _NLL_ROWS, 0)
        d = x - x.amax(-1, keepdim=True)
        lse = kernels.exp(d).double().sum(-1).log()
        out.append((lse - d.gather(-1, t).squeeze(-1).double())[:k])
    return torch.cat(out) if len(out) != 1 else out[0]


_NLL_ROWS = 64


def running_perplexity(ctx_or_model, tokens: Sequence[int] | torch.Tensor, n_ctx: int, n_batch: int = 2048,
                       n_ubatch: int = 512, n_chunks: int | None = None, bos: int | None = None,
                       on_logits: ChunkHook | None = None, runner: Runner | None = None) -> Iterator[PerplexityResult]:
    """:func:`perplexity`, one chunk at a time: yields the estimate over the chunks scored so far after
    each chunk (``n_chunks`` and ``chunk_ppl`` grow by one each time), so a caller can print the
    ``[i]`` values as they come and still report an estimate when it stops early (Ctrl-C). The last
    value yielded is :func:`perplexity`'s result. ``n_chunks``: at most this many chunks (None or
    negative: all). ``runner``: a :class:`~gguf_runtime.tools.distributed.Runner` sharing the chunks
    among processes and/or resuming from a log (rank 0 yields every estimate, other ranks none; the
    values are the same to the bit, since each chunk's sums do not depend on where it is computed);
    ``on_logits`` then sees only this rank's chunks."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n_chunk = check_params(tokens.numel(), n_ctx, n_batch)
    if n_chunks is not None and n_chunks >= 0:
        n_chunk = min(n_chunk, n_chunks)
    if n_chunk <= 0:
        raise BatchError("no chunk to score (--chunks 0)")
    ctx = _as_context(ctx_or_model, n_ctx, n_batch, n_ubatch)
    n_seq = max(1, n_batch // n_ctx)

    def compute(ids: Sequence[int]) -> Iterator[list[float]]:
        """Per chunk, as it is scored: the sums of its tokens' NLL and NLL^2, their count and mean (float64)."""
        for i, logits, targets in chunk_logits(ctx, tokens, n_ctx, n_batch, n_chunk, bos, ids):
            if on_logits is not None:
                on_logits(i, logits, targets)
            v = token_nll(logits, targets)
            yield [float(v.sum()), float((v * v).sum()), v.numel(), float(v.mean())]

    nll = nll2 = 0.0
    count = 0
    chunk_ppl, chunk_nll = [], []
    t0 = time.perf_counter()
    for i, (s, s2, n, mean_i) in (runner or Runner(Dist())).iterate(n_chunk, n_seq, compute):
        nll += s
        nll2 += s2
        count += n
        chunk_nll.append(mean_i)
        chunk_ppl.append(math.exp(nll / count))
        mean, mean2 = nll / count, nll2 / count
        ppl = math.exp(mean)
        var = mean2 - mean * mean
        err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
        yield PerplexityResult(ppl, err, list(chunk_ppl), list(chunk_nll), n_ctx, i + 1, count,
                               time.perf_counter() - t0)


def perplexity(ctx_or_model, tokens: Sequence[int] | torch.Tensor, n_ctx: int, n_batch: int = 2048,
               n_ubatch: int = 512, n_chunks: int | None = None, bos: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_chunk: Callable[[int, float], None] | None = None,
               on_logits: ChunkHook | None = None) -> PerplexityResult:
    """llama-perplexity over ``tokens`` (already tokenized, BOS included when the vocab adds it).

    ``ctx_or_model``: a model (a context with n_seq = max(1, n_batch // n_ctx) sequences is made) or a
    :class:`Context` large enough. ``bos``: the token replacing each chunk's first token (None: no
    replacement, for vocabularies that do not add BOS). ``n_chunks``: at most this many chunks.
    ``progress(done, total)`` after each chunk; ``on_chunk(i, running_ppl)`` for the ``[i]`` lines;
    ``on_logits(i, logits, targets)`` sees each chunk's scored logits (the KL-divergence base writer).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n_chunk = check_params(tokens.numel(), n_ctx, n_batch)
    if n_chunks is not None and n_chunks >= 0:
        n_chunk = min(n_chunk, n_chunks)
    r = None
    for r in running_perplexity(ctx_or_model, tokens, n_ctx, n_batch, n_ubatch, n_chunk, bos, on_logits):
        if on_chunk is not None:
            on_chunk(r.n_chunks - 1, r.chunk_ppl[-1])
        if progress is not None:
            progress(r.n_chunks, n_chunk)
    if r is None:  # running_perplexity raised for no chunk; unreachable
        raise BatchError("no chunk to score (--chunks 0)")
    return r
