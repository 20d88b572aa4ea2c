"""Mamba (v1) selective scan and causal conv, chunked on absolute positions.

The recurrence, per channel ``i`` and state ``n`` (``A < 0``)::

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        y_t = <h_t, C_t> + D x_t

**Chunks aligned to absolute positions.** Chunk ``k`` holds positions ``kL .. kL+L-1``. Inside a
chunk, ``h_t`` is split into the state at the chunk start ``H`` and what the chunk added since::

    P_t   = a_t * P_{t-1}                (P = 1 at the chunk start; a_t = exp(dt_t A))
    loc_t = a_t * loc_{t-1} + b_t        (loc = 0 at the chunk start; b_t = dt_t x_t B_t)
    h_t   = P_t * H + loc_t              y_t = sum_n C_t P_t H + sum_n C_t loc_t
    at the chunk end: H <- P_t * H + loc_t, loc <- 0, P <- 1

A sequence carries ``(H, loc, P)`` between ubatches (the SSM state, ``(3, N, d_inner)`` per layer).
The memory's zero state is a valid fresh state: with ``H = 0``, ``P`` only ever multiplies zero.
Every quantity is a fixed sequence of elementwise IEEE operations per absolute position, and the
state-dimension sums are a fixed halving tree, so a token's output and the carried state are
**bitwise the same** however the sequence was cut into ubatches, whichever other sequences share
them, and whether it was prefilled or stepped.

**Prefill is vectorised over time.** A ubatch lays each sequence's tokens at their offsets in
whole chunks (pads have ``dt = 0``: ``a = 1``, ``b = 0``, the identity), then runs the ``loc``/``P``
recurrences for all chunks of all sequences at once, one step per offset inside a chunk (``L``
steps, not one per token), passes ``H`` from chunk to chunk (one step per chunk), and reads all
outputs out in one go. A single new token per sequence takes :func:`scan_step`, the same
operations on one offset. One code path for CPU and CUDA.

Layouts: ``S`` sequence sets, ``T`` new tokens each, ``D`` = d_inner channels, ``N`` = d_state.
States keep ``N`` before ``D`` so that every large elementwise op runs along contiguous channels.
"""
from __future__ import annotations

import threading

import torch

CHUNK = 16


def state_shape(d_inner: int, d_state: int) -> tuple[int, int, int]:
    """Shape of one sequence's SSM state for one layer: ``(H, loc, P)`` stacked."""
    return (3, d_state, d_inner)


