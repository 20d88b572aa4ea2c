"""Llama family (llama, SmolLM2, Mistral-style GQA): RMSNorm, RoPE, GQA attention, SwiGLU.

Reads llama.cpp's GGUF layout: ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
ffn_norm,ffn_gate,ffn_up,ffn_down}``, ``output_norm``, ``output`` (absent when tied), optional
``rope_freqs`` (llama3 frequency factors). llama.cpp's converter permutes Q/K for the 'normal'
(adjacent-pair) RoPE, so that is the rotation used here.

Mixture-of-experts files (Mixtral: ``llama.expert_count`` > 0) carry ``ffn_gate_inp`` and
``ffn_{gate,up,down}_exps`` instead of the dense FFN: top-k softmax routing with the weights
renormalised, as llama.cpp's llama graph (:func:`.moe.moe_ffn`).
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
from .layers import Embedding, Linear, RMSNorm, Weights, project
from .moe import Experts, moe_ffn


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-5
    rope_dim: int = 0
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    n_expert: int = 0  # Mixtral-style experts (0: a dense FFN)
    n_expert_used: int = 0
    expert_weights_scale: float = 0.0

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        head_dim = hp.int("attention.key_length", n_embd // n_head)
        scaling = None
        st = hp.str("rope.scaling.type", "none")
        if st != "none":
            scaling = {"type": st, "factor": hp.float("rope.scaling.factor", 1.0, lo=1e-6),
                       "original_context_length": hp.int("rope.scaling.original_context_length", 0, lo=0),
                       "attn_factor": hp.float("rope.scaling.attn_factor", 1.0),
                       "beta_fast": hp.float("rope.scaling.yarn_beta_fast", 32.0),
                       "beta_slow": hp.float("rope.scaling.yarn_beta_slow", 1.0)}
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd,
            n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length", 2048),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
            rope_dim=hp.int("rope.dimension_count", head_dim, hi=head_dim),
            rope_base=hp.float("rope.freq_base", 10000.0, lo=1e-6),
            rope_scaling=scaling,
            n_expert=hp.int("expert_count", 0, lo=0, hi=4096),
            n_expert_used=hp.int("expert_used_count", 0, lo=0, hi=4096),
            expert_weights_scale=hp.float("expert_weights_scale", 0.0),
        )
        if args.n_expert and not 0 < args.n_expert_used <= args.n_expert:
            raise hp.fail(f"llama.expert_used_count = {args.n_expert_used} must be in [1, {args.n_expert}]")
        hp.divides(args.n_head_kv, args.n_head, f"{n_head} heads for {args.n_head_kv} KV heads")
        return args


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        e, h, hkv, d = a.n_embd, a.n_head, a.n_head_kv, a.head_dim
        self.attn_norm = RMSNorm(e, a.rms_eps)
        self.attn_q = Linear(e, h * d)
        self.attn_k = Linear(e, hkv * d)
        self.attn_v = Linear(e, hkv * d)
        self.attn_output = Linear(h * d, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        if a.n_expert:
            self.ffn_gate_inp = Linear(e, a.n_expert)
            self.ffn_gate_exps = Experts(a.n_expert, e, a.n_ff)
            self.ffn_up_exps = Experts(a.n_expert, e, a.n_ff)
            self.ffn_down_exps = Experts(a.n_expert, a.n_ff, e)
        else:
            self.ffn_gate = Linear(e, a.n_ff)
            self.ffn_up = Linear(e, a.n_ff)
            self.ffn_down = Linear(a.n_ff, e)
        self.scale = 1.0 / math.sqrt(d)

    def attention(self, x, pos, kv, rope):
        a, n = self.args, x.shape[0]
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = rope(q.view(n, a.n_head, a.head_dim), pos)
        k = rope(k.view(n, a.n_head_kv, a.head_dim), pos)
        v = v.view(n, a.n_head_kv, a.head_dim)
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def ffn(self, x):
        a = self.args
        if a.n_expert:
            return moe_ffn(x, self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps,
                           a.n_expert_used, norm_w=True, w_scale=a.expert_weights_scale)
        return self.ffn_down(kernels.swiglu(*project(x, self.ffn_gate, self.ffn_up)))

    def forward(self, x, pos, kv, rope):
        x = x + self.attention(self.attn_norm(x), pos, kv, rope)
        return x + self.ffn(self.ffn_norm(x))


class Model(BaseModel):
    Args = ModelArgs
    optional = frozenset({"rope_freqs"})

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)
        self.rope_freqs = Weights(weight=(args.rope_dim // 2,))  # llama3 frequency divisors, when present

    def loaded(self, f) -> None:
        a, ff = self.args, self.rope_freqs.weight
        self.rope = Rotary(a.rope_dim, a.rope_base, a.rope_scaling, False, None if ff is None else ff.float(), self.device)

    def rotate(self, il: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """K-shift: a rotation by the position delta."""
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
