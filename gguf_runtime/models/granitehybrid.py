"""Granite 4 hybrid (GraniteMoeHybrid): Mamba2 layers and attention layers, Granite's multipliers,
on a hybrid memory.

Reads llama.cpp's GGUF layout for ``granitehybrid`` (convert_hf_to_gguf.py GraniteHybridModel,
llm_build_granite_hybrid): ``token_embd``, ``output_norm``, ``output`` (absent when tied); per
layer ``attn_norm``, ``ffn_norm``, ``ffn_{gate,up,down}``, and either

- a Mamba2 mixer where ``attention.head_count_kv[il] == 0``: ``ssm_in``, ``ssm_conv1d`` (weight,
  bias), ``ssm_dt.bias``, ``ssm_a`` (``-exp(A_log)``, per head), ``ssm_d``, ``ssm_norm`` (grouped
  RMS norm), ``ssm_out`` — as :mod:`.mamba2` computes it;
- or attention ``attn_{q,k,v,output}`` without RoPE (``rope.scaling.finetuned`` false, Granite 4's
  "nope"), scale ``attention.scale``.

Granite's multipliers: embeddings times ``embedding_scale``; each mixer and MLP output times
``residual_scale`` before its residual add; logits divided by ``logit_scale``::

    x = embd * embedding_scale
    h = x + residual_scale * mixer(rms_norm(x))
    out = h + residual_scale * ffn(rms_norm(h))
    logits = output(rms_norm(x_L)) / logit_scale

Files with experts (``expert_count > 0``) or RoPE are refused with a one-line error (the fixture
has neither; they would be unverified here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..errors import UnsupportedError
from ..gguf.hparams import HParams
from ..kernels.ssd import CHUNK, SSDState, ssd_scan
from ..kernels.ssm import causal_conv
from ..memory.hybrid import HybridMemory, HybridView
from ..memory.kv_cache import KVCache
from ..memory.recurrent import RecurrentMemory
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights, param, project


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: list[int] = field(default_factory=list)  # per layer; 0 marks a Mamba2 layer
    head_dim: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-5
    attn_scale: float = 0.0
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    d_conv: int = 0
    d_inner: int = 0
    d_state: int = 0
    ssm_heads: int = 0
    n_group: int = 1
    chunk: int = CHUNK

    @property
    def ssm_head_dim(self) -> int:
        return self.d_inner // self.ssm_heads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_group * self.d_state

    @property
    def attn_layers(self) -> list[int]:
        return [il for il, h in enumerate(self.n_head_kv) if h > 0]

    @property
    def ssm_layers(self) -> list[int]:
        return [il for il, h in enumerate(self.n_head_kv) if h == 0]

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_layer, n_embd, n_head = hp.n_layer(), hp.int("embedding_length"), hp.int("attention.head_count")
        if hp.int("expert_count", 0, lo=0):
            raise UnsupportedError(f"{hp.where}: granitehybrid with experts is not supported yet")
        if hp.bool("rope.scaling.finetuned", False):
            raise UnsupportedError(f"{hp.where}: granitehybrid with RoPE attention is not supported yet")
        head_dim = n_embd // n_head
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd,
            n_layer=n_layer,
            n_ctx_train=hp.int("context_length", 1 << 20, hi=1 << 40),
            n_head=n_head,
            n_head_kv=hp.per_layer("attention.head_count_kv", n_layer),
            head_dim=head_dim,
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
            attn_scale=hp.float("attention.scale", 0.0, lo=0.0),
            embedding_scale=hp.float("embedding_scale", 0.0),
            residual_scale=hp.float("residual_scale", 0.0),
            logit_scale=hp.float("logit_scale", 0.0),
            d_conv=hp.int("ssm.conv_kernel", hi=1024),
            d_inner=hp.int("ssm.inner_size"),
            d_state=hp.int("ssm.state_size"),
            ssm_heads=hp.int("ssm.time_step_rank"),
            n_group=hp.int("ssm.group_count", 1),
        )
        hp.divides(n_head, n_embd, f"{n_head} heads for embedding_length {n_embd}")
        for h in args.n_head_kv:
            if h:
                hp.divides(h, n_head, f"{n_head} heads for {h} KV heads")
        if not args.ssm_layers or not args.attn_layers:
            raise hp.fail("granitehybrid metadata: attention.head_count_kv must mark both attention and Mamba2 layers")
        if args.d_inner % args.ssm_heads or args.ssm_heads % args.n_group:
            raise hp.fail(f"inconsistent granitehybrid metadata: inner_size {args.d_inner}, "
                          f"{args.ssm_heads} heads (time_step_rank), {args.n_group} groups")
        return args


class Block(nn.Module):
    """One layer: a Mamba2 or an attention mixer, then the SwiGLU MLP, each scaled into the residual."""

    def __init__(self, a: ModelArgs, il: int):
        super().__init__()
        self.args = a
        e = a.n_embd
        self.is_attn = a.n_head_kv[il] > 0
        self.attn_norm = RMSNorm(e, a.rms_eps)
        if self.is_attn:
            hkv, d = a.n_head_kv[il], a.head_dim
            self.attn_q = Linear(e, a.n_head * d)
            self.attn_k = Linear(e, hkv * d)
            self.attn_v = Linear(e, hkv * d)
            self.attn_output = Linear(a.n_head * d, e)
            self.scale = a.attn_scale or d ** -0.5
        else:
            H, G, N = a.ssm_heads, a.n_group, a.d_state
            self.ssm_in = Linear(e, 2 * a.d_inner + 2 * G * N + H)
            self.ssm_conv1d = Weights(weight=(a.conv_dim, a.d_conv), bias=(a.conv_dim,))
            self.ssm_dt = Weights(bias=(H,))
            self.ssm_a = param(H, 1)
            self.ssm_d = param(H, 1)
            self.ssm_norm = Weights(weight=(G, a.d_inner // G))
            self.ssm_out = Linear(a.d_inner, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        self.ffn_gate = Linear(e, a.n_ff)
        self.ffn_up = Linear(e, a.n_ff)
        self.ffn_down = Linear(a.n_ff, e)

    def attention(self, x: torch.Tensor, kv) -> torch.Tensor:
        a, n = self.args, x.shape[0]
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = q.view(n, a.n_head, a.head_dim)
        k = k.view(n, -1, a.head_dim)
        v = v.view(n, -1, a.head_dim)
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def mamba2(self, u: torch.Tensor, st, off: torch.Tensor) -> torch.Tensor:
        """u: (n_tokens, n_embd) normed input of S sequence sets x T tokens; the conv window and SSD
        state are updated in ``st``; ``off``: tokens since each set's last chunk boundary."""
        a = self.args
        S, T = st.view.n_seqs, st.view.n_seq_tokens
        H, P, G, N = a.ssm_heads, a.ssm_head_dim, a.n_group, a.d_state
        z, xBC, dt = self.ssm_in(u.view(S, T, -1)).split([a.d_inner, a.conv_dim, H], -1)
        xBC, st["conv"] = causal_conv(xBC, st["conv"], self.ssm_conv1d.weight, self.ssm_conv1d.bias)
        xBC = kernels.silu(xBC)
        x, B, C = xBC.split([a.d_inner, G * N, G * N], -1)
        dt = kernels.softplus((dt + self.ssm_dt.bias).float())
        x = x.reshape(S, T, H, P)
        ssd = SSDState(st["ssm"], st["xdt"], st["B"], st["dt"])
        y, ssd = ssd_scan(x, dt, self.ssm_a.view(H), B.reshape(S, T, G, N), C.reshape(S, T, G, N), ssd, off)
        st["ssm"], st["xdt"], st["B"], st["dt"] = ssd.h, ssd.xdt, ssd.B, ssd.dt
        y = (y + x.float() * self.ssm_d.float().view(H, 1)) * kernels.silu(z.float()).view(S, T, H, P)
        y = kernels.rms_norm(y.reshape(S, T, G, -1), self.ssm_norm.weight.float(), a.rms_eps)
        return self.ssm_out(y.reshape(S * T, a.d_inner).to(u.dtype))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(kernels.swiglu(*project(x, self.ffn_gate, self.ffn_up)))

    def forward(self, x: torch.Tensor, mem, off: torch.Tensor) -> torch.Tensor:
        r = self.args.residual_scale
        h = self.attn_norm(x)
        h = self.attention(h, mem) if self.is_attn else self.mamba2(h, mem, off)
        x = x + (h * r if r else h)
        h = self.ffn(self.ffn_norm(x))
        return x + (h * r if r else h)


