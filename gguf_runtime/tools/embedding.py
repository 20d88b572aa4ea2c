"""Embeddings, llama.cpp style: pooling, normalisation and llama-embedding's output formats.

:class:`Embedder` packs many token sequences as separate sequences into batches of at most
``n_batch`` tokens and ``n_seq_max`` sequences (as llama-embedding does), decodes each through a
``Context(..., embeddings=True)`` — which splits it into ubatches the way the model's memory needs —
and pools the per-token outputs by sequence id. Pooling runs over the whole sequence after the batch,
so a causal model's sequence may span several ubatches and a text gets the same vector whatever it
is batched with:

- ``none``: every token's final hidden state; ``mean``: their average (accumulated in float64);
- ``cls``: the token at the lowest position; ``last``: the highest (llama.cpp's inp_cls);
- ``rank``: the classifier head (``Model.rank``) over the cls token (last token for causal models).

:func:`normalize` is ``common_embd_normalize`` (-1 none, 0 max-abs scaled to int16, 1 taxicab,
2 euclidean, p > 2 p-norm); :func:`format_embeddings` reproduces llama-embedding's stdout for the
default, ``array``, ``json``, ``json+`` and ``raw`` formats.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..batch import Batch
from ..context import Context
from ..errors import BatchError, UnsupportedError

POOLINGS = ("none", "mean", "cls", "last", "rank")
FORMATS = ("", "array", "json", "json+", "raw")
_NO_HEAD = "rank pooling needs a classifier head (cls / cls.output tensors); this model has none"


def default_pooling(model) -> str:
    """The file's ``{arch}.pooling_type`` (BERT), else none, as llama.cpp falls back to."""
    return model.args.pooling or "none"


def pool(h: torch.Tensor, seq_ids: Sequence[Sequence[int]], pos: torch.Tensor, pooling: str,
         model=None) -> tuple[list[int], torch.Tensor]:
    """Pool per-token outputs ``h`` (n_tokens, n_embd) by sequence. Returns the sorted sequence ids and
    one row per sequence (``none``: ``h`` itself, with the tokens' primary sequence ids)."""
    if pooling not in POOLINGS:
        raise UnsupportedError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
    if pooling == "none":
        return [s[0] for s in seq_ids], h.float()
    rows = torch.tensor([i for i, s in enumerate(seq_ids) for _ in s], dtype=torch.long)
    seqs = torch.tensor([sid for s in seq_ids for sid in s], dtype=torch.long)
    unq, seg = torch.unique(seqs, return_inverse=True)
    if pooling == "mean":
        acc = torch.zeros(len(unq), h.shape[1], dtype=torch.float64, device=h.device)
        acc.index_add_(0, seg.to(h.device), h[rows.to(h.device)].double())
        cnt = torch.bincount(seg, minlength=len(unq)).to(acc)
        return unq.tolist(), (acc / cnt.unsqueeze(1)).float()
    last = pooling == "last" or (pooling == "rank" and not _is_encoder(model))
    p = pos.to(torch.long)[rows]
    order = torch.argsort(p if last else -p, stable=True)  # wanted token of each sequence sorts last
    order = order[torch.argsort(seg[order], stable=True)]
    counts = torch.bincount(seg, minlength=len(unq))
    pick = rows[order[torch.cumsum(counts, 0) - 1]]
    out = h[pick.to(h.device)].float()
    if pooling == "rank":
        if not model.has_rank_head:
            raise UnsupportedError(_NO_HEAD)
        out = model.rank(out)
    return unq.tolist(), out


def _is_encoder(model) -> bool:
    return model is not None and not model.args.causal