def tree_sum_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` in a fixed halving order, in place (``x`` is scratch afterwards); returns a
    view. The same rounding for every row, any shape, any device, unlike a reduction kernel whose
    order may depend on the tensor's size."""
    n = x.shape[dim]
    while n > 1 and n % 2 == 0:
        n //= 2
        lo = x.narrow(dim, 0, n)
        lo.add_(x.narrow(dim, n, n))
        x = lo
    out = x.select(dim, 0)
    for k in range(1, n):
        out.add_(x.select(dim, k))
    return out


def causal_conv(x: torch.Tensor, state: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time. x: (S, T, D); state: (S, K-1, D) previous inputs; w: (D, K).
    Returns the conv output (S, T, D) (bias added, no activation) and the new state (last K-1 inputs).
    Taps are summed in a fixed order, so each output is the same for any T."""
    K, T = w.shape[1], x.shape[1]
    xp = torch.cat([state.to(x.dtype), x], 1)
    y = xp[:, 0:T] * w[:, 0]
    for k in range(1, K):
        y = y + xp[:, k:k + T] * w[:, k]
    if b is not None:
        y = y + b
    return y, xp[:, T:]


LOG2E = 1.4426950408889634
_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _scratch(like: torch.Tensor, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Uninitialised tensors carved from one buffer kept between calls: fresh multi-megabyte
    allocations are page-faulted in on every call, which costs more than the scan itself."""
    sizes = [torch.Size(s).numel() for s in shapes]
    key = (like.device, like.dtype, threading.get_ident(), torch.is_inference_mode_enabled())
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < sum(sizes):
        buf = _WORKSPACE[key] = like.new_empty(sum(sizes))
    out, o = [], 0
    for shp, n in zip(shapes, sizes):
        out.append(buf[o:o + n].view(shp))
        o += n
    return out


def _decay(dt: torch.Tensor, A2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a = exp(dt A)`` as ``exp2(dt * A log2 e)`` (exp2 is several times faster than exp on CPU)."""
    return torch.mul(dt, A2, out=out).exp2_()


def _advance_(a: torch.Tensor, dx: torch.Tensor, B: torch.Tensor, loc: torch.Tensor, P: torch.Tensor) -> None:
    """One in-chunk step, in place: ``loc <- loc*a + dx*B``, ``P <- P*a`` (dx: (.., 1, D), B: (.., N, 1))."""
    P.mul_(a)
    loc.mul_(a).addcmul_(dx, B)


def _collapse(P: torch.Tensor, H: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """The state at a chunk end, ``P*H + loc``: the next chunk's start state."""
    return torch.mul(P, H).add_(loc)


def _carry_(state, end, H, loc, P) -> None:
    """Stores the carried state in place; at a chunk end it collapses into the next chunk's start."""
    end = end.view(-1, 1, 1)
    state[:, 0] = torch.where(end, _collapse(P, H, loc), H)
    state[:, 1] = torch.where(end, 0.0, loc)
    state[:, 2] = torch.where(end, 1.0, P)


def scan_step(x, dt, A, B, C, state, pos0):
    """One token per sequence. x, dt: (S, D); B, C: (S, N); A: (N, D); state: (S, 3, N, D) as
    ``(H, loc, P)``, updated in place; pos0: (S,) the token's position. Returns y (S, D) (without
    the D skip). The same operations as one offset of :func:`selective_scan`."""
    H, loc, P = state.clone().unbind(1)
    a = _decay(dt.unsqueeze(1), A * LOG2E, torch.empty_like(loc))
    _advance_(a, (dt * x).unsqueeze(1), B.unsqueeze(-1), loc, P)
    b = torch.empty_like(loc)
    Cn = C.unsqueeze(-1)
    y = tree_sum_(torch.mul(Cn, loc, out=b), -2).clone()
    y.add_(tree_sum_(torch.mul(P, Cn, out=a).mul_(H), -2))
    _carry_(state, (pos0.to(x.device) + 1) % CHUNK == 0, H, loc, P)
    return y


def selective_scan(x, dt, A, B, C, state, pos0):
    """``T`` new tokens of ``S`` sequences. x, dt: (S, T, D) (dt after softplus); B, C: (S, T, N);
    A: (N, D); state: (S, 3, N, D); pos0: (S,) position of each sequence's first new token.
    ``state`` is updated in place. Returns y (S, T, D) (without the D skip)."""
    if x.shape[1] == 1:
        return scan_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, pos0).unsqueeze(1)
    S, T, D = x.shape
    N, L, dev = B.shape[-1], CHUNK, x.device
    r_cpu = pos0.cpu() % L
    NC = -(-(int(r_cpu.max()) + T) // L)
    # offsets inside a chunk that hold tokens: all of them once a sequence spans two chunks
    j0, j1 = (int(r_cpu.min()), int(r_cpu.max()) + T) if NC == 1 else (0, L)
    r = r_cpu.to(dev)
    rows = torch.arange(S, device=dev)
    tok = r.unsqueeze(1) + torch.arange(T, device=dev)  # (S, T): layout index of each token

    def lay(v: torch.Tensor) -> torch.Tensor:  # (S, T, F) -> (S, NC, L, F), zero pads
        out = v.new_zeros(S, NC * L, v.shape[-1])
        out[rows.unsqueeze(1), tok] = v
        return out.view(S, NC, L, -1)

    dtl, dxl, Bl, Cl = lay(dt), lay(dt * x), lay(B).unsqueeze(-1), lay(C).unsqueeze(-1)
    A2 = A * LOG2E
    J = j1 - j0
    # CP: C_t * P_t, read against H once the chunk starts are known
    loc, P, a, b, H, CP, y = _scratch(x, *[(S, NC, N, D)] * 5, (S, NC, J, N, D), (S, NC, J, D))
    loc[:, 1:], P[:, 1:] = 0.0, 1.0
    loc[:, 0], P[:, 0] = state[:, 1], state[:, 2]
    for j in range(j0, j1):  # one step per offset inside a chunk, all chunks of all sequences at once
        _decay(dtl[:, :, j].unsqueeze(2), A2, a)
        _advance_(a, dxl[:, :, j].unsqueeze(2), Bl[:, :, j], loc, P)
        torch.mul(P, Cl[:, :, j], out=CP[:, :, j - j0])
        y[:, :, j - j0] = tree_sum_(torch.mul(Cl[:, :, j], loc, out=b), -2)
    H[:, 0] = state[:, 0]
    for k in range(NC - 1):  # chunk-start states, in order
        torch.mul(P[:, k], H[:, k], out=H[:, k + 1]).add_(loc[:, k])  # = _collapse
    for j in range(J):
        y[:, :, j].add_(tree_sum_(torch.mul(CP[:, :, j], H, out=a), -2))
    y = y.view(S, NC * J, D)[rows.unsqueeze(1), tok - j0]
    # carried state: the last token's chunk (pads after it are the identity)
    last = rows * NC + (r + T - 1) // L
    flat = lambda t: t.view(S * NC, N, D)[last]  # noqa: E731
    _carry_(state, (pos0.to(dev) + T) % L == 0, flat(H), flat(loc), flat(P))
    return y
