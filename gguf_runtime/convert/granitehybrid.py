"""Granite 4 hybrid (GraniteMoeHybridForCausalLM) and Bamba (BambaForCausalLM): llama.cpp's
GraniteHybridModel conversion, arch ``granitehybrid``.

Mamba2 layers and attention layers (``layer_types``, else ``attn_layer_indices``, else
``attn_layer_period`` / ``attn_layer_offset``). The metadata is Granite's (the generic Llama keys,
``vocab_size``, rope dimension = hidden / heads, its four multipliers as ``attention.scale``,
``embedding_scale``, ``residual_scale``, ``logit_scale``, ``expert_shared_feed_forward_length``)
plus Mamba2's SSM keys, where the ``mamba_``-prefixed config names count too; ``head_count_kv`` is
per layer (0 on Mamba layers). Granite 4 uses no RoPE: ``rope.scaling.finetuned`` false and
``context_length`` 2^20 (Bamba keeps both). Tensors: Mamba layers as Mamba2 (``A = -exp(A_log)``,
A and D as (n_head, 1), norm as (n_group, d_inner / n_group)), attention Q/K permuted as a Llama's;
the fused ``input_linear`` (gate rows first) split into gate and up, ``shared_mlp`` becoming the
dense FFN when there are no experts, the shared expert otherwise.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager

import gguf
import torch
from gguf import MODEL_TENSOR as MT

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, block_id, register
from .llama import permute_qk
from .mamba import Mamba2Converter
from .moe import expert_params


@contextmanager
def _overwriting():
    """llama.cpp overwrites two generic keys (head_count_kv, context_length) with the hybrid's values,
    keeping their place in the file; gguf-py warns on each, which says nothing to our users."""
    log = logging.getLogger("gguf.gguf_writer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@register("GraniteMoeHybridForCausalLM", "BambaForCausalLM")
class GraniteHybridConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.GRANITE_HYBRID

    def __init__(self, model_dir, hparams, ckpt):
        hparams = {k: v for k, v in hparams.items() if k != "head_dim"}  # Granite ignores head_dim
        super().__init__(model_dir, hparams, ckpt)
        self.attn_layers = self._attn_layers()
        self.ssm_layers = [i for i in range(self.block_count) if i not in self.attn_layers]
        if not self.ssm_layers:
            raise ConvertError(f"{self.dir / 'config.json'}: no Mamba layers: a non-hybrid Granite (arch granite / "
                               "granitemoe) is not supported")
        self.n_head = int(self.find("num_attention_heads", "n_heads"))
        self.n_kv = int(self.find("num_key_value_heads", "n_kv_heads"))
        self.d_model = int(self.mfind("hidden_size", "d_model"))
        self.n_group = int(self.mfind("n_groups", "num_groups"))
        self.d_inner = int(self.mfind("expand", "num_heads")) * self.d_model
        self.has_experts = bool(self.hp.get("num_local_experts"))

    def mfind(self, *keys: str, default=None, required: bool = True):
        """llama.cpp's prefixed lookup: each key, then each key with ``mamba_`` in front."""
        v = self.find(*keys, *(f"mamba_{k}" for k in keys), default=None)
        if v is None and required and default is None:
            raise ConvertError(f"{self.dir / 'config.json'}: none of {', '.join(keys)} (or mamba_*) is set")
        return default if v is None else v

    def _attn_layers(self) -> list[int]:
        if types := self.hp.get("layer_types"):
            return [i for i, t in enumerate(types) if t == "attention"]
        if layers := self.hp.get("attn_layer_indices"):
            return list(layers)
        period, offset = self.hp.get("attn_layer_period"), self.hp.get("attn_layer_offset")
        if not period or offset is None:
            raise ConvertError(f"{self.dir / 'config.json'}: no layer_types, attn_layer_indices or "
                               "attn_layer_period + attn_layer_offset")
        return [i for i in range(self.block_count) if i % period == offset]

    def set_params(self, w: gguf.GGUFWriter) -> None:
        if self.hp.get("hidden_act") not in (None, "silu"):
            raise ConvertError(f"{self.dir / 'config.json'}: hidden_act {self.hp['hidden_act']!r} (only silu)")
        head_dim = self.mfind("d_head", default=64)
        if self.d_inner % head_dim:
            raise ConvertError(f"SSM inner size {self.d_inner} is not a multiple of head dim {head_dim}")
        use_rope = self.hp["architectures"][0] == "BambaForCausalLM"
        self.text_params(w)
        expert_params(self, w)
        w.add_vocab_size(self.find("vocab_size"))
        w.add_rope_dimension_count(self.find("hidden_size") // self.n_head)
        for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                         ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale),
                         ("shared_intermediate_size", w.add_expert_shared_feed_forward_length)):
            if v := self.hp.get(key):
                add(v)
        w.add_ssm_conv_kernel(self.mfind("conv_kernel", "d_conv"))
        w.add_ssm_state_size(self.mfind("state_size", "d_state", "state_dim", "ssm_state_size"))
        w.add_ssm_group_count(self.n_group)
        w.add_ssm_inner_size(self.d_inner)
        w.add_ssm_time_step_rank(self.mfind("n_heads", "num_heads"))
        if rope_dim := self.hp.get("attn_rotary_emb"):
            w.add_rope_dimension_count(rope_dim)
        with _overwriting():
            w.add_head_count_kv([self.n_kv if i in self.attn_layers else 0 for i in range(self.block_count)])
            w.add_rope_scaling_finetuned(use_rope)
            if not use_rope:
                w.add_context_length(2**20)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        n = int(self.find("vocab_size"))
        n = -(n // -8) * 8  # Mamba2's vocabulary padding, to 8 here
        if (self.dir / "tokenizer.model").is_file():
            vocab.sentencepiece(w, self.dir, n)
        elif (self.dir / "tokenizer.json").is_file():
            vocab.gpt2(w, self.dir, n, pre=self.vocab_pre)
        else:
            raise ConvertError(f"{self.dir}: no tokenizer.model or tokenizer.json")

    def rename(self, name: str) -> str | None:
        return Mamba2Converter.rename(self, name)

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        bid = block_id(name)
        if name.endswith(("block_sparse_moe.input_linear.weight", "shared_mlp.input_linear.weight")):
            shared = "shared_mlp" in name
            n_ff = int(self.find("shared_intermediate_size" if shared else "intermediate_size"))
            if t.shape[-2] != 2 * n_ff:
                raise ValueError(f"fused gate/up has {t.shape[-2]} rows, expected 2 x {n_ff}")
            gate, up = t.split(n_ff, dim=-2)
            kinds = ((MT.FFN_GATE_SHEXP, MT.FFN_UP_SHEXP) if self.has_experts else (MT.FFN_GATE, MT.FFN_UP)) \
                if shared else (MT.FFN_GATE_EXP, MT.FFN_UP_EXP)
            for kind, part in zip(kinds, (gate, up)):
                yield gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", part.contiguous()
            return
        if name.endswith("shared_mlp.output_linear.weight"):
            kind = MT.FFN_DOWN_SHEXP if self.has_experts else MT.FFN_DOWN
            yield gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", t
            return
        if bid in self.ssm_layers:
            yield from Mamba2Converter.transform(self, name, t)
            return
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, self.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, self.n_kv)
        yield self.map(name), t
