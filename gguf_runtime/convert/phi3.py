"""Phi-3 (Phi3ForCausalLM): llama.cpp's Phi3MiniModel conversion.

The fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``), unpermuted (NeoX
RoPE). Its own metadata: no generic keys, ``rope.scaling.original_context_length``, a rope dimension
of ``partial_rotary_factor * n_embd / n_head``, ``attention.sliding_window`` 0 when the config has
none. Long-RoPE checkpoints add ``rope_factors_long/short`` tensors and an attention factor. The
vocabulary is Phi-3's own reading of ``tokenizer.model``: every added token in tokenizer_config.json
and tokenizer.json is user-defined, or control when flagged special; a GPT2Tokenizer (Phi-4) is BPE.
"""
from __future__ import annotations

import math
from typing import Iterable

import gguf
import torch
from gguf import MODEL_TENSOR as MT
from gguf import TokenType

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register


@register("Phi3ForCausalLM")
class Phi3Converter(ModelConverter):
    arch = gguf.MODEL_ARCH.PHI3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rp = self.rope_parameters()
        self.n_embd, self.n_head = int(self.find("hidden_size", "n_embd")), int(self.find("num_attention_heads", "n_head"))
        self.n_ctx = self.find("n_positions", "max_position_embeddings")
        self.orig_ctx = rp.get("original_max_position_embeddings")
        if self.orig_ctx is None:
            raise ConvertError(f"{self.dir / 'config.json'}: original_max_position_embeddings is not set")
        pct = rp.get("partial_rotary_factor", self.hp.get("partial_rotary_factor", 1.0))
        self.rope_dims = int(pct * self.n_embd) // self.n_head
        self.rp = rp

    def set_params(self, w: gguf.GGUFWriter) -> None:
        w.add_context_length(self.n_ctx)
        w.add_rope_scaling_orig_ctx_len(self.orig_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.find("intermediate_size"))
        w.add_block_count(self.block_count)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.find("num_key_value_heads", "n_head_kv"))
        w.add_layer_norm_rms_eps(self.find("rms_norm_eps"))
        w.add_rope_dimension_count(self.rope_dims)
        w.add_rope_freq_base(self.find_rope_theta())
        w.add_sliding_window(self.hp.get("sliding_window") or 0)  # 0 tells Phi-3 from Phi-4
        if (attn_factor := self._long_rope()[0]) is not None:
            w.add_rope_scaling_attn_factors(attn_factor)

    def find_rope_theta(self) -> float:
        if (theta := self.rp.get("rope_theta")) is None:
            raise ConvertError(f"{self.dir / 'config.json'}: rope_theta is not set")
        return theta

    def _long_rope(self) -> tuple[float | None, list | None, list | None]:
        """(attention factor, long factors, short factors) of a long-RoPE config, else Nones."""
        long, short = self.rp.get("long_factor"), self.rp.get("short_factor")
        if not long:
            return None, None, None
        scale, kind = self.n_ctx / self.orig_ctx, str(self.rp.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(self.orig_ctx)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise ConvertError(f"{self.dir / 'config.json'}: long_factor with rope type {kind or 'unset'!r} is not supported")
        if short is None or len(long) != len(short) or len(long) != self.rope_dims / 2:
            raise ConvertError(f"{self.dir / 'config.json'}: rope long/short factors must both have {self.rope_dims // 2} values")
        return attn, long, short

    def generated(self) -> Iterable[tuple[str, torch.Tensor]]:
        _, long, short = self._long_rope()
        if long:
            yield gguf.TENSOR_NAMES[MT.ROPE_FACTORS_LONG] + ".weight", torch.tensor(long, dtype=torch.float32)
            yield gguf.TENSOR_NAMES[MT.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(short, dtype=torch.float32)

    def rename(self, name: str) -> str | None:
        return None if name.endswith(".rotary_emb.inv_freq") else name

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        cfg = vocab._json(self.dir / "tokenizer_config.json")
        if cfg.get("tokenizer_class") == "GPT2Tokenizer":
            vocab.gpt2(w, self.dir, self.find("vocab_size", default=None), pre=self.vocab_pre)
            return
        from sentencepiece import SentencePieceProcessor

        path = self.dir / "tokenizer.model"
        if not path.is_file():
            raise ConvertError(f"{self.dir}: no tokenizer.model")
        sp = SentencePieceProcessor()
        try:
            sp.LoadFromFile(str(path))
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{path}: not a sentencepiece model ({e})") from None
        n = self.find("vocab_size", default=None) or sp.vocab_size()
        tokens = [f"[PAD{i}]".encode() for i in range(n)]
        scores, types = [-10000.0] * n, [TokenType.UNUSED] * n
        for i in range(min(n, sp.vocab_size())):
            tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
            types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                        else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
        added = [(text, i, False) for text, i in vocab._json(self.dir / "added_tokens.json").items() if i < n]
        added += [(d["content"], int(i), bool(d.get("special"))) for i, d in cfg.get("added_tokens_decoder", {}).items()]
        added += [(d["content"], int(d["id"]), bool(d.get("special")))
                  for d in vocab._json(self.dir / "tokenizer.json").get("added_tokens", [])]
        for text, i, special in added:
            if not 0 <= i < n:
                raise ConvertError(f"{self.dir}: added token {text!r} has id {i}, outside the vocabulary of {n}")
            tokens[i], scores[i] = text.encode(), -1000.0
            types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        vocab._special(w, self.dir, n_vocab=n)
