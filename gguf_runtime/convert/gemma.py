"""Gemma 2 and Gemma 3 (Gemma2ForCausalLM, Gemma3ForCausalLM): llama.cpp's Gemma2Model and
Gemma3Model conversions.

Gemma's RMSNorm multiplies by ``1 + w``: every ``*norm.weight`` (Gemma 3's q/k norms included) is
written as ``w + 1``. No Q/K permutation (NeoX RoPE). Gemma 2: its own keys (soft-caps, window),
``lm_head`` dropped (tied). Gemma 3: the generic keys with Gemma 3's defaults, ``rope.freq_base_swa``
for the sliding layers, the token embedding cut to the tokenizer's vocabulary. Both write
``add_space_prefix = false`` after a sentencepiece vocabulary.
"""
from __future__ import annotations

from typing import Iterable

import gguf
import torch

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register


class _Gemma(ModelConverter):
    def rename(self, name: str) -> str | None:
        return None if name.endswith(".rotary_emb.inv_freq") else name.replace("language_model.", "")

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.endswith("norm.weight"):
            t = t + 1  # in the checkpoint's float type (f16 stays f16), as llama.cpp does
        yield self.map(name), t

    def sentencepiece(self, w: gguf.GGUFWriter) -> None:
        vocab.sentencepiece(w, self.dir, self.find("vocab_size", default=None))
        w.add_add_space_prefix(False)


@register("Gemma2ForCausalLM")
class Gemma2Converter(_Gemma):
    arch = gguf.MODEL_ARCH.GEMMA2

    def set_params(self, w: gguf.GGUFWriter) -> None:
        head_dim = self.find("head_dim")
        w.add_context_length(self.find("max_position_embeddings"))
        w.add_embedding_length(self.find("hidden_size"))
        w.add_block_count(self.block_count)
        w.add_feed_forward_length(self.find("intermediate_size"))
        w.add_head_count(self.find("num_attention_heads"))
        w.add_head_count_kv(self.find("num_key_value_heads", "num_attention_heads"))
        w.add_layer_norm_rms_eps(self.find("rms_norm_eps"))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_attn_logit_softcapping(self.find("attn_logit_softcapping"))
        w.add_final_logit_softcapping(self.find("final_logit_softcapping"))
        w.add_sliding_window(self.find("sliding_window"))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        self.sentencepiece(w)

    def rename(self, name: str) -> str | None:
        return None if name == "lm_head.weight" else super().rename(name)  # unused by llama.cpp


@register("Gemma3ForCausalLM")
class Gemma3Converter(_Gemma):
    arch = gguf.MODEL_ARCH.GEMMA3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Gemma 3's defaults for what a config may leave out (llama.cpp's Gemma3Model)
        for key, value in (("max_position_embeddings", 131072), ("num_attention_heads", 8), ("rms_norm_eps", 1e-6),
                           ("head_dim", 256), ("num_key_value_heads", 4)):
            if self.hp.get(key) is None:
                self.hp[key] = value
        if self.rope_parameters().get("rope_theta") is None:
            self.hp["rope_theta"] = 1_000_000.0

    def set_params(self, w: gguf.GGUFWriter) -> None:
        self.text_params(w)
        rp = dict(self.hp.get("rope_parameters") or self.hp.get("rope_scaling") or {})
        local = (rp.get("sliding_attention") or {}).get("rope_theta")
        if local is None and "full_attention" not in rp:
            local = self.find("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                              "rope_local_base_freq", default=None)
        if local is not None:
            w.add_rope_freq_base_swa(local)
        if self.hp.get("attn_logit_softcapping") is not None:
            raise ConvertError(f"{self.dir / 'config.json'}: attn_logit_softcapping is set, but Gemma 3 has none")
        if softcap := self.hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(softcap)
        if self.hp.get("sliding_window_pattern") != 1:
            w.add_sliding_window(self.find("sliding_window"))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        if (self.dir / "tokenizer.model").is_file():
            self.sentencepiece(w)
        else:
            vocab.gpt2(w, self.dir, self.find("vocab_size", default=None), pre=self.vocab_pre)

    def n_vocab(self) -> int:
        """The tokenizer's vocabulary size: rows of the embedding beyond it are dropped."""
        if (self.dir / "tokenizer.model").is_file():
            if (n := self.find("vocab_size", default=None)) is not None:
                return n
            from sentencepiece import SentencePieceProcessor

            return SentencePieceProcessor(model_file=str(self.dir / "tokenizer.model")).vocab_size()
        spec = vocab._json(self.dir / "tokenizer.json")
        return len((spec.get("model") or {}).get("vocab") or {}) + len(spec.get("added_tokens") or [])

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if "embed_tokens.weight" in name:
            t = t[:self.n_vocab()]
        yield from super().transform(name, t)
