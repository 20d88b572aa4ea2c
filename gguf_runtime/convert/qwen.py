"""Qwen2, Qwen3 and Qwen3-MoE (Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM): llama.cpp's
Qwen2Model, Qwen3Model and Qwen2MoeModel/Qwen3MoeModel conversions.

No Q/K permutation (GGML's NeoX RoPE reads HF's rotate-half rows as they are); QKV biases (Qwen2) and
q/k norms (Qwen3) map by name. The vocabulary is ``tokenizer.model`` when there is one, else the BPE
``tokenizer.json``. Qwen3-MoE: per-expert ``down_proj gate_proj up_proj`` stacked into
``ffn_{down,gate,up}_exps``, or the fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj`` split
and mapped as they are; ``moe_intermediate_size`` -> ``expert_feed_forward_length``.
"""
from __future__ import annotations

from typing import Iterable

import gguf
import torch

from . import vocab
from .base import ModelConverter, register
from .bert import pooling_type
from .moe import ExpertStacks, expert_params


@register("Qwen2ForCausalLM", "Qwen2Model")
class Qwen2Converter(ModelConverter):
    arch = gguf.MODEL_ARCH.QWEN2

    def set_params(self, w: gguf.GGUFWriter) -> None:
        self.text_params(w)
        expert_params(self, w)
        if (pool := pooling_type(self.dir)) is not None:  # sentence-transformers exports (Qwen3-Embedding)
            w.add_pooling_type(pool)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            vocab.sentencepiece(w, self.dir, self.find("vocab_size", default=None))
        else:
            vocab.gpt2(w, self.dir, self.find("vocab_size", default=None), pre=self.vocab_pre)

    def rename(self, name: str) -> str | None:
        if name.endswith(".rotary_emb.inv_freq"):
            return None
        return name.replace("language_model.", "")  # Qwen2Model's bare "layers.N..." names map as they are


@register("Qwen3ForCausalLM", "Qwen3Model")
class Qwen3Converter(Qwen2Converter):
    arch = gguf.MODEL_ARCH.QWEN3


@register("Qwen3MoeForCausalLM")
class Qwen3MoeConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.QWEN3MOE

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = [(src, n) for src in self.ckpt.names() if (n := self._rename(src)) is not None]
        self.stacks = ExpertStacks(self, names, self.find("num_local_experts", "num_experts"),
                                   ("down_proj", "gate_proj", "up_proj"),
                                   lambda bid, kind: f"model.layers.{bid}.mlp.experts.{kind}.weight")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        self.text_params(w)
        expert_params(self, w)
        if (n := self.hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n)
        if (n := self.hp.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        Qwen2Converter.set_vocab(self, w)

    @staticmethod
    def _rename(name: str) -> str | None:
        if name.endswith(".rotary_emb.inv_freq"):
            return None
        name = name.replace("language_model.", "")
        if name.endswith(("mlp.experts.down_proj", "mlp.experts.gate_up_proj")):
            name += ".weight"  # fused 3-D expert tensors, (n_expert, rows, cols)
        return name

    def rename(self, name: str) -> str | None:
        name = self._rename(name)
        return name if name is not None and self.stacks.keep(name) else None

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if self.stacks.is_piece(name):
            for merged, stack in self.stacks.stacked(name, t):
                yield self.map(merged), stack
        elif name.endswith("mlp.experts.gate_up_proj.weight"):
            if t.dim() != 3 or t.shape[-2] % 2:
                raise ValueError(f"expected (n_expert, 2 * n_ff, n_embd), got {tuple(t.shape)}")
            n_ff, base = t.shape[-2] // 2, name.removesuffix(".gate_up_proj.weight")
            yield self.map(f"{base}.gate_proj.weight"), t[..., :n_ff, :].contiguous()
            yield self.map(f"{base}.up_proj.weight"), t[..., n_ff:, :].contiguous()
        else:
            yield self.map(name), t