def normalize(x: torch.Tensor, mode: int) -> torch.Tensor:
    """llama.cpp's common_embd_normalize over the last dim: -1 none, 0 max-abs scaled to 32760 (int16),
    1 taxicab, 2 euclidean, p > 2 p-norm; sums in float64, an all-zero row stays zero."""
    x = x.float()
    if mode == -1:
        return x.clone()
    if mode < -1:
        raise UnsupportedError(f"invalid embedding normalisation {mode}: use -1, 0, 1, 2 or a p-norm order > 2")
    xd = x.double()
    if mode == 0:
        s = xd.abs().amax(-1) / 32760.0
    elif mode == 2:
        s = (x * x).double().sum(-1).sqrt()  # float products summed in double, as in C
    else:
        s = xd.abs().pow(mode).sum(-1).pow(1.0 / mode)
    norm = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return (xd * norm.unsqueeze(-1)).float()


def cosine_matrix(e: torch.Tensor) -> torch.Tensor:
    """common_embd_similarity_cos for every pair of rows (float products, double sums; two zero
    vectors are similar (1), one zero vector is not (0))."""
    e = e.float()
    dots = torch.stack([(e[i] * e).double().sum(-1) for i in range(len(e))]) if len(e) else e.new_zeros(0, 0).double()
    sq = torch.diagonal(dots)
    sim = dots / (sq.sqrt().unsqueeze(1) * sq.sqrt().unsqueeze(0))
    z = sq == 0
    sim = torch.where(z.unsqueeze(1) | z.unsqueeze(0), 0.0, sim)
    return torch.where(z.unsqueeze(1) & z.unsqueeze(0), 1.0, sim).float()


class Embedder:
    """Embeds token sequences through a model: whole batches of separate sequences, pooled per sequence."""

    def __init__(self, model, pooling: str | None = None, n_batch: int = 2048, n_ubatch: int | None = None,
                 n_seq_max: int = 256, n_ctx: int = 0):
        """``n_ubatch`` defaults to the whole batch for encoders (as llama-embedding sets it for non-causal
        models) and to 512 for causal models."""
        self.model = model
        self.pooling = pooling or default_pooling(model)
        if self.pooling not in POOLINGS:
            raise UnsupportedError(f"unknown pooling '{self.pooling}' (choose from {', '.join(POOLINGS)})")
        if self.pooling == "rank" and not model.has_rank_head:
            raise UnsupportedError(_NO_HEAD)
        self.n_batch = max(int(n_batch), int(n_ctx or 0))  # llama-embedding: the batch fills the context
        self.n_seq_max = int(n_seq_max)
        n_ubatch = n_ubatch or (self.n_batch if _is_encoder(model) else 512)
        self.ctx = Context(model, n_ctx=self.n_batch, n_batch=self.n_batch, n_ubatch=min(int(n_ubatch), self.n_batch),
                           n_seq_max=self.n_seq_max, embeddings=True)

    def _decode(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        self.ctx.memory.clear()
        batch = Batch.from_sequences(seqs, outputs="all")
        self.ctx.decode(batch)
        h = self.ctx.get_embeddings()
        n = sum(len(s) for s in seqs)
        sids = [(k,) for k, s in enumerate(seqs) for _ in s]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])
        _, out = pool(h[:n], sids, pos, self.pooling, self.model)
        if self.pooling == "none":
            return list(out.split([len(s) for s in seqs]))
        return list(out)

    def embed_tokens(self, seqs: Sequence[Sequence[int]], normalize_mode: int = -1) -> list[torch.Tensor]:
        """One vector per sequence ((n_tokens, n_embd) per sequence with pooling none), normalised."""
        out: list[torch.Tensor] = []
        cur: list[list[int]] = []
        n_cur = 0
        for k, s in enumerate(seqs):
            s = list(s)
            if not s:
                raise BatchError(f"prompt {k} has no tokens")
            if len(s) > self.n_batch:
                raise BatchError(f"prompt {k} has {len(s)} tokens, more than the batch size {self.n_batch} "
                                 f"(increase -b / -c)")
            if cur and (n_cur + len(s) > self.n_batch or len(cur) >= self.n_seq_max):
                out += self._decode(cur)
                cur, n_cur = [], 0
            cur.append(s)
            n_cur += len(s)
        if cur:
            out += self._decode(cur)
        return [normalize(e, normalize_mode) for e in out]

    def embed(self, texts: Sequence[str], tokenizer, normalize_mode: int = 2) -> list[torch.Tensor]:
        """Tokenize (special tokens added and parsed, as llama-embedding does) and embed."""
        return self.embed_tokens([tokenizer.encode(t, add_special=True, parse_special=True) for t in texts],
                                 normalize_mode)


