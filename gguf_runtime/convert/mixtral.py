"""Mixtral (MixtralForCausalLM): llama.cpp converts it as a Llama (arch ``llama``) whose feed-forward
is a mixture of experts: ``block_sparse_moe.gate`` -> ``ffn_gate_inp``, the per-expert ``w1 w2 w3``
stacked into ``ffn_gate_exps ffn_down_exps ffn_up_exps``; Q/K rows permuted as for any Llama."""
from __future__ import annotations

from typing import Iterable

import gguf
import torch

from .base import register
from .llama import LlamaConverter
from .moe import ExpertStacks, expert_params


@register("MixtralForCausalLM")
class MixtralConverter(LlamaConverter):
    experts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = [(src, n) for src in self.ckpt.names() if (n := LlamaConverter.rename(self, src)) is not None]
        self.stacks = ExpertStacks(self, names, self.find("num_local_experts"), ("w1", "w2", "w3"),
                                   lambda bid, kind: f"layers.{bid}.feed_forward.experts.{kind}.weight")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        super().set_params(w)
        expert_params(self, w)

    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        return name if name is not None and self.stacks.keep(name) else None

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if self.stacks.is_piece(name):
            for merged, stack in self.stacks.stacked(name, t):
                yield self.map(merged), stack
            return
        yield from super().transform(name, t)
