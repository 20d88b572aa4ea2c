"""T5 (encoder-decoder): RMS norms, relative position buckets, gated-GELU (or ReLU) MLPs,
cross-attention over each sequence's encoder output.

Reads llama.cpp's GGUF layout for ``t5`` (convert_hf_to_gguf.py T5Model, llm_build_t5_enc /
llm_build_t5_dec): ``token_embd``; ``enc.blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_o,
ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``enc.blk.0.attn_rel_b``, ``enc.output_norm``;
``dec.blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_o, cross_attn_norm, cross_attn_{q,k,v,o},
ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``dec.blk.0.attn_rel_b``, ``dec.output_norm``, ``output``.
Metadata: ``block_count`` (encoder layers), ``decoder_block_count``, ``attention.key_length``,
``attention.relative_buckets_count``, ``decoder_start_token_id``.

The math (transformers' T5, which llama.cpp follows)::

    enc:  x = embd(src);  x += o(attn(rms(x)) + bias_bidir);  x += ffn(rms(x));  e = rms(x_L)
    dec:  y = embd(tgt);  y += o(attn(rms(y)) + bias_causal); y += cross_o(attn(rms(y), e)); y += ffn(rms(y))
          logits = output(rms(y_L))

Attention is unscaled (scale 1). ``bias[h, q, k] = attn_rel_b[bucket(k_pos - q_pos), h]`` of the
stack's first layer, shared by its layers: T5's relative buckets (exact for distances under
``n_buckets/4`` (bidirectional) or ``n_buckets/2`` (causal), then logarithmic up to 128).

**The bias through the shared kernel.** The fixed-order attention kernel takes a boolean mask, not an
additive bias, so the bias travels as extra features: a query at position p gets a one-hot of p
(``P`` positions), a key at position j gets ``[bias_h(bucket(j - p')) for p' in 0..P-1]``; their dot
product is exactly ``bias_h(bucket(j - p))`` (every other term is an exact zero). ``P`` is the
encoder's ``context_length`` and the decoder cache's ``n_ctx``. Every attention then runs through
:func:`gguf_runtime.kernels.attention` with its invariance argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..errors import BatchError, UnsupportedError
from ..gguf.hparams import HParams
from ..memory.cross import CrossMemory, DecoderView
from ..memory.encoder import EncoderView
from ..memory.kv_cache import KVCache
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights

MAX_DISTANCE = 128  # T5's relative_attention_max_distance (llama.cpp fixes it too)


@dataclass
class ModelArgs(BaseArgs):
    n_layer_dec: int = 0
    n_head: int = 0
    head_dim: int = 0
    n_ff: int = 0
    rms_eps: float = 1e-6
    n_buckets: int = 32
    gated: bool = True  # gated-GELU MLP (T5 v1.1, flan-t5); ReLU otherwise (T5 v1.0)
    decoder_start: int = 0

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        pad = hp.int("tokenizer.ggml.padding_token_id", 0, lo=0)
        return cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd,
            n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length", 512),
            causal=True,
            n_layer_dec=hp.int("decoder_block_count", hp.n_layer()),
            n_head=n_head,
            head_dim=hp.int("attention.key_length", n_embd // n_head),
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0),
            n_buckets=hp.int("attention.relative_buckets_count", 32, lo=2),
            gated=hp.has_tensor("enc.blk.0.ffn_gate.weight"),
            decoder_start=hp.int("decoder_start_token_id", pad, lo=0),
        )


def relative_bucket(rel: torch.Tensor, bidirectional: bool, n_buckets: int) -> torch.Tensor:
    """T5's bucket of each relative position ``rel = key_pos - query_pos`` (int64 -> int64)."""
    out = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        out += (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    # float32 as transformers and llama.cpp compute it: bucket edges must land where theirs do
    log = torch.log(dist.float() / exact) / math.log(MAX_DISTANCE / exact) * (n_buckets - exact)
    far = (exact + log.long()).clamp(max=n_buckets - 1)
    return out + torch.where(dist < exact, dist, far)


def heads(lin: Linear, x: torch.Tensor, a: ModelArgs) -> torch.Tensor:
    return lin(x).view(x.shape[0], a.n_head, a.head_dim)


class EncBlock(nn.Module):
    def __init__(self, a: ModelArgs, il: int):
        super().__init__()
        self.args = a
        e, hd = a.n_embd, a.n_head * a.head_dim
        self.attn_norm = RMSNorm(e, a.rms_eps)
        self.attn_q, self.attn_k, self.attn_v, self.attn_o = Linear(e, hd), Linear(e, hd), Linear(e, hd), Linear(hd, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        self.ffn_gate = Linear(e, a.n_ff) if a.gated else None
        self.ffn_up = Linear(e, a.n_ff)
        self.ffn_down = Linear(a.n_ff, e)
        if il == 0:
            self.attn_rel_b = Weights(weight=(a.n_buckets, a.n_head))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_gate is None:
            return self.ffn_down(torch.relu(self.ffn_up(x)))
        return self.ffn_down(kernels.gelu_tanh(self.ffn_gate(x)) * self.ffn_up(x))

    def self_attention(self, x: torch.Tensor, kv, qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
        """``qf``/``kf``: the bias features of the rows' positions (n, heads, P)."""
        a = self.args
        q = torch.cat([heads(self.attn_q, x, a), qf], -1)
        k = torch.cat([heads(self.attn_k, x, a), kf], -1)
        o = kv.attend(q, k, heads(self.attn_v, x, a), scale=1.0)
        return self.attn_o(o.reshape(x.shape[0], -1))

    def forward(self, x, kv, qf, kf):
        x = x + self.self_attention(self.attn_norm(x), kv, qf, kf)
        return x + self.ffn(self.ffn_norm(x))


class DecBlock(EncBlock):
    def __init__(self, a: ModelArgs, il: int):
        super().__init__(a, il)
        e, hd = a.n_embd, a.n_head * a.head_dim
        self.cross_attn_norm = RMSNorm(e, a.rms_eps)
        self.cross_attn_q, self.cross_attn_k = Linear(e, hd), Linear(e, hd)
        self.cross_attn_v, self.cross_attn_o = Linear(e, hd), Linear(hd, e)

    def cross_attention(self, x: torch.Tensor, view: DecoderView) -> torch.Tensor:
        a = self.args
        o = view.cross_attend(heads(self.cross_attn_q, x, a),
                              lambda e: (heads(self.cross_attn_k, e, a), heads(self.cross_attn_v, e, a)), scale=1.0)
        return self.cross_attn_o(o.reshape(x.shape[0], -1))

    def forward(self, x, view, il, qf, kf):
        x = x + self.self_attention(self.attn_norm(x), view.layer(il), qf, kf)
        x = x + self.cross_attention(self.cross_attn_norm(x), view)
        return x + self.ffn(self.ffn_norm(x))


class Stack(nn.Module):
    def __init__(self, a: ModelArgs, block, n_layer: int):
        super().__init__()
        self.blk = nn.ModuleList(block(a, il) for il in range(n_layer))
        self.output_norm = RMSNorm(a.n_embd, a.rms_eps)

    def bias_features(self, pos: torch.Tensor, P: int, bidirectional: bool, n_buckets: int):
        """Query one-hots (n, heads, P) and key bias rows (n, heads, P) for positions ``pos``."""
        if int(pos.max()) >= P:
            raise BatchError(f"position {int(pos.max())} is beyond the {P} positions this T5 context covers "
                             f"(increase n_ctx)")
        table = self.blk[0].attn_rel_b.weight  # (n_buckets, heads)
        grid = torch.arange(P)
        b = relative_bucket(pos.unsqueeze(1) - grid.unsqueeze(0), bidirectional, n_buckets)  # key at pos, query at p'
        kf = table[b.to(table.device)].transpose(1, 2)  # (n, heads, P)
        qf = torch.nn.functional.one_hot(pos, P).to(table.dtype).to(table.device)
        return qf.unsqueeze(1).expand(-1, table.shape[1], -1), kf.contiguous()


class Model(BaseModel):
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.enc = Stack(args, EncBlock, args.n_layer)
        self.dec = Stack(args, DecBlock, args.n_layer_dec)
        self.output = Linear(args.n_embd, args.n_vocab)

    def loaded(self, f) -> None:
        if self.args.tied:
            raise UnsupportedError(f"{f.path.name}: T5 with a tied output (T5 v1.0 scaling) is not supported yet")

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> CrossMemory:
        """The decoder's KV cache (keys carry the ``n_ctx`` bias features) and the encoder outputs."""
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        kv = KVCache(a.n_layer_dec, n_ctx, n_seq_max, a.n_head, a.head_dim + n_ctx, head_dim_v=a.head_dim,
                     dtype=tk, dtype_v=tv, device=self.device)
        return CrossMemory(kv, a.n_ctx_train, a.decoder_start, device=self.device)

    def encode(self, ub, view: EncoderView) -> torch.Tensor:
        """The encoder's final states (n_tokens, n_embd) of a ubatch of whole sequences."""
        a = self.args
        n, pad = ub.n_tokens, view.n_rows - ub.n_tokens
        tokens, pos = (torch.cat([t, t.new_zeros(pad)]) for t in (ub.tokens, ub.pos))
        qf, kf = self.enc.bias_features(pos, a.n_ctx_train, True, a.n_buckets)
        x = self.token_embd(tokens)
        for block in self.enc.blk:
            x = block(x, view, qf, kf)
        return self.enc.output_norm(x)[:n]

    def forward(self, ub, view: DecoderView) -> torch.Tensor:
        a = self.args
        qf, kf = self.dec.bias_features(ub.pos, view.kv.cache.n_ctx, False, a.n_buckets)
        x = self.token_embd(ub.tokens)
        for il, block in enumerate(self.dec.blk):
            x = block(x, view, il, qf, kf)
        return self.dec.output_norm(x)
