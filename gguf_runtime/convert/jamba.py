"""Jamba (JambaForCausalLM): llama.cpp's JambaModel conversion.

Mamba-1 layers and attention layers in one stack (``attn_layer_offset`` / ``attn_layer_period``);
``attention.head_count_kv`` is a per-layer array, 0 on the Mamba layers. The feed-forward is dense,
or a mixture of experts on the layers ``expert_layer_offset + k * expert_layer_period``: per-expert
``down_proj gate_proj up_proj`` stacked into ``ffn_{down,gate,up}_exps``, ``router`` ->
``ffn_gate_inp``. A single-expert ``experts.0.`` on a dense layer is read as the dense MLP (as
llama.cpp's "Mini-Jamba" handling). Mamba tensors: ``A = -exp(A_log)``, conv1d squeezed to 2-D.
"""
from __future__ import annotations

from collections.abc import Iterable

import gguf
import torch
from gguf import MODEL_TENSOR as MT

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, block_id, register
from .moe import ExpertStacks


@register("JambaForCausalLM")
class JambaConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.JAMBA

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_expert = int(self.find("num_local_experts", "num_experts"))
        self.moe_offset = int(self.find("expert_layer_offset"))
        self.moe_period = int(self.find("expert_layer_period"))
        if self.moe_period < 1 or int(self.find("attn_layer_period")) < 1:
            raise ConvertError(f"{self.dir / 'config.json'}: attn_layer_period and expert_layer_period must be >= 1")
        names = [(src, n) for src in self.ckpt.names() if (n := self._rename(src)) is not None]
        self.stacks = ExpertStacks(self, names, self.n_expert, ("down_proj", "gate_proj", "up_proj"),
                                   lambda bid, kind: f"model.layers.{bid}.mlp.experts.{kind}.weight")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        d_model = int(self.find("hidden_size", "mamba_d_model"))
        n_kv, offset, period = (int(self.find(k)) for k in ("num_key_value_heads", "attn_layer_offset", "attn_layer_period"))
        kv = [n_kv if i >= offset and (i - offset) % period == 0 else 0 for i in range(self.block_count)]
        w.add_block_count(self.block_count)
        w.add_context_length(self.find("max_position_embeddings", "n_ctx"))
        w.add_embedding_length(d_model)
        w.add_feed_forward_length(self.find("intermediate_size"))
        w.add_head_count(self.find("num_attention_heads"))
        w.add_head_count_kv(kv)
        w.add_ssm_conv_kernel(self.find("mamba_d_conv", default=None) or 4)
        w.add_ssm_inner_size(int(self.find("mamba_expand")) * d_model)
        w.add_ssm_state_size(self.find("mamba_d_state", default=None) or 16)
        w.add_ssm_time_step_rank(self.find("mamba_dt_rank", default=None) or -(d_model // -16))
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-6)
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(self.find("num_experts_per_tok", "num_experts_per_token"))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            vocab.sentencepiece(w, self.dir, self.find("vocab_size", default=None))
        elif vocab.llama_hf(w, self.dir):
            w.add_add_space_prefix(False)
        else:
            raise ConvertError(f"{self.dir}: Jamba needs tokenizer.model or a sentencepiece-style tokenizer.json")

    def _rename(self, name: str) -> str:
        name = name.replace(".moe.", ".feed_forward.")
        bid = block_id(name)
        if bid is not None and not (bid >= self.moe_offset and (bid - self.moe_offset) % self.moe_period == 0):
            name = name.replace(".experts.0.", ".")  # a dense layer saved as one expert
        return name

    def rename(self, name: str) -> str | None:
        name = self._rename(name)
        return name if self.stacks.keep(name) else None

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if self.stacks.is_piece(name):
            for merged, stack in self.stacks.stacked(name, t):
                yield self.map(merged), stack
            return
        new = self.map(name)
        if self.is_tensor(new, MT.SSM_CONV1D):  # (d_inner, 1, d_conv) -> (d_inner, d_conv)
            t = t.squeeze()
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        yield new, t
