"""The context, llama.cpp style: decode batches through a model and its memory.

``decode(batch)`` validates the batch against the memory, lets the memory split it into ubatches (a
KV cache takes simple splits, a recurrent memory equal splits), checks that they all fit, then runs
them one by one. Outputs are stored under their batch index, so ``logits(i)`` and ``get_logits()``
answer in the user's order whatever the split.

A context computes under its own :class:`~gguf_runtime.numerics.Numerics` (``numerics=``; default
invariant): every ubatch runs inside ``numerics.use(self.numerics)``, so contexts with different
numerics can live side by side in one process.
"""
from __future__ import annotations

import torch

from . import numerics as _numerics
from .batch import Batch, BatchAllocator
from .errors import BatchError, UnsupportedError
from .models import load_model
from .models.base import Model
from .numerics import Numerics


class Context:
    def __init__(self, model: Model, n_ctx: int | None = None, n_batch: int = 2048, n_ubatch: int = 512,
                 n_seq_max: int = 1, embeddings: bool = False, numerics: Numerics | None = None,
                 swa_full: bool = False):
        a = model.args
        self.model = model
        self.numerics = numerics or _numerics.current()
        self.n_ctx = int(n_ctx or a.n_ctx_train)
        self.n_batch = min(int(n_batch), self.n_ctx) if n_batch else self.n_ctx
        self.n_ubatch = min(int(n_ubatch), self.n_batch)
        self.n_seq_max = int(n_seq_max)
        self.embeddings = embeddings
        self.memory = model.make_memory(self.n_ctx, self.n_seq_max, self.numerics)
        if swa_full:  # llama.cpp's swa_full: sliding-window layers keep every position
            self.memory.keep_all()
        self._out_idx: torch.Tensor | None = None  # batch indices of the outputs, sorted
        self._logits: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None

    @classmethod
    def from_file(cls, path, device=None, dtype=torch.float32, **kw) -> "Context":
        return cls(load_model(path, device=device, dtype=dtype), **kw)

    @property
    def n_vocab(self) -> int:
        return self.model.args.n_vocab

    def decode(self, batch: Batch) -> None:
        if len(batch.tokens) > self.n_batch:
            raise BatchError(f"batch of {len(batch.tokens)} tokens exceeds n_batch = {self.n_batch}")
        balloc = BatchAllocator(batch, self.n_vocab, self.n_seq_max, self.memory, output_all=self.embeddings)
        ubatches = self.memory.split(balloc, self.n_ubatch)
        self.memory.prepare(ubatches)
        n_out = balloc.n_outputs
        self._logits = self._hidden = None
        # Each ubatch's outputs go straight to their rows in batch order: one (n_outputs, n_vocab)
        # buffer, no list of pieces to concatenate and reorder (a 262k vocabulary makes those copies GBs).
        sels = [ub.output.nonzero().flatten() for ub in ubatches]
        self._out_idx = torch.sort(torch.cat([ub.idx[sel] for ub, sel in zip(ubatches, sels)])).values
        out = None
        with torch.inference_mode(), _numerics.use(self.numerics):
            for ub, sel in zip(ubatches, sels):
                self.memory.update()
                view = self.memory.apply(ub)
                h = self.model(ub, view)
                if not sel.numel():
                    continue
                hs = h[sel.to(h.device)]
                rows = hs.float() if self.embeddings else self.model.logits(hs)
                if len(ubatches) == 1 and torch.equal(ub.idx[sel], self._out_idx):
                    out = rows  # one ubatch, outputs in batch order: its rows as they are, no copy
                    break
                if out is None:
                    out = rows.new_empty(n_out, rows.shape[-1])
                at = torch.searchsorted(self._out_idx, ub.idx[sel])
                a, n = int(at[0]), at.numel()
                if torch.equal(at, torch.arange(a, a + n)):  # a run of rows: one copy
                    out[a:a + n].copy_(rows)
                else:  # (a scatter by index is ~10x slower than that copy)
                    out[at.to(out.device)] = rows
                del rows
        if self.embeddings:  # out stays None when no output was asked for
            self._hidden = out
        else:
            self._logits = out

    def encode(self, batch: Batch) -> None:
        """llama.cpp's ``llama_encode`` for an encoder-decoder model (T5): run the encoder over the
        batch's whole sequences and keep each sequence's output in the memory for the decoder's
        cross-attention; every token's encoder state is an output (``get_embeddings``)."""
        from .memory.cross import CrossMemory  # the memory of encoder-decoder models

        mem = self.memory
        if not isinstance(mem, CrossMemory):
            raise UnsupportedError("encode needs an encoder-decoder model (such as T5); this model only decodes")
        if len(batch.tokens) > self.n_batch:
            raise BatchError(f"batch of {len(batch.tokens)} tokens exceeds n_batch = {self.n_batch}")
        balloc = BatchAllocator(batch, self.n_vocab, self.n_seq_max, None, output_all=True)
        ubatches = mem.encoder_split(balloc, self.n_ubatch)
        rows, idx = [], []
        with torch.inference_mode(), _numerics.use(self.numerics):
            for ub in ubatches:
                h = self.model.encode(ub, mem.encoder_view(ub))
                mem.store(ub, h)
                rows.append(h.float())
                idx.append(ub.idx)
        all_idx = torch.cat(idx)
        order = torch.argsort(all_idx)
        self._out_idx, self._logits = all_idx[order], None
        self._hidden = torch.cat(rows)[order.to(self.model.device)]

    # -- outputs -------------------------------------------------------------------------------
    def _row(self, i: int) -> int:
        if self._out_idx is None:
            raise BatchError("no outputs: call decode first")
        n = int(self._out_idx.numel())
        if i < 0:
            if -i > n:
                raise BatchError(f"output index {i} out of range: the last batch has {n} outputs")
            return n + i
        hit = (self._out_idx == i).nonzero()
        if hit.numel() == 0:
            raise BatchError(f"token {i} of the last batch was not marked as an output")
        return int(hit[0])

    def _out(self, embeddings: bool) -> torch.Tensor:
        t = self._hidden if embeddings else self._logits
        if t is None:
            raise BatchError("no embeddings: create the context with embeddings=True" if embeddings else
                             "no logits: the last batch had no outputs or the context computes embeddings")
        return t

    def logits(self, i: int) -> torch.Tensor:
        """Logits of batch token ``i`` (negative: counted back from the last output)."""
        return self._out(False)[self._row(i)]

    def get_logits(self) -> torch.Tensor:
        """All output logits, (n_outputs, n_vocab), in batch order."""
        return self._out(False)

    def embeddings_ith(self, i: int) -> torch.Tensor:
        return self._out(True)[self._row(i)]

    def get_embeddings(self) -> torch.Tensor:
        return self._out(True)

    # -- state (gguf_runtime/state.py, docs/state.md) -------------------------------------------
    def state_save(self, path, seq_id: int | None = None, tokens=None) -> int:
        """Save the whole context (memory and last outputs) or one sequence, with the token history
        ``tokens``, to a safetensors file (atomically); returns its size in bytes."""
        from . import state

        return state.save(self, path, seq_id, tokens)

    def state_load(self, path, seq_id: int | None = None, dest_seq_id: int | None = None) -> list[int]:
        """Restore a saved state (whole, or sequence ``seq_id`` into ``dest_seq_id``) and return its
        token history; a file this context cannot take is one StateError and changes nothing."""
        from . import state

        return state.load(self, path, seq_id, dest_seq_id)
