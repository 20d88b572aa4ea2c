"""Llama family (llama, SmolLM2, Mistral-style GQA): RMSNorm, RoPE, GQA attention, SwiGLU.

Reads llama.cpp's GGUF layout: ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
ffn_norm,ffn_gate,ffn_up,ffn_down}``, ``output_norm``, ``output`` (absent when tied), optional
``rope_freqs`` (llama3 frequency factors). llama.cpp's converter permutes Q/K for the 'normal'
(adjacent-pair) RoPE, so that is the rotation used here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ggml_numerics, ops
from ..memory.kv_cache import KVCache, KVView
from ..reader import GGUFFile
from . import build


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    rope_dim: int
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    n_ctx_train: int = 2048
    tied: bool = False
    rope_neox: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        a = f.arch
        g = lambda k, d=None: f.get(f"{a}.{k}", d)  # noqa: E731
        n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
        head_dim = int(g("attention.key_length", n_embd // n_head))
        scaling = None
        st = g("rope.scaling.type")
        if st and st != "none":
            scaling = {"type": st, "factor": float(g("rope.scaling.factor", 1.0)),
                       "original_context_length": int(g("rope.scaling.original_context_length", 0) or 0),
                       "attn_factor": float(g("rope.scaling.attn_factor", 1.0)),
                       "beta_fast": float(g("rope.scaling.yarn_beta_fast", 32.0)),
                       "beta_slow": float(g("rope.scaling.yarn_beta_slow", 1.0))}
        return cls(
            n_vocab=int(f.tensor_infos["token_embd.weight"].shape[0]),
            n_embd=n_embd,
            n_layer=int(g("block_count")),
            n_head=n_head,
            n_head_kv=int(g("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(g("feed_forward_length")),
            rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_dim=int(g("rope.dimension_count", head_dim)),
            rope_base=float(g("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            n_ctx_train=int(g("context_length", 2048)),
            tied="output.weight" not in f.tensor_infos,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, hkv, d, e = args.n_head, args.n_head_kv, args.head_dim, args.n_embd
        self.wq = nn.Parameter(torch.empty(h * d, e), requires_grad=False)
        self.wk = nn.Parameter(torch.empty(hkv * d, e), requires_grad=False)
        self.wv = nn.Parameter(torch.empty(hkv * d, e), requires_grad=False)
        self.wo = nn.Parameter(torch.empty(e, h * d), requires_grad=False)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x, pos, layer: int, view: KVView, rope):
        a = self.args
        n = x.shape[0]
        q = ops.linear(x, self.wq).view(n, a.n_head, a.head_dim)
        k = ops.linear(x, self.wk).view(n, a.n_head_kv, a.head_dim)
        v = ops.linear(x, self.wv).view(n, a.n_head_kv, a.head_dim)
        q, k = rope(q, pos), rope(k, pos)
        view.store(layer, k, v)
        out = q.new_empty(n, a.n_head, a.head_dim)
        for b in view.batches(x.device):  # groups of equal shape, computed together
            kk, vv = view.kv(layer, b)
            qq = q.index_select(0, b.q_idx).view(b.n, -1, a.n_head, a.head_dim).transpose(1, 2)
            kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            out.index_copy_(0, b.q_idx, ops.attention(qq, kk, vv, b.mask, self.scale).reshape(-1, a.n_head, a.head_dim))
        return ops.linear(out.reshape(n, -1), self.wo)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(args.n_ff, args.n_embd), requires_grad=False)
        self.up = nn.Parameter(torch.empty(args.n_ff, args.n_embd), requires_grad=False)
        self.down = nn.Parameter(torch.empty(args.n_embd, args.n_ff), requires_grad=False)

    def forward(self, x):
        return ops.linear(ops.silu(ops.linear(x, self.gate)) * ops.linear(x, self.up), self.down)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.attn_norm = nn.Parameter(torch.empty(args.n_embd), requires_grad=False)
        self.ffn_norm = nn.Parameter(torch.empty(args.n_embd), requires_grad=False)
        self.attn = Attention(args)
        self.mlp = MLP(args)

    def forward(self, x, pos, layer, view, rope):
        eps = self.args.rms_eps
        x = x + self.attn(ops.rms_norm(x, self.attn_norm, eps), pos, layer, view, rope)
        return x + self.mlp(ops.rms_norm(x, self.ffn_norm, eps))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embd = nn.Parameter(torch.empty(args.n_vocab, args.n_embd), requires_grad=False)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = nn.Parameter(torch.empty(args.n_embd), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(args.n_vocab, args.n_embd), requires_grad=False)
        self.rope_inv, self.rope_mscale = ops.rope_freqs(args.rope_dim, args.rope_base, args.rope_scaling)
        self.rope_ggml = None  # (base, freq_scale) for ggml_numerics, set by from_gguf
        self.freq_factors = None

    # -- weights ---------------------------------------------------------------------------------
    _NAMES = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk",
              "attn_v": "attn.wv", "attn_output": "attn.wo", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
              "ffn_down": "mlp.down"}

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GGUF tensor names -> parameter names; tied output reuses the embedding."""
        out = {}
        for name, t in weights.items():
            base = name.removesuffix(".weight")
            if base == "token_embd":
                out["tok_embd"] = t
            elif base == "output_norm":
                out["norm"] = t
            elif base == "output":
                out["lm_head"] = t
            elif base == "rope_freqs":
                out["freq_factors"] = t
            elif base.startswith("blk."):
                _, i, kind = base.split(".", 2)
                if kind in cls._NAMES:
                    out[f"layers.{i}.{cls._NAMES[kind]}"] = t
        if "lm_head" not in out:
            out["lm_head"] = out["tok_embd"]
        return out

    @classmethod
    def from_gguf(cls, f: GGUFFile, device=None, dtype=torch.float32) -> "Model":
        args = ModelArgs.from_gguf(f)
        model, weights = build(cls, args, f, device, dtype)
        inv, model.rope_mscale = ops.rope_freqs(args.rope_dim, args.rope_base, args.rope_scaling)
        kind = (args.rope_scaling or {}).get("type") or "none"  # ggml's angle recurrence, for ggml_numerics
        scale = {"none": 1.0, "linear": 1.0 / (args.rope_scaling or {}).get("factor", 1.0)}.get(kind)
        model.rope_ggml = None if scale is None else (args.rope_base, scale)
        model.rope_inv = inv.to(model.device)
        freq = weights.get("freq_factors")
        model.freq_factors = None if freq is None else freq.float()
        return model

    # -- memory ----------------------------------------------------------------------------------
    def make_cache(self, n_ctx: int, n_seq_max: int = 1, dtype=None) -> KVCache:
        """The KV cache, in the compute dtype unless ``dtype`` or the model's ``cache_types`` (K, V
        dtypes, as ``-ctk``/``-ctv`` set them) say otherwise."""
        a = self.args
        tk, tv = getattr(self, "cache_types", (None, None))
        if ggml_numerics.is_enabled():  # llama.cpp's default -ctk/-ctv f16
            tk, tv = tk or torch.float16, tv or torch.float16
        return KVCache(a.n_layer, n_ctx, n_seq_max, a.n_head_kv, a.head_dim, dtype=dtype or tk or self.dtype,
                       dtype_v=dtype or tv or self.dtype, device=self.device)

    def shift_k(self, cache: KVCache) -> None:
        """Re-rotate cached K of shifted cells by their position delta (llama.cpp's K-shift)."""
        cells, deltas = cache.take_shift()
        if cells.numel() == 0:
            return
        c = cells.to(self.device)
        for layer in range(self.args.n_layer):
            k = cache.k[layer][:, c].transpose(0, 1)  # (cells, heads, d)
            # a rotation by the delta; the magnitude scale was applied when the key was stored
            r = ops.rope(k.to(self.dtype), deltas, self.rope_inv, self.args.rope_neox, self.freq_factors)
            cache.k[layer][:, c] = r.transpose(0, 1).to(k.dtype)

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, ub, view: KVView) -> torch.Tensor:
        x = self.tok_embd[ub.tokens.to(self.device)]
        rope = lambda t, p: ops.rope(t, p, self.rope_inv, self.args.rope_neox, self.freq_factors, self.rope_mscale,  # noqa: E731
                                     self.rope_ggml)
        for i, layer in enumerate(self.layers):
            x = layer(x, ub.pos, i, view, rope)
        return ops.rms_norm(x, self.norm, self.args.rms_eps)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return ops.linear(h, self.lm_head).float()