# -- llama-embedding's stdout -------------------------------------------------------------------------
def _f(v: float, mode: int, spec: str = "%1.7f") -> str:
    return ("%1.0f" if mode == 0 else spec) % v


def _cut(s: str, n: int) -> str:
    return s.encode()[:n].decode("utf-8", "ignore")


def format_embeddings(emb: torch.Tensor, fmt: str, normalize_mode: int, prompts: Sequence[str], pooling: str,
                      cls_labels: Sequence[str] = ()) -> str:
    """llama-embedding's stdout for ``emb`` (n_embd_count, n) rows: the default listing, ``array``,
    ``json``, ``json+`` (with the cosine-similarity matrix) or ``raw`` (one row per line)."""
    if fmt not in FORMATS:
        raise UnsupportedError(f"unknown output format '{fmt}' (choose from array, json, json+, raw or empty)")
    rows = emb.float().tolist()
    n_prompts, out = len(prompts), []
    if fmt == "":
        out.append("\n")
        if pooling == "none":
            for j, r in enumerate(rows):
                head = "".join((("%6.0f " if normalize_mode == 0 else "%9.6f ") % v) for v in r[:3])
                tail = "".join((("%6.0f " if normalize_mode == 0 else "%9.6f ") % v) for v in r[-3:])
                out.append(f"embedding {j}: {head} ... {tail}\n")
        elif pooling == "rank":
            for j, r in enumerate(rows):
                for i, v in enumerate(r):
                    label = cls_labels[i] if i < len(cls_labels) and cls_labels[i] else str(i)
                    out.append("rerank score %d: %8.3f\n" % (j, v) if len(r) == 1 else
                               "rerank score %d: %8.3f [%s]\n" % (j, v, label))
        else:
            for j, r in enumerate(rows):
                vals = r[:16] if n_prompts > 1 else r
                out.append(f"embedding {j}: " + "".join((("%6.0f " if normalize_mode == 0 else "%9.6f ") % v) for v in vals) + "\n")
            if n_prompts > 1:
                sim = cosine_matrix(emb).tolist()
                out.append("\ncosine similarity matrix:\n\n")
                out.append("".join("%6s " % _cut(p, 6) for p in prompts) + "\n")
                for i in range(n_prompts):
                    out.append("".join("%6.2f " % v for v in sim[i]) + _cut(prompts[i], 10) + "\n")
    elif fmt in ("array", "json", "json+"):
        vec = ["[" + ",".join(_f(v, normalize_mode) for v in r) + "]" for r in rows]
        if fmt == "array":
            out.append("[" + ",".join(vec) + "]\n")
        else:
            items = [f'    {{\n      "object": "embedding",\n      "index": {j},\n      "embedding": {v}\n    }}'
                     for j, v in enumerate(vec)]
            out.append('{\n  "object": "list",\n  "data": [\n' + ",\n".join(items) + "\n  ]")
            if fmt == "json+" and n_prompts > 1:
                sim = cosine_matrix(emb).tolist()
                out.append(',\n  "cosineSimilarity": [\n'
                           + ",\n".join("    [" + ", ".join("%6.2f" % v for v in r) + " ]" for r in sim) + "\n  ]")
            out.append("\n}\n")
    else:  # raw
        out += [" ".join(_f(v, normalize_mode) for v in r) + "\n" for r in rows]
    out.append("\n")
    return "".join(out)
