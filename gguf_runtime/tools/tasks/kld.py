"""KL-divergence against a llama.cpp logits file (``--kl-divergence-base`` / ``--kl-divergence``)."""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...atomic import AtomicFile, AtomicWriteError
from ...context import Context
from ..distributed import Dist, Runner
from ..perplexity import check_params, chunk_logits, make_context
from .choice import Progress
from .data import Emit, TaskError


def _row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def quantize_log_probs(logits: torch.Tensor) -> np.ndarray:
    """llama.cpp's compressed log-probs, (n, nv) uint16 rows: float32 scale and min log-prob, then
    each token's log-prob above max - 16 as round((logit - min) / scale) (0 below)."""
    l = logits.float()
    n, v = l.shape
    mx, mn = l.amax(-1, keepdim=True), l.amin(-1, keepdim=True)
    mn = torch.maximum(mn, mx - 16)
    lse = torch.exp(l - mx).double().sum(-1, keepdim=True).log().float()
    min_lp = (mn - mx) - lse
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.where(l > mn, torch.round(inv * (l - mn)), torch.zeros_like(l)).to(torch.int32)
    out = np.zeros((n, _row_width(v)), dtype=np.uint16)
    head = torch.cat([scale, min_lp], 1).cpu().numpy().astype(np.float32)
    out[:, :4] = head.view(np.uint16)
    out[:, 4:4 + v] = q.cpu().numpy().astype(np.uint16)
    return out


