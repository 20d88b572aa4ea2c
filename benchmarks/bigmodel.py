"""Bounded memory on a 7B-shaped model whose float32 weights exceed the machine (issue 19).

    python benchmarks/bigmodel.py make  [--out /tmp/big-7b-Q4_K_M.gguf] [--layers 32] [--ff 11008] [--kv-heads 32]
    python benchmarks/bigmodel.py measure -- CMD ...     # peak RSS of one command (VmHWM, RssAnon, RssFile)
    python benchmarks/bigmodel.py expect [--file BIG.gguf] [-c 512] [-b 2048] [--kv-bytes 4]   # file + scratch + KV

``make`` writes a synthetic Llama GGUF (hidden 4096, 32 heads, 32 layers, Llama-2-7B's FFN by
default: 6.9 G parameters, 27.5 GB of float32) with random N(0, 0.02) weights, norms of ones, and
the tokenizer of SmolLM2-135M (its 49,152-token vocabulary, so perplexity can run on text).
Per-tensor types are our quantizer's Q4_K_M mix (``convert.quantize.Mixer``: output and the
"more bits" attn_v / ffn_down layers Q6_K, the rest Q4_K), bytes come from our K-quant encoder
(``convert.quantize.encode``), and the file is streamed through our writer (``convert.writer``:
atomic, one tensor in memory at a time).

Our K-quant encoder runs at 0.07-0.74 M values/s on this shared 2-core box (exact ggml search order in torch),
so encoding 6.9 G values would take 2.5 hours or more. K-quant super-blocks (256 values) are encoded
independently, so ``make`` encodes a pool of random super-blocks once per type (seeded) and builds
every tensor from super-blocks drawn from that pool (seeded per tensor): each tensor is then exactly
our encoder's output for a float tensor whose 256-value blocks are i.i.d. draws from the pool
(checked on the first rows of one tensor while writing). Only the pools and one tensor's bytes
are ever in memory.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from gguf_runtime import fixtures
from gguf_runtime.convert.quantize import Mixer, _copy_kv, allows_quantization, encode, layer_of
from gguf_runtime.convert.writer import TensorPlan, add_infos, write_gguf
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.models.layers import ROW_BLOCK

QK_K = 256
STD = 0.02


def tensor_shapes(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int) -> dict[str, tuple]:
    """A Llama's tensors (torch order, outermost first)."""
    d_kv = n_embd // n_head * n_head_kv
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,), "output.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (n_embd,), p + "attn_q.weight": (n_embd, n_embd),
                   p + "attn_k.weight": (d_kv, n_embd), p + "attn_v.weight": (d_kv, n_embd),
                   p + "attn_output.weight": (n_embd, n_embd), p + "ffn_norm.weight": (n_embd,),
                   p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
                   p + "ffn_down.weight": (n_embd, n_ff)}
    return shapes


