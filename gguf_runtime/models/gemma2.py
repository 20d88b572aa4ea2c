"""Gemma 2: alternating sliding-window and global attention, soft-capped attention and output logits.

Reads llama.cpp's GGUF layout: ``token_embd`` (also the output: Gemma ties it), ``blk.N.{attn_norm,
attn_q,attn_k,attn_v,attn_output,post_attention_norm,ffn_norm,ffn_gate,ffn_up,ffn_down,
post_ffw_norm}``, ``output_norm``. llama.cpp's converter already adds Gemma's ``1 +`` to every norm
weight, so the norms are plain RMSNorms here.

The math, as llama.cpp's ``gemma2`` graph computes it:

- the embedding is scaled by ``sqrt(n_embd)``;
- each block is ``x + post_attention_norm(attn(attn_norm(x)))``, then the same with the FFN and
  ``post_ffw_norm``; the FFN is GELU-tanh(gate) * up (llama.cpp's GEGLU);
- NeoX RoPE; queries are scaled by ``1/sqrt(head_dim)`` (``1/sqrt(n_embd / n_head)`` for the 27B,
  which llama.cpp recognises by its 46 layers: the checkpoint's ``query_pre_attn_scalar`` is not in
  the GGUF); attention scores are soft-capped, ``c * tanh(s / c)`` with ``attn_logit_softcapping``;
- layers alternate sliding (even) and global (odd), or follow ``attention.sliding_window_pattern``;
  a sliding layer masks keys ``sliding_window`` or more positions behind the query (llama.cpp's
  ``is_masked_swa``, standard type);
- output logits are soft-capped with ``final_logit_softcapping``.

The memory is an iSWA cache (:class:`~gguf_runtime.memory.kv_iswa.KVCacheISWA`): the global
layers' keys in a full cache, the sliding layers' in one that keeps only what the window can see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..gguf.hparams import MAX_LAYERS, HParams
from ..memory.kv_iswa import ISWAView, KVCacheISWA
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, project


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    head_dim_v: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_base_swa: float = 10000.0
    window: int = 4096
    swa_layers: list[bool] = field(default_factory=list)  # True: the layer attends within the window
    attn_softcap: float = 50.0
    final_softcap: float = 30.0
    attn_scale: float = 0.0

    @classmethod
    def from_gguf(cls, hp: HParams) -> ModelArgs:
        n_embd, n_head, n_layer = hp.int("embedding_length"), hp.int("attention.head_count"), hp.n_layer()
        head_dim = hp.int("attention.key_length", n_embd // n_head)
        rope_base = hp.float("rope.freq_base", 10000.0, lo=1e-6)
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd,
            n_layer=n_layer,
            n_ctx_train=hp.int("context_length", 8192),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head),
            head_dim=head_dim,
            head_dim_v=hp.int("attention.value_length", head_dim),
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0),
            rope_base=rope_base,
            rope_base_swa=hp.float("rope.freq_base_swa", rope_base, lo=1e-6),
            window=hp.int("attention.sliding_window", 4096),
            swa_layers=swa_pattern(hp, n_layer, 2),
            attn_softcap=hp.float("attn_logit_softcapping", 50.0, lo=0.0),
            final_softcap=hp.float("final_logit_softcapping", 30.0, lo=0.0),
            # llama.cpp's rule (gemma_pytorch's config): the 27B (46 layers) scales by n_embd / n_head
            attn_scale=1.0 / math.sqrt(n_embd // n_head if n_layer == 46 else head_dim),
        )
        hp.divides(args.n_head_kv, args.n_head, f"{n_head} heads for {args.n_head_kv} KV heads")
        return args


def swa_pattern(hp: HParams, n_layer: int, period: int) -> list[bool]:
    """Which layers slide: ``attention.sliding_window_pattern`` as an array of booleans, or as a
    period ``p`` (every layer but each p-th slides: ``il % p < p - 1``), else llama.cpp's default
    period for the architecture."""
    v = hp.raw("attention.sliding_window_pattern", None)
    if isinstance(v, (list, tuple)):
        if len(v) != n_layer or not all(isinstance(x, bool) for x in v):
            raise hp.fail(f"{hp.key('attention.sliding_window_pattern')} must be {n_layer} booleans")
        return list(v)
    p = period if v is None else hp.int("attention.sliding_window_pattern", lo=0, hi=MAX_LAYERS)
    return [p == 0 or il % p < p - 1 for il in range(n_layer)]


class Block(nn.Module):
    def __init__(self, a: ModelArgs, sliding: bool):
        super().__init__()
        self.args, self.sliding = a, sliding
        e, h, hkv, d, dv = a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.head_dim_v
        self.attn_norm = RMSNorm(e, a.rms_eps)
        self.attn_q = Linear(e, h * d)
        self.attn_k = Linear(e, hkv * d)
        self.attn_v = Linear(e, hkv * dv)
        self.attn_output = Linear(h * dv, e)
        self.post_attention_norm = RMSNorm(e, a.rms_eps)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        self.ffn_gate = Linear(e, a.n_ff)
        self.ffn_up = Linear(e, a.n_ff)
        self.ffn_down = Linear(a.n_ff, e)
        self.post_ffw_norm = RMSNorm(e, a.rms_eps)
        self.window = a.window if sliding else 0

    def attention(self, x, pos, kv, rope):
        a, n = self.args, x.shape[0]
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = rope(q.view(n, a.n_head, a.head_dim), pos)
        k = rope(k.view(n, a.n_head_kv, a.head_dim), pos)
        v = v.view(n, a.n_head_kv, a.head_dim_v)
        o = kv.attend(q, k, v, scale=a.attn_scale, window=self.window, softcap=a.attn_softcap)
        return self.attn_output(o.reshape(n, -1))

    def ffn(self, x):
        return self.ffn_down(kernels.geglu(*project(x, self.ffn_gate, self.ffn_up)))

    def forward(self, x, pos, kv, rope):
        x = x + self.post_attention_norm(self.attention(self.attn_norm(x), pos, kv, rope))
        return x + self.post_ffw_norm(self.ffn(self.ffn_norm(x)))


class Model(BaseModel):
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args, s) for s in args.swa_layers)
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)
        self.embd_scale = math.sqrt(args.n_embd)

    def loaded(self, f) -> None:
        a = self.args
        base = {True: a.rope_base_swa, False: a.rope_base}
        self.rope_inv = {s: kernels.rope_freqs(a.head_dim, b)[0].to(self.device) for s, b in base.items()}
        self.rope_ggml = {s: (b, 1.0) for s, b in base.items()}

    def rope_for(self, il: int):
        s = self.args.swa_layers[il]
        inv, theta = self.rope_inv[s], self.rope_ggml[s]
        return lambda t, pos: kernels.rope(t, pos, inv, True, None, 1.0, theta)

    def rotate(self, il: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """K-shift: a NeoX rotation by the position delta at the layer's RoPE base."""
        return kernels.rope(k.to(self.dtype), delta, self.rope_inv[self.args.swa_layers[il]], True)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics, n_ubatch: int = 512) -> KVCacheISWA:
        """The iSWA cache; its sliding part is sized for ubatches of ``n_ubatch`` (llama.cpp's default
        -ub; larger ubatches are split to it). ``Context(swa_full=True)`` keeps every position."""
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        return KVCacheISWA(a.swa_layers, a.window, n_ctx, n_seq_max, n_ubatch, a.n_head_kv, a.head_dim,
                           a.head_dim_v, dtype=tk, dtype_v=tv, device=self.device, rotate=self.rotate)

    def forward(self, ub, view: ISWAView) -> torch.Tensor:
        x = self.token_embd(ub.tokens) * self.embd_scale
        for il, block in enumerate(self.blk):
            x = block(x, ub.pos, view.layer(il), self.rope_for(il))
        return self.output_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return kernels.softcap_(self.output(h).float(), self.args.final_softcap)  # a fresh tensor: in place