class LogitsWriter:
    """Writes llama.cpp's ``--kl-divergence-base`` file; use as ``perplexity(..., on_logits=w)``.
    The file appears under its name, complete, only when :meth:`close` succeeds (an
    :class:`~gguf_runtime.atomic.AtomicFile`: fsync, then rename); :meth:`abort` removes it."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, n_chunk: int, tokens: torch.Tensor):
        self.path = Path(path)
        try:
            self.f = AtomicFile(self.path)
        except AtomicWriteError as e:
            raise TaskError(f"cannot write logits file {e}") from None
        self.tmp = self.f.tmp
        self.n_chunk = n_chunk
        self._write(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk))
        self._write(tokens[:n_chunk * n_ctx].to(torch.int32).numpy().tobytes())

    def _write(self, b: bytes) -> None:
        try:
            self.f.write(b)
        except AtomicWriteError as e:  # the temporary file is already gone
            raise TaskError(f"cannot write logits file {e}") from None

    def __call__(self, i: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._write(quantize_log_probs(logits).tobytes())

    def close(self) -> None:
        try:
            self.f.commit()
        except AtomicWriteError as e:
            raise TaskError(f"cannot write logits file {e}") from None

    def abort(self) -> None:
        self.f.abort()


@dataclass
class LogitsFile:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: torch.Tensor
    data: np.ndarray  # (n_chunk, n_ctx - 1 - n_ctx // 2, nv) uint16

    @classmethod
    def read(cls, path: str | os.PathLike) -> "LogitsFile":
        """Opens a logits file; the log-prob rows stay memory-mapped (they can be gigabytes)."""
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(20)
        except OSError as e:
            raise TaskError(f"cannot read logits file {path}: {e.strerror or e}") from None
        if head[:8] != b"_logits_":
            raise TaskError(f"{path} does not look like a file containing log-probabilities")
        if len(head) < 20:
            raise TaskError(f"{path}: truncated header")
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[8:20])
        if n_ctx < 4 or n_vocab <= 0 or n_chunk <= 0:
            raise TaskError(f"{path}: bad header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
        n_tok = n_ctx * n_chunk
        rows, nv = n_ctx - 1 - n_ctx // 2, _row_width(n_vocab)
        need = 20 + 4 * n_tok + 2 * n_chunk * rows * nv
        if size < need:
            raise TaskError(f"{path} is truncated: {size} bytes, {need} expected for {n_chunk} chunks of {n_ctx}")
        tokens = torch.from_numpy(np.fromfile(path, dtype="<i4", count=n_tok, offset=20).astype(np.int64))
        data = np.memmap(path, dtype="<u2", mode="r", offset=20 + 4 * n_tok, shape=(n_chunk, rows, nv))
        return cls(n_ctx, n_vocab, n_chunk, tokens, data)


@dataclass
class KLDStats:
    """llama.cpp's kl_divergence_result: running sums plus per-token KLD and delta-p values."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: torch.Tensor, base: np.ndarray, targets: torch.Tensor) -> None:
        self.merge(self.terms(logits, base, targets))

    @staticmethod
    def terms(logits: torch.Tensor, base: np.ndarray, targets: torch.Tensor) -> dict:
        """One chunk's contribution (its sums, counts and per-token values), for :meth:`merge`; it
        depends on that chunk alone, so any process may compute it."""
        l = logits.float()
        dev = l.device
        t = targets.to(dev).view(-1, 1)
        mx, imax = l.max(-1, keepdim=True)
        lse = torch.exp(l - mx).double().sum(-1, keepdim=True).log().float()
        nll = ((mx + lse) - l.gather(-1, t)).squeeze(-1)
        v = l.shape[1]
        head = np.ascontiguousarray(base[:, :4]).view(np.float32)
        scale = torch.from_numpy(head[:, :1].copy()).to(dev)
        min_lp = torch.from_numpy(head[:, 1:2].copy()).to(dev)
        q = torch.from_numpy(base[:, 4:4 + v].astype(np.float32)).to(dev)
        p_log_base = scale * q + min_lp
        nll_base = -p_log_base.gather(-1, t).squeeze(-1)
        imax_base = p_log_base.argmax(-1)
        term = torch.exp(p_log_base) * ((p_log_base - l) + (mx + lse))
        kld = torch.where(p_log_base > -16, term, torch.zeros_like(term)).double().sum(-1)
        p_diff = torch.exp(-nll) - torch.exp(-nll_base)
        d = lambda x: float(x.double().sum())  # noqa: E731
        pd2 = (p_diff * p_diff).double()
        return {"sum_nll": d(nll), "sum_nll2": d(nll * nll), "sum_nll_base": d(nll_base),
                "sum_nll_base2": d(nll_base * nll_base), "sum_nll_nll_base": d(nll * nll_base),
                "sum_kld": float(kld.sum()), "sum_kld2": float((kld * kld).sum()), "sum_p_diff": d(p_diff),
                "sum_p_diff2": float(pd2.sum()), "sum_p_diff4": float((pd2 * pd2).sum()),
                "max_p_diff": float(p_diff.abs().max()), "n_same_top": int((imax.squeeze(-1) == imax_base).sum()),
                "count": l.shape[0], "kld_values": kld.float().cpu().numpy().tolist(),
                "p_diff_values": p_diff.cpu().numpy().tolist()}

    def merge(self, t: dict) -> None:
        """Add one chunk's :meth:`terms` (chunks merged in order give the same sums as one pass)."""
        for k in ("sum_nll", "sum_nll2", "sum_nll_base", "sum_nll_base2", "sum_nll_nll_base", "sum_kld", "sum_kld2",
                  "sum_p_diff", "sum_p_diff2", "sum_p_diff4", "n_same_top", "count"):
            setattr(self, k, getattr(self, k) + t[k])
        self.max_p_diff = max(self.max_p_diff, t["max_p_diff"])
        self.kld_values.append(np.asarray(t["kld_values"], dtype=np.float32))
        self.p_diff_values.append(np.asarray(t["p_diff_values"], dtype=np.float32))

    @staticmethod
    def _mu(s: float, s2: float, n: int) -> tuple[float, float]:
        if n < 1:
            return 0.0, 0.0
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def _cov(self) -> float:
        n = self.count
        if n < 10:
            return 0.0
        return (self.sum_nll_nll_base / n - (self.sum_nll / n) * (self.sum_nll_base / n)) / (n - 1)

    def chunk_line(self, i: int) -> str:
        lp = self._mu(self.sum_nll, self.sum_nll2, self.count)
        lb = self._mu(self.sum_nll_base, self.sum_nll_base2, self.count)
        ppl = math.exp(lp[0])
        ratio_unc = _sqrt(lp[1] ** 2 + lb[1] ** 2 - 2.0 * self._cov())
        kl = self._mu(self.sum_kld, self.sum_kld2, self.count)
        mse = self._mu(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = _sqrt(mse[0])
        rms_unc = 0.5 / rms * mse[1] if rms else float("inf")
        top = self.n_same_top / self.count
        top_unc = _sqrt(top * (1 - top) / max(1, self.count - 1))
        return (f"{i + 1:4d}    {ppl:9.4f} ± {ppl * lp[1]:9.4f}    {lp[0] - lb[0]:10.5f} ± {ratio_unc:10.5f}"
                f"    {kl[0]:10.5f} ± {kl[1]:10.5f}    {100.0 * rms:6.3f} ± {100.0 * rms_unc:6.3f} %"
                f"    {100.0 * top:6.3f} ± {100.0 * top_unc:6.3f} %")

    def summary(self) -> dict:
        lp = self._mu(self.sum_nll, self.sum_nll2, self.count)
        lb = self._mu(self.sum_nll_base, self.sum_nll_base2, self.count)
        kl = self._mu(self.sum_kld, self.sum_kld2, self.count)
        pd = self._mu(self.sum_p_diff, self.sum_p_diff2, self.count)
        mse = self._mu(self.sum_p_diff2, self.sum_p_diff4, self.count)
        cov = self._cov()
        ppl, ppl_base = math.exp(lp[0]), math.exp(lb[0])
        ratio_unc = _sqrt(lp[1] ** 2 + lb[1] ** 2 - 2.0 * cov)
        kv = np.sort(np.concatenate(self.kld_values).astype(np.float32))
        pv = np.sort(np.concatenate(self.p_diff_values).astype(np.float32))
        rms = _sqrt(mse[0])
        top = self.n_same_top / self.count
        return {
            "ppl": ppl, "ppl_unc": ppl * lp[1], "ppl_base": ppl_base, "ppl_base_unc": ppl_base * lb[1],
            "cor": cov / (lp[1] * lb[1]) if lp[1] * lb[1] else float("nan"),
            "ln_ratio": lp[0] - lb[0], "ln_ratio_unc": ratio_unc,
            "ratio": math.exp(lp[0] - lb[0]), "ratio_unc": math.exp(lp[0] - lb[0]) * ratio_unc,
            "diff": ppl - ppl_base,
            "diff_unc": _sqrt((ppl * lp[1]) ** 2 + (ppl_base * lb[1]) ** 2 - 2.0 * ppl * ppl_base * cov),
            "kld": kl[0], "kld_unc": kl[1], "kld_values": kv, "kld_median": _median(kv),
            "p_diff": pd[0], "p_diff_unc": pd[1], "p_diff_values": pv, "p_diff_median": _median(pv),
            "rms_p_diff": rms, "rms_p_diff_unc": 0.5 / rms * mse[1] if rms else float("nan"),
            "same_top": top, "same_top_unc": _sqrt(top * (1 - top) / max(1, self.count - 1)),
        }

    def report(self) -> list[str]:
        """llama.cpp's closing statistics (nothing under 100 tokens, as llama.cpp)."""
        if self.count < 100:
            return []
        s = self.summary()
        kv, pv = s["kld_values"], s["p_diff_values"]
        L = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * s['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ratio']:10.6f} ± {s['ln_ratio_unc']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ratio']:10.6f} ± {s['ratio_unc']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['diff']:10.6f} ± {s['diff_unc']:10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_unc']:10.6f}",
             f"Maximum KLD: {kv[-1]:10.6f}"]
        for name, fr in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900)):
            L.append(f"{name}   KLD: {percentile(kv, fr):10.6f}")
        L.append(f"Median  KLD: {s['kld_median']:10.6f}")
        for name, fr in (("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
            L.append(f"{name}   KLD: {percentile(kv, fr):10.6f}")
        L += [f"Minimum KLD: {kv[0]:10.6f}", "", "====== Token probability statistics ======",
              f"Mean    Δp: {100.0 * s['p_diff']:6.3f} ± {100.0 * s['p_diff_unc']:5.3f} %",
              f"Maximum Δp: {100.0 * pv[-1]:6.3f}%"]
        for name, fr in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900), ("75.0%", 0.750)):
            L.append(f"{name}   Δp: {100.0 * percentile(pv, fr):6.3f}%")
        L.append(f"Median  Δp: {100.0 * s['p_diff_median']:6.3f}%")
        for name, fr in (("25.0%", 0.250), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
            L.append(f"{name}   Δp: {100.0 * percentile(pv, fr):6.3f}%")
        L += [f"Minimum Δp: {100.0 * pv[0]:6.3f}%",
              f"RMS Δp    : {100.0 * s['rms_p_diff']:6.3f} ± {100.0 * s['rms_p_diff_unc']:5.3f} %",
              f"Same top p: {100.0 * s['same_top']:6.3f} ± {100.0 * s['same_top_unc']:5.3f} %"]
        return L


def _sqrt(x: float) -> float:
    """C's sqrt: NaN for a negative argument (llama.cpp prints it rather than failing)."""
    return math.sqrt(x) if x >= 0 else float("nan")


def _median(v: np.ndarray) -> float:
    n = len(v)
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear-interpolated percentile of sorted values, in float32."""
    f32 = np.float32
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = f32(fraction) * f32(len(values) - 1)
    ip = int(p)
    p = f32(p - f32(ip))
    return float((f32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def kl_divergence(ctx_or_model, base: LogitsFile, n_batch: int = 2048, n_ubatch: int = 512, bos: int | None = None,
                  emit: Emit | None = None, progress: Progress | None = None, runner: Runner | None = None) -> KLDStats:
    """Compares a model with the log-probs of a ``--kl-divergence-base`` file (same tokens, chunks
    and BOS replacement), emitting llama.cpp's per-chunk lines and closing statistics. ``runner``:
    chunks shared among torchrun's ranks and/or resumed from a log (rank 0 emits everything)."""
    n_ctx = base.n_ctx
    check_params(base.tokens.numel(), n_ctx, n_batch)
    ctx = ctx_or_model if isinstance(ctx_or_model, Context) else make_context(ctx_or_model, n_ctx, n_batch, n_ubatch)
    if ctx.n_vocab != base.n_vocab:
        raise TaskError(f"inconsistent vocabulary: the model has {ctx.n_vocab} tokens, the logits file {base.n_vocab}")
    emit = emit or (lambda s: None)
    stats = KLDStats()
    emit("")
    emit("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p")

    def compute(ids):
        return [KLDStats.terms(logits, base.data[i], targets)
                for i, logits, targets in chunk_logits(ctx, base.tokens, n_ctx, n_batch, base.n_chunk, bos, ids)]

    n_seq = max(1, n_batch // n_ctx)
    for i, terms in (runner or Runner(Dist())).iterate(base.n_chunk, n_seq, compute):
        stats.merge(terms)
        emit(stats.chunk_line(i))
        if progress:
            progress(i + 1, base.n_chunk)
    emit("")
    for line in stats.report():
        emit(line)
    return stats
