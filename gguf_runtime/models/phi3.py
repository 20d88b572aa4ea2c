"""Phi-3 / Phi-3.5 / Phi-4-mini: RMSNorm, fused QKV, fused gate-up SwiGLU, NeoX RoPE with long-RoPE factors.

Reads llama.cpp's ``phi3`` layout: ``token_embd``, ``blk.N.{attn_norm, attn_qkv (or attn_q, attn_k,
attn_v), attn_output, ffn_norm, ffn_up, ffn_down}``, ``output_norm``, ``output``, and for long-context
checkpoints ``rope_factors_long`` / ``rope_factors_short`` (per-pair frequency divisors).

- ``attn_qkv`` rows are Q (``n_head * d``), then K and V (``n_head_kv * d`` each);
- ``ffn_up`` is ``2 * n_ff`` rows: the first half is the gate (SiLU), the second the up projection;
- long RoPE: as llama.cpp, the factor set follows the context, not the sequence: ``long`` when each
  sequence's share of the context (``n_ctx / n_seq_max``) exceeds ``rope.scaling.original_context_length``,
  else ``short``; cos/sin are scaled by ``rope.scaling.attn_factor`` (1 when absent);
- ``phi3.attention.sliding_window`` is read but not applied: llama.cpp disables Phi-3's window (its
  converters write the training window for every layer), so results match llama.cpp's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..gguf.hparams import HParams
from ..memory.kv_cache import KVCache, KVView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-5
    rope_dim: int = 0
    rope_base: float = 10000.0
    rope_attn_factor: float = 1.0
    n_ctx_orig: int = 0  # long RoPE factors apply above this context per sequence
    sliding_window: int = 0  # read, not applied (see the module docstring)
    fused_qkv: bool = True

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        hp.divides(n_head, n_embd, f"{n_head} heads for embedding length {n_embd}")
        head_dim = n_embd // n_head
        n_ctx_train = hp.int("context_length", 4096)
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0], n_embd=n_embd, n_layer=hp.n_layer(),
            n_ctx_train=n_ctx_train, n_head=n_head, n_head_kv=hp.int("attention.head_count_kv", n_head),
            head_dim=head_dim, n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
            rope_dim=hp.int("rope.dimension_count", head_dim, lo=2, hi=head_dim),
            rope_base=hp.float("rope.freq_base", 10000.0, lo=1e-6),
            rope_attn_factor=hp.float("rope.scaling.attn_factor", 1.0, lo=0.0),
            n_ctx_orig=hp.int("rope.scaling.original_context_length", n_ctx_train),
            sliding_window=hp.int("attention.sliding_window", 0, lo=0),
            fused_qkv=hp.has_tensor("blk.0.attn_qkv.weight"),
        )
        if hp.str("rope.scaling.type", "none") not in ("none", "longrope"):
            raise hp.fail(f"{hp.key('rope.scaling.type')} = {hp.str('rope.scaling.type')!r} is not supported for phi3")
        hp.divides(args.n_head_kv, args.n_head, f"{n_head} heads for {args.n_head_kv} KV heads")
        return args


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        e, h, hkv, d = a.n_embd, a.n_head, a.n_head_kv, a.head_dim
        self.attn_norm = RMSNorm(e, a.rms_eps)
        if a.fused_qkv:
            self.attn_qkv = Linear(e, (h + 2 * hkv) * d)
        else:
            self.attn_q = Linear(e, h * d)
            self.attn_k = Linear(e, hkv * d)
            self.attn_v = Linear(e, hkv * d)
        self.attn_output = Linear(h * d, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        self.ffn_up = Linear(e, 2 * a.n_ff)  # gate and up, stacked
        self.ffn_down = Linear(a.n_ff, e)
        self.scale = 1.0 / math.sqrt(d)

    def qkv(self, x):
        a = self.args
        if not a.fused_qkv:
            return self.attn_q(x), self.attn_k(x), self.attn_v(x)
        return self.attn_qkv(x).split([a.n_head * a.head_dim, a.n_head_kv * a.head_dim, a.n_head_kv * a.head_dim], -1)

    def attention(self, x, pos, kv, rope):
        a, n = self.args, x.shape[0]
        q, k, v = self.qkv(x)
        q = rope(q.reshape(n, a.n_head, a.head_dim), pos)
        k = rope(k.reshape(n, a.n_head_kv, a.head_dim), pos)
        v = v.reshape(n, a.n_head_kv, a.head_dim)
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def ffn(self, x):
        gate, up = self.ffn_up(x).chunk(2, -1)
        return self.ffn_down(kernels.swiglu(gate, up))

    def forward(self, x, pos, kv, rope):
        x = x + self.attention(self.attn_norm(x), pos, kv, rope)
        return x + self.ffn(self.ffn_norm(x))


class Model(BaseModel):
    Args = ModelArgs
    optional = frozenset({"rope_factors_long", "rope_factors_short"})

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)
        self.rope_factors_long = Weights(weight=(args.rope_dim // 2,))
        self.rope_factors_short = Weights(weight=(args.rope_dim // 2,))

    def loaded(self, f) -> None:
        a = self.args
        inv, _ = kernels.rope_freqs(a.rope_dim, a.rope_base)
        self.rope_inv = inv.to(self.device)

    def rope_factors(self, n_ctx: int, n_seq_max: int) -> torch.Tensor | None:
        """llama.cpp's choice of long-RoPE factors for a context of ``n_ctx`` cells shared by
        ``n_seq_max`` sequences (``None``: the file has none)."""
        w = (self.rope_factors_long if n_ctx // max(1, n_seq_max) > self.args.n_ctx_orig else self.rope_factors_short).weight
        return None if w is None else w.float()

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> KVCache:
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        ff = self.rope_factors(n_ctx, n_seq_max)

        def rotate(il: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            return kernels.rope(k.to(self.dtype), delta, self.rope_inv, True, ff)

        return KVCache(a.n_layer, n_ctx, n_seq_max, a.n_head_kv, a.head_dim, dtype=tk, dtype_v=tv,
                       device=self.device, rotate=rotate)

    def forward(self, ub, view: KVView) -> torch.Tensor:
        a = self.args
        ff = self.rope_factors(view.cache.n_ctx, view.cache.n_seq_max)
        ggml_theta = (a.rope_base, 1.0)

        def rope(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return kernels.rope(t, pos, self.rope_inv, True, ff, a.rope_attn_factor, ggml_theta)

        x = self.token_embd(ub.tokens)
        for il, block in enumerate(self.blk):
            x = block(x, ub.pos, view.layer(il), rope)
        return self.output_norm(x)
