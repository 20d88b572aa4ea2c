"""Mamba and Mamba2, in the Hugging Face layout and in the original state-spaces layout.

state-spaces checkpoints (``pytorch_model.bin`` and a config with ``d_model``, ``n_layer``,
``ssm_cfg``, ...) carry no SSM sizes: missing values take llama.cpp's hardcoded defaults
(Mamba: d_conv 4, d_inner 2 d_model, d_state 16, dt_rank ceil(d_model / 16), eps 1e-5; Mamba2:
d_state 128, head_dim 64, expand 2, n_groups 1); values in ``ssm_cfg`` are honoured.
"""
from __future__ import annotations

from typing import Iterable

import gguf
import torch
from gguf import MODEL_TENSOR as MT

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register


class _SSM(ModelConverter):
    pad_multiple = 8

    def __init__(self, model_dir, hparams, ckpt):
        # state-spaces keeps its sizes (if any) in ssm_cfg; "auto" means the default
        hparams = {k: v for k, v in {**(hparams.get("ssm_cfg") or {}), **hparams}.items() if v != "auto"}
        super().__init__(model_dir, hparams, ckpt)
        self.d_model = int(self.find("hidden_size", "d_model", "dim"))
        n, pad = int(self.find("vocab_size")), int(self.hp.get("pad_vocab_size_multiple", self.pad_multiple))
        self.vocab_size = -(n // -pad) * pad

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        first = ("tokenizer.json", "tokenizer.model") if self.arch == gguf.MODEL_ARCH.MAMBA else ("tokenizer.model", "tokenizer.json")
        found = next((f for f in first if (self.dir / f).is_file()), None)
        if found is None:
            raise ConvertError(f"{self.dir}: no tokenizer.json or tokenizer.model (state-spaces models use "
                               "the GPT-NeoX tokenizer: copy its tokenizer.json into the folder)")
        if found == "tokenizer.model":
            vocab.sentencepiece(w, self.dir, self.vocab_size)
        else:
            vocab.gpt2(w, self.dir, self.vocab_size)

    def ssm_common(self, w: gguf.GGUFWriter, d_conv: int, d_inner: int, d_state: int, dt_rank: int) -> None:
        w.add_context_length(2**20)  # llama.cpp's arbitrary value
        w.add_embedding_length(self.d_model)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(self.block_count)
        w.add_ssm_conv_kernel(d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(d_state)
        w.add_ssm_time_step_rank(dt_rank)


@register("MambaForCausalLM", "MambaLMHeadModel", "FalconMambaForCausalLM")
class MambaConverter(_SSM):
    arch = gguf.MODEL_ARCH.MAMBA

    def set_params(self, w: gguf.GGUFWriter) -> None:
        d_inner = self.find("intermediate_size", "d_inner", default=None) or 2 * self.d_model
        if d_inner != 2 * self.d_model:
            raise ConvertError(f"Mamba with d_inner {d_inner} != 2 * d_model {self.d_model} is not supported")
        self.ssm_common(w, self.find("conv_kernel", "d_conv", default=None) or 4, d_inner,
                        self.find("state_size", "d_state", default=None) or 16,
                        self.find("time_step_rank", "dt_rank", default=None) or -(self.d_model // -16))
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-5)
        w.add_ssm_dt_b_c_rms(self.hp.get("model_type") == "falcon_mamba")

    def drop(self, name: str, new: str) -> bool:
        """The output is left out when it equals the token embedding (tied)."""
        if not self.is_tensor(new, MT.OUTPUT):
            return False
        embd = next((n for n in self.ckpt.names() if self.is_tensor(self.tmap.get_name(n, (".weight",)) or "", MT.TOKEN_EMBD)), None)
        return embd is not None and torch.equal(self.ckpt.load(embd), self.ckpt.load(name))

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        new = self.map(name)
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        if self.is_tensor(new, MT.SSM_CONV1D):  # (d_inner, 1, d_conv) -> (d_inner, d_conv)
            t = t.squeeze()
        yield new, t


@register("Mamba2ForCausalLM")
class Mamba2Converter(_SSM):
    arch = gguf.MODEL_ARCH.MAMBA2
    pad_multiple = 16

    def __init__(self, model_dir, hparams, ckpt):
        super().__init__(model_dir, hparams, ckpt)
        self.expand = self.find("mamba_expand", "expand", default=None) or 2
        self.d_inner = self.find("mamba_d_ssm", "intermediate_size", "d_inner", default=None) or self.expand * self.d_model
        self.n_group = self.find("n_groups", "ngroups", default=None) or 1

    def set_params(self, w: gguf.GGUFWriter) -> None:
        head_dim = self.find("mamba_d_head", "head_dim", "headdim", default=None) or 64
        if self.d_inner != self.expand * self.d_model or self.d_inner % head_dim:
            raise ConvertError(f"inconsistent Mamba2 sizes: d_inner {self.d_inner}, expand {self.expand}, "
                               f"d_model {self.d_model}, head_dim {head_dim}")
        self.ssm_common(w, self.find("conv_kernel", "d_conv", default=None) or 4, self.d_inner,
                        self.find("state_size", "d_state", default=None) or 128, self.d_inner // head_dim)
        w.add_ssm_group_count(self.n_group)
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon", "rms_norm_eps", default=None) or 1e-5)

    def rename(self, name: str) -> str | None:
        if name.startswith(("model.backbone", "model.lm_head")):
            name = name.removeprefix("model.")
        return name.removesuffix(".dt_bias") + ".dt_proj.bias" if name.endswith(".dt_bias") else name

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        new = self.map(name)
        if self.is_tensor(new, MT.SSM_CONV1D):
            t = t.squeeze()
        elif self.is_tensor(new, MT.SSM_A, "") or self.is_tensor(new, MT.SSM_D, ""):
            t = t.reshape(*t.shape, 1)  # like Mamba-1's shapes
        elif self.is_tensor(new, MT.SSM_NORM):
            t = t.reshape(self.n_group, self.d_inner // self.n_group)
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        yield new, t
