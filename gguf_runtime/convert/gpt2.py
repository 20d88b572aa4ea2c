"""GPT-2 (GPT2LMHeadModel): llama.cpp's GPT2Model conversion. HF's Conv1D weights are stored
(in, out), so the attention and MLP weights are transposed to GGML's (out, in) rows."""
from __future__ import annotations

from typing import Iterable

import gguf
import torch

from . import vocab
from .base import ModelConverter, register


@register("GPT2LMHeadModel")
class GPT2Converter(ModelConverter):
    arch = gguf.MODEL_ARCH.GPT2

    def set_params(self, w: gguf.GGUFWriter) -> None:
        n_embd = self.find("n_embd")
        w.add_block_count(self.block_count)
        w.add_context_length(self.find("n_ctx", "n_positions"))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(self.find("n_inner", default=None) or 4 * n_embd)
        w.add_head_count(self.find("n_head"))
        w.add_layer_norm_eps(self.find("layer_norm_epsilon"))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        vocab.gpt2(w, self.dir, self.find("vocab_size", default=None), pre=self.vocab_pre)

    def rename(self, name: str) -> str | None:
        return None if name.endswith((".attn.bias", ".attn.masked_bias")) else name

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.transpose(1, 0)
        yield self.map(name), t
