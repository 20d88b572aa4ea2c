"""Qwen3 (dense): the llama block with RMS norms on each head of Q and K before RoPE, NeoX RoPE.

Reads llama.cpp's ``qwen3`` layout: ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
attn_q_norm, attn_k_norm, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm``,
``output`` (absent when tied). The head size is ``qwen3.attention.key_length`` (Qwen3's heads are
wider than ``n_embd / n_head``). Qwen3-Embedding checkpoints are this architecture, used with
``--pooling last``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..kernels.rope import Rotary
from ..gguf.hparams import HParams
from ..memory.kv_cache import KVCache, KVView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, project


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-6
    rope_base: float = 1e6
    rope_scaling: dict | None = None

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        head_dim = hp.int("attention.key_length", n_embd // n_head)
        if hp.int("attention.value_length", head_dim) != head_dim:
            raise hp.fail(f"{hp.key('attention.value_length')} must equal {hp.key('attention.key_length')} = {head_dim}")
        st = hp.str("rope.scaling.type", "none")
        scaling = None if st == "none" else {
            "type": st, "factor": hp.float("rope.scaling.factor", 1.0, lo=1e-6),
            "original_context_length": hp.int("rope.scaling.original_context_length", 0, lo=0),
            "attn_factor": hp.float("rope.scaling.attn_factor", 1.0),
            "beta_fast": hp.float("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": hp.float("rope.scaling.yarn_beta_slow", 1.0)}
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0], n_embd=n_embd, n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length", 40960),
            n_head=n_head, n_head_kv=hp.int("attention.head_count_kv", n_head), head_dim=head_dim,
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0),
            rope_base=hp.float("rope.freq_base", 1e6, lo=1e-6), rope_scaling=scaling,
            pooling=_POOLING.get(hp.int("pooling_type", 0, lo=0, hi=4), "none"),
        )
        hp.int("rope.dimension_count", head_dim, lo=head_dim, hi=head_dim)  # RoPE covers the whole head
        hp.divides(args.n_head_kv, args.n_head, f"{n_head} heads for {args.n_head_kv} KV heads")
        return args


_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama.cpp's enum llama_pooling_type


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        e, h, hkv, d = a.n_embd, a.n_head, a.n_head_kv, a.head_dim
        self.attn_norm = RMSNorm(e, a.rms_eps)
        self.attn_q = Linear(e, h * d)
        self.attn_k = Linear(e, hkv * d)
        self.attn_v = Linear(e, hkv * d)
        self.attn_q_norm = RMSNorm(d, a.rms_eps)
        self.attn_k_norm = RMSNorm(d, a.rms_eps)
        self.attn_output = Linear(h * d, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        self.ffn_gate = Linear(e, a.n_ff)
        self.ffn_up = Linear(e, a.n_ff)
        self.ffn_down = Linear(a.n_ff, e)
        self.scale = 1.0 / math.sqrt(d)

    def attention(self, x, pos, kv, rope):
        a, n = self.args, x.shape[0]
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = rope(self.attn_q_norm(q.view(n, a.n_head, a.head_dim)), pos)
        k = rope(self.attn_k_norm(k.view(n, a.n_head_kv, a.head_dim)), pos)
        v = v.view(n, a.n_head_kv, a.head_dim)
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def forward(self, x, pos, kv, rope):
        x = x + self.attention(self.attn_norm(x), pos, kv, rope)
        h = self.ffn_norm(x)
        return x + self.ffn_down(kernels.swiglu(*project(h, self.ffn_gate, self.ffn_up)))


class Model(BaseModel):
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def loaded(self, f) -> None:
        a = self.args
        self.rope = Rotary(a.head_dim, a.rope_base, a.rope_scaling, True, device=self.device)  # NeoX pairs

    def rotate(self, il: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.rope.shift(k.to(self.dtype), delta)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> KVCache:
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        return KVCache(a.n_layer, n_ctx, n_seq_max, a.n_head_kv, a.head_dim, dtype=tk, dtype_v=tv,
                       device=self.device, rotate=self.rotate)

    def forward(self, ub, view: KVView) -> torch.Tensor:
        x = self.token_embd(ub.tokens)
        for il, block in enumerate(self.blk):
            x = block(x, ub.pos, view.layer(il), self.rope)
        return self.output_norm(x)