def make(out: Path, n_layer: int = 32, n_embd: int = 4096, n_head: int = 32, n_head_kv: int = 32, n_ff: int = 11008,
         pool_blocks: int = 1 << 16, seed: int = 0, tokenizer: Path | None = None) -> Path:
    tok = GGUFFile(tokenizer or fixtures.smollm2_path())
    n_vocab = len(tok.metadata["tokenizer.ggml.tokens"])
    shapes = tensor_shapes(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab)
    names = sorted(shapes, key=lambda n: (layer_of(n), n))  # the order quantize (and llama.cpp) takes
    mixer = Mixer(F.MOSTLY_Q4_K_M, Q.Q4_K, "llama", n_layer, tied=False, n_attn_v=n_layer)
    plans = []
    for n in names:
        s = shapes[n]
        t = mixer.fallback(mixer.choose(n, s[-1]), s[-1]) if allows_quantization(n, len(s)) else Q.F32
        plans.append(TensorPlan(n, s, t))

    w = gguf.GGUFWriter(None, "llama")
    add_infos(w, plans)
    w.add_name(f"synthetic llama {n_layer}x{n_embd} (random N(0, {STD}))")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_vocab_size(n_vocab)
    _copy_kv(w, tok, {k for k in tok.metadata if not k.startswith("tokenizer.")})
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(F.MOSTLY_Q4_K_M)

    g = torch.Generator().manual_seed(seed)
    pools: dict[Q, tuple[torch.Tensor, np.ndarray]] = {}
    for t in sorted({p.qtype for p in plans if p.qtype != Q.F32}):
        t0 = time.perf_counter()
        x = torch.randn(pool_blocks, QK_K, generator=g) * STD
        pools[t] = (x, encode(x, t))
        dt = time.perf_counter() - t0
        print(f"pool {t.name}: {pool_blocks} blocks encoded in {dt:.1f} s ({x.numel() / dt / 1e6:.2f} M values/s)",
              file=sys.stderr)
    checked = set()

    def data():
        for i, p in enumerate(plans):
            if p.qtype == Q.F32:
                yield p.name, np.ones(p.shape, dtype=np.float32)
                continue
            floats, pool = pools[p.qtype]
            rows, n_blk = p.shape[0], p.shape[1] // QK_K
            idx = torch.randint(0, pool_blocks, (rows, n_blk), generator=torch.Generator().manual_seed(seed * 7919 + i))
            arr = pool[idx.numpy()].reshape(rows, -1)
            if p.qtype not in checked:  # the assembled bytes are what the encoder gives the float rows
                x = floats[idx[:4].reshape(-1)].reshape(4, -1)
                assert np.array_equal(encode(x, p.qtype), arr[:4]), p.name
                checked.add(p.qtype)
            yield p.name, arr

    t0 = time.perf_counter()
    write_gguf(w, out, plans, data(), progress=False, label="bigmodel", inputs=[tok.path])
    n_params = sum(math.prod(s) for s in shapes.values())
    print(f"{out}: {out.stat().st_size / 1e9:.3f} GB, {n_params / 1e9:.3f} G parameters "
          f"({n_params * 4 / 1e9:.1f} GB as float32), written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(cmd: list[str], interval: float = 0.05) -> dict:
    """Run ``cmd``; its peak RSS (the kernel's VmHWM, read just before it exits), the largest RssAnon
    seen, and RssAnon / RssFile at the sample where RSS was largest. Polling a running process,
    so the split is sampled; VmHWM is exact."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0, "max_anon": 0}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        s = _status(proc.pid)
        if s:
            peak["VmHWM"] = max(peak["VmHWM"], s.get("VmHWM", 0))
            peak["max_anon"] = max(peak["max_anon"], s.get("RssAnon", 0))
            if s.get("VmRSS", 0) > peak["VmRSS"]:
                peak |= {k: s[k] for k in ("VmRSS", "RssAnon", "RssFile") if k in s}
        time.sleep(interval)
    reader.join()
    peak["wall_s"] = time.perf_counter() - t0
    peak["rc"] = proc.returncode
    peak["output"] = "".join(lines)
    return peak


def expect(path: Path, n_ctx: int, n_batch: int = 2048, kv_bytes: int = 4) -> dict[str, int]:
    """File size + one layer's float32 scratch (one buffer per distinct matrix shape, the output
    head in blocks of ``ROW_BLOCK`` rows) + the KV cache perplexity makes for ``-c n_ctx -b n_batch``
    (``max(1, n_batch // n_ctx)`` parallel sequences of ``n_ctx`` cells, as llama-perplexity;
    ``kv_bytes`` per value)."""
    f = GGUFFile(path)
    mats = {(ROW_BLOCK if i.shape[0] > 2 * ROW_BLOCK else i.shape[0], *i.shape[1:])
            for n, i in f.tensor_infos.items() if len(i.shape) == 2 and n != "token_embd.weight"}
    scratch = sum(math.prod(s) * 4 for s in mats)
    n_layer = f.get("llama.block_count")
    d_kv = f.get("llama.embedding_length") // f.get("llama.attention.head_count") * f.get("llama.attention.head_count_kv")
    kv = 2 * n_layer * max(1, n_batch // n_ctx) * n_ctx * d_kv * kv_bytes
    size = path.stat().st_size
    return {"file": size, "scratch": scratch, "kv": kv, "total": size + scratch + kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--out", type=Path, default=Path("/tmp/big-7b-Q4_K_M.gguf"))
    mk.add_argument("--layers", type=int, default=32)
    mk.add_argument("--embd", type=int, default=4096)
    mk.add_argument("--heads", type=int, default=32)
    mk.add_argument("--kv-heads", type=int, default=32)
    mk.add_argument("--ff", type=int, default=11008)
    mk.add_argument("--threads", type=int, default=2)
    mk.add_argument("--pool", type=int, default=1 << 16, help="random super-blocks encoded per type")
    ms = sub.add_parser("measure")
    ms.add_argument("command", nargs=argparse.REMAINDER)
    ex = sub.add_parser("expect")
    ex.add_argument("--file", type=Path, default=Path("/tmp/big-7b-Q4_K_M.gguf"))
    ex.add_argument("-c", type=int, default=512)
    ex.add_argument("-b", type=int, default=2048)
    ex.add_argument("--kv-bytes", type=int, default=4)
    a = ap.parse_args()
    if a.cmd == "make":
        torch.set_num_threads(a.threads)
        make(a.out, a.layers, a.embd, a.heads, a.kv_heads, a.ff, pool_blocks=a.pool)
    elif a.cmd == "measure":
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        r = measure(cmd)
        print(r.pop("output"), end="")
        mib = {k: f"{v / 2**20:,.0f} MiB" for k, v in r.items() if k not in ("wall_s", "rc")}
        print(f"peak: {mib} wall {r['wall_s']:.1f} s rc {r['rc']}")
    else:
        e = expect(a.file, a.c, a.b, a.kv_bytes)
        print({k: f"{v / 2**20:,.0f} MiB" for k, v in e.items()})


if __name__ == "__main__":
    main()
