"""The SSD scan of Mamba2 (state-space duality), chunked on absolute positions.

Mamba2's recurrence per head h (scalar decay ``A[h] < 0``; groups of heads share ``B``/``C``)::

    state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T        (head_dim x d_state)
    y_t     = state_t C_t

The chunked dual form computes it ``L`` positions at a time: within a chunk the outputs are a masked
"attention" ``y = (C B^T * decay) (dt x)`` plus the chunk-start state read out through ``C``; between
chunks only the state is passed on. Chunks are aligned to the sequence's **absolute positions**
(chunk ``c`` holds tokens ``cL .. cL+L-1``), never to where a ubatch starts, and every chunk is
computed with the same fixed ``L x L`` shapes. A sequence therefore carries, between ubatches, the
state at its last chunk boundary plus the inputs of the tokens it has seen since (the *tail*, fewer
than ``L`` rows). A ubatch lays its tokens after that tail, pads to whole chunks with ``dt = 0``
(no decay, no input) and recomputes each touched chunk exactly as one long prefill would have, so a
token's output is bitwise the same whether its sequence came in ubatches of 1, 7 or 64 tokens,
alone or beside others. A decode step is the same computation on the one chunk the token falls in:
prefill and decode share one code path on every device (decode pays ``L`` rows of matrix work for
its one token: the price of bitwise invariance).

Shapes: ``S`` sequences of a ubatch, ``T`` new tokens each, ``H`` heads of ``P`` channels, ``G``
groups, ``N`` state size; carried tensors are head-major so each chunk is a contiguous matrix.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

CHUNK = 32


class SSDState(NamedTuple):
    """What a sequence carries between ubatches (one layer, float32): the state at its last chunk
    boundary and the tail after it (rows ``0 .. off - 1`` valid)."""

    h: torch.Tensor  # (S, H, P, N)
    xdt: torch.Tensor  # (S, H, L, P): dt * x
    B: torch.Tensor  # (S, G, L, N)
    dt: torch.Tensor  # (S, H, L): dt after softplus

    @staticmethod
    def shapes(H: int, P: int, G: int, N: int, L: int = CHUNK) -> dict[str, tuple[int, ...]]:
        return {"h": (H, P, N), "xdt": (H, L, P), "B": (G, L, N), "dt": (H, L)}


@lru_cache(maxsize=16)
def _causal(L: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True where source s <= target t."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()


def _lay(tail: torch.Tensor, new: torch.Tensor, off: torch.Tensor | int, W: int) -> torch.Tensor:
    """(S, K, L, F) tail and (S, K, T, F) new rows -> (S, K, W, F): each sequence's valid tail rows,
    its new rows from ``off`` (per sequence, or one int for all), zeros after."""
    S, K, T, F = new.shape
    L = tail.shape[2]
    out = new.new_zeros(S, K, W, F)
    if isinstance(off, int):  # the same offset for every sequence: plain slices
        out[:, :, :off] = tail[:, :, :off]
        out[:, :, off:off + T] = new
        return out
    valid = (torch.arange(L, device=new.device) < off.unsqueeze(1)).view(S, 1, L, 1)
    out[:, :, :L] = torch.where(valid, tail, 0)
    idx = (off.unsqueeze(1) + torch.arange(T, device=new.device)).view(S, 1, T, 1).expand(S, K, T, F)
    return out.scatter_(2, idx, new)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: SSDState, off: torch.Tensor) -> tuple[torch.Tensor, SSDState]:
    """Runs ``T`` new tokens of ``S`` sequences through the scan.

    x: (S, T, H, P); dt: (S, T, H) after softplus; A: (H,); B, C: (S, T, G, N); state: each sequence's
    carried :class:`SSDState`; off: (S,) int64 number of tail rows (its first new token's offset in
    its chunk). Returns y (S, T, H, P) float32 (without the D skip) and the new state.
    """
    S, T, H, P = x.shape
    G, N = B.shape[-2:]
    L, dev = state.xdt.shape[2], x.device
    off = off.to(dev)
    nc = -(-(int(off.max()) + T) // L)
    W = nc * L
    dt = dt.float()
    o = int(off[0]) if bool((off == off[0]).all()) else off
    xdt = _lay(state.xdt, (x.float() * dt.unsqueeze(-1)).transpose(1, 2), o, W)  # (S, H, W, P)
    dtl = _lay(state.dt.unsqueeze(-1), dt.transpose(1, 2).unsqueeze(-1), o, W).view(S, H, nc, L)
    Bl = _lay(state.B, B.float().transpose(1, 2), o, W)  # (S, G, W, N)
    Cl = _lay(state.B.new_zeros(S, G, L, N), C.float().transpose(1, 2), o, W)

    cum = (dtl * A.float().to(dev).view(1, H, 1, 1)).cumsum(-1)  # (S, H, nc, L): prefix sums of dt A
    causal = _causal(L, dev)
    # decay[t, s] = exp(cum_t - cum_s) for s <= t (<= 0 there: cum never increases), else 0
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).clamp_max_(0).exp_().masked_fill_(~causal, 0)

    # within chunks: y = (C B^T * decay) (dt x), C B^T shared by the heads of a group
    Bc, Cc = Bl.view(S, G, nc, L, N), Cl.view(S, G, nc, L, N)
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (S, G, nc, L, L)
    M = (decay.view(S, G, H // G, nc, L, L) * CB.unsqueeze(2)).view(S, H, nc, L, L)
    xc = xdt.view(S, H, nc, L, P)
    y = torch.matmul(M, xc)  # (S, H, nc, L, P)

    # each chunk's contribution to the state at its end, then states passed on in chunk order
    Bh = Bc.unsqueeze(2).expand(S, G, H // G, nc, L, N).reshape(S, H, nc, L, N)
    st = torch.matmul((xc * decay[..., -1, :].unsqueeze(-1)).transpose(-1, -2), Bh)  # (S, H, nc, P, N)
    dec = torch.exp(cum[..., -1]).view(S, H, nc, 1, 1)
    hb = st.new_empty(S, H, nc + 1, P, N)
    hb[:, :, 0] = state.h
    for c in range(nc):
        torch.mul(dec[:, :, c], hb[:, :, c], out=hb[:, :, c + 1]).add_(st[:, :, c])  # no FMA: same rounding everywhere

    # chunk-start states read out through C (operands made contiguous: a strided view would reach the
    # BLAS transposed for some chunk counts and not others, with another rounding)
    Ch = Cc.unsqueeze(2).expand(S, G, H // G, nc, L, N).reshape(S, H, nc, L, N)
    y += torch.matmul(Ch, hb[:, :, :nc].transpose(-1, -2).contiguous()) * torch.exp(cum).unsqueeze(-1)
    tok = (off.unsqueeze(1) + torch.arange(T, device=dev)).view(S, 1, T, 1).expand(S, H, T, P)
    y = y.view(S, H, W, P).gather(2, tok).transpose(1, 2)  # (S, T, H, P)

    # carried on: the state at the last boundary reached and the rows after it
    cb = torch.div(off + T, L, rounding_mode="floor")
    rows, ct = torch.arange(S, device=dev), cb.clamp_max(nc - 1)
    new = SSDState(hb[rows, :, cb], xc[rows, :, ct], Bc[rows, :, ct], dtl[rows, :, ct])
    return y, new
