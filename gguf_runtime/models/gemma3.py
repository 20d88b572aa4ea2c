"""Gemma 3 (text): five sliding-window layers to one global, a local RoPE base, q/k RMS norms.

Reads llama.cpp's GGUF layout: ``token_embd`` (the output when ``output`` is absent), ``blk.N.{attn_norm,
attn_q,attn_q_norm,attn_k,attn_k_norm,attn_v,attn_output,post_attention_norm,ffn_norm,ffn_gate,ffn_up,
ffn_down,post_ffw_norm}``, ``output_norm``. llama.cpp's converter already adds Gemma's ``1 +`` to every
norm weight (q/k norms included), so the norms are plain RMSNorms here.

The math, as llama.cpp's ``gemma3`` graph computes it:

- the embedding is scaled by ``sqrt(n_embd)``;
- each block is ``x + post_attention_norm(attn(attn_norm(x)))``, then the same with the FFN and
  ``post_ffw_norm``; the FFN is GELU-tanh(gate) * up (llama.cpp's GEGLU);
- q and k are RMS-normed per head (``attn_q_norm``, ``attn_k_norm``), then NeoX-rotated: sliding
  layers at ``rope.freq_base_swa`` (default 10000, no scaling), global layers at ``rope.freq_base``
  with the file's RoPE scaling (linear for the larger models); queries are scaled by
  ``1/sqrt(head_dim)`` (``1/sqrt(n_embd / n_head)`` for the 27B, 62 layers, as llama.cpp);
- with ``attention.sliding_window`` set, every layer but each sixth slides (or as
  ``attention.sliding_window_pattern`` says); a sliding layer masks keys ``sliding_window`` or more
  positions behind the query (llama.cpp's ``is_masked_swa``, standard type); without it every
  layer is global;
- no attention soft-cap; the output is soft-capped only when ``final_logit_softcapping`` is set.

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
    rope_scaling: dict | None = None  # global layers only
    window: int = 0  # 0: no sliding layers
    swa_layers: list[bool] = field(default_factory=list)  # True: the layer attends within the window
    final_softcap: float = 0.0
    attn_scale: float = 0.0

    @classmethod
    def from_gguf(cls, hp: HParams) -> ModelArgs:
        n_embd, n_head, n_layer = hp.int("embedding_length"), hp.int("attention.head_count"), hp.n_layer()
        head_dim = hp.int("attention.key_length", n_embd // n_head)
        rope_base = hp.float("rope.freq_base", 1e6, lo=1e-6)
        window = hp.int("attention.sliding_window", 0, lo=0)
        scaling = None
        st = hp.str("rope.scaling.type", "none")
        if st != "none":
            scaling = {"type": st, "factor": hp.float("rope.scaling.factor", 1.0, lo=1e-6)}
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd,
            n_layer=n_layer,
            n_ctx_train=hp.int("context_length", 32768),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head),
            head_dim=head_dim,
            head_dim_v=hp.int("attention.value_length", head_dim),
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0),
            rope_base=rope_base,
            rope_base_swa=hp.float("rope.freq_base_swa", 10000.0, lo=1e-6),
            rope_scaling=scaling,
            window=window,
            swa_layers=swa_pattern(hp, n_layer, 6) if window else [False] * n_layer,
            final_softcap=hp.float("final_logit_softcapping", 0.0, lo=0.0),
            # llama.cpp's rule (gemma_pytorch's config): the 27B (62 layers) scales by n_embd / n_head
            attn_scale=1.0 / math.sqrt(n_embd // n_head if n_layer == 62 else head_dim),
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
        self.attn_q_norm = RMSNorm(d, a.rms_eps)
        self.attn_k = Linear(e, hkv * d)
        self.attn_k_norm = RMSNorm(d, a.rms_eps)
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
        q = rope(self.attn_q_norm(q.view(n, a.n_head, a.head_dim)), pos)
        k = rope(self.attn_k_norm(k.view(n, a.n_head_kv, a.head_dim)), pos)
        v = v.view(n, a.n_head_kv, a.head_dim_v)
        o = kv.attend(q, k, v, scale=a.attn_scale, window=self.window)
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
        inv_g, self.rope_mscale = kernels.rope_freqs(a.head_dim, a.rope_base, a.rope_scaling)
        self.rope_inv = {True: kernels.rope_freqs(a.head_dim, a.rope_base_swa)[0].to(self.device),
                         False: inv_g.to(self.device)}
        kind = (a.rope_scaling or {}).get("type") or "none"  # ggml's angle recurrence, for ggml numerics
        scale = {"none": 1.0, "linear": 1.0 / (a.rope_scaling or {}).get("factor", 1.0)}.get(kind)
        self.rope_ggml = {True: (a.rope_base_swa, 1.0), False: None if scale is None else (a.rope_base, scale)}

    def rope_for(self, il: int):
        s = self.args.swa_layers[il]
        inv, theta = self.rope_inv[s], self.rope_ggml[s]
        mscale = 1.0 if s else self.rope_mscale
        return lambda t, pos: kernels.rope(t, pos, inv, True, None, mscale, theta)

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
