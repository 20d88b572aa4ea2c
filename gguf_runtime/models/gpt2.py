"""GPT-2: learned absolute positions, pre-LayerNorm with biases, fused QKV with bias, tanh GELU.

Reads llama.cpp's ``gpt2`` layout: ``token_embd``, ``position_embd`` (``context_length`` rows),
``blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}`` (weights and biases),
``output_norm`` (weight and bias), ``output`` (absent when tied, as GPT-2 checkpoints are).

The activation is HF's ``gelu_new`` (the tanh approximation), which llama.cpp's ``ggml_gelu`` also
computes; on the CPU llama.cpp reads it from an f16 table of that function (``GGML_GELU_FP16``), which
:func:`gguf_runtime.kernels.gelu_tanh` reproduces under ggml numerics (``--ggml-numerics``). No RoPE:
cached keys cannot be shifted, and a position past the table is a one-line error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..errors import BatchError
from ..gguf.hparams import HParams
from ..memory.kv_cache import KVCache, KVView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, LayerNorm, Linear


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_ff: int = 0
    norm_eps: float = 1e-5

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        hp.divides(n_head, n_embd, f"{n_head} heads for embedding length {n_embd}")
        if hp.int("attention.head_count_kv", n_head) != n_head:
            raise hp.fail(f"{hp.key('attention.head_count_kv')} must equal the head count for gpt2")
        return cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0], n_embd=n_embd, n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length"), n_head=n_head, n_ff=hp.int("feed_forward_length"),
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, lo=0.0),
        )


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        e = a.n_embd
        self.attn_norm = LayerNorm(e, a.norm_eps)
        self.attn_qkv = Linear(e, 3 * e, bias=True)
        self.attn_output = Linear(e, e, bias=True)
        self.ffn_norm = LayerNorm(e, a.norm_eps)
        self.ffn_up = Linear(e, a.n_ff, bias=True)
        self.ffn_down = Linear(a.n_ff, e, bias=True)
        self.head_dim = e // a.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def attention(self, x, kv):
        n, h, d = x.shape[0], self.args.n_head, self.head_dim
        q, k, v = (t.reshape(n, h, d) for t in self.attn_qkv(x).chunk(3, -1))
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def forward(self, x, kv):
        x = x + self.attention(self.attn_norm(x), kv)
        return x + self.ffn_down(kernels.gelu_tanh(self.ffn_up(self.ffn_norm(x))))


class Model(BaseModel):
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.position_embd = Embedding(args.n_ctx_train, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = LayerNorm(args.n_embd, args.norm_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> KVCache:
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        return KVCache(a.n_layer, n_ctx, n_seq_max, a.n_head, a.n_embd // a.n_head, dtype=tk, dtype_v=tv,
                       device=self.device)

    def forward(self, ub, view: KVView) -> torch.Tensor:
        if ub.n_tokens and int(ub.pos.max()) >= self.args.n_ctx_train:
            raise BatchError(f"position {int(ub.pos.max())} is past gpt2's {self.args.n_ctx_train} learned positions")
        x = self.token_embd(ub.tokens) + self.position_embd(ub.pos)
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il))
        return self.output_norm(x)
