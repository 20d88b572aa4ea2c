"""Llama family (LlamaForCausalLM, MistralForCausalLM): llama.cpp's LlamaModel conversion."""
from __future__ import annotations

import math
from typing import Iterable

import gguf
import torch
from gguf import MODEL_TENSOR as MT

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half Q/K rows -> GGML's interleaved RoPE pairs (llama.cpp's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "LlamaModel")
class LlamaConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.LLAMA
    experts = False  # whether this converter stacks experts (MixtralConverter)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.experts and self.find("num_local_experts", default=None):
            raise ConvertError("mixture-of-experts Llama checkpoints are not supported")
        self.n_head = int(self.find("num_attention_heads", "n_heads"))
        self.n_kv = int(self.find("num_key_value_heads", "n_kv_heads", default=self.n_head))

    def head_dim(self) -> int:
        return self.hp.get("head_dim") or self.find("hidden_size") // self.n_head

    def set_params(self, w: gguf.GGUFWriter) -> None:
        self.text_params(w)
        w.add_vocab_size(self.find("vocab_size"))
        w.add_rope_dimension_count(self.head_dim())

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        cfg = vocab._json(self.dir / "tokenizer_config.json")
        if (prefix := cfg.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(prefix)
        if (self.dir / "tokenizer.model").is_file():
            vocab.sentencepiece(w, self.dir, self.find("vocab_size", default=None))
        elif not vocab.llama_hf(w, self.dir):
            vocab.gpt2(w, self.dir, self.find("vocab_size", default=None), pre=self.vocab_pre)

    def rename(self, name: str) -> str | None:
        if name.endswith(".rotary_emb.inv_freq"):
            return None
        name = name.replace("text_model.", "").replace("language_model.", "")
        return "model." + name if self.hp.get("architectures", [""])[0] == "LlamaModel" else name

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, self.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, self.n_kv)
        yield self.map(name), t

    def generated(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Llama 3 rope scaling: per-frequency factors in rope_freqs.weight."""
        rp = self.rope_parameters()
        if str(rp.get("rope_type", "")).lower() != "llama3":
            return
        dim, base = self.head_dim(), rp.get("rope_theta", 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
        old_ctx = rp.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = 1 / ((1 - smooth) / factor + smooth)
        f = torch.where(wavelen < old_ctx / hi, 1.0, torch.where(wavelen > old_ctx / lo, factor, mid))
        yield gguf.TENSOR_NAMES[MT.ROPE_FREQS] + ".weight", f.to(torch.float32)