class Model(BaseModel):
    Args = ModelArgs
    reshape = frozenset({"ssm_a", "ssm_d", "ssm_norm.weight"})  # (H,) or (H, 1); ssm_norm flat or grouped

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args, il) for il in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> HybridMemory:
        """A KV cache of ``n_ctx`` cells for the attention layers beside one float32 recurrent slot
        per sequence for the Mamba2 layers (conv window, SSD state and tail, the tail's length ``n``)."""
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        attn = KVCache(a.n_layer, n_ctx, n_seq_max, [a.n_head_kv[il] for il in a.attn_layers], a.head_dim,
                       dtype=tk, dtype_v=tv, device=self.device, layers=a.attn_layers,
                       rotate=lambda il, k, delta: k)  # no RoPE: a position shift leaves keys as they are
        tail = SSDState.shapes(a.ssm_heads, a.ssm_head_dim, a.n_group, a.d_state, a.chunk)
        ssm = tail.pop("h")
        recr = RecurrentMemory(a.n_layer, n_seq_max, {"conv": (a.d_conv - 1, a.conv_dim), "ssm": ssm, **tail, "n": ()},
                               dtype=torch.float32, dtypes={"n": torch.long}, device=self.device, layers=a.ssm_layers)
        return HybridMemory(attn, recr)

    def forward(self, ub, view: HybridView) -> torch.Tensor:
        a = self.args
        x = self.token_embd(ub.tokens)
        if a.embedding_scale:
            x = x * a.embedding_scale
        first = view.layer(a.ssm_layers[0])
        off = first["n"].clone()  # tokens since each sequence's last chunk boundary
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il), off)
        first["n"] = (off + view.n_seq_tokens) % a.chunk
        return self.output_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.output(h).float()
        return out * (1.0 / self.args.logit_scale) if self.args.logit_scale else out  # ggml_scale by the inverse
