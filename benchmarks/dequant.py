"""Dequantization throughput: GB/s of GGUF bytes turned into float32, gguf_runtime (native C loops
on CPU, torch kernels with GGUF_RUNTIME_NATIVE=0 and on CUDA) against gguf-py's numpy reference on
the same tensors in one run, and on CUDA when a device is present.

    python benchmarks/dequant.py                   # every type, random blocks, 2048 x 4096 values
    python benchmarks/dequant.py --file model.gguf # the tensors of a real file, grouped by type

Each result is checked bit for bit against gguf-py (NaN positions aside) before it is timed.
Prints a markdown table (best of --repeat runs). "out=" times ours writing into a preallocated
float32 tensor: the kernels alone, without faulting in fresh memory for the result; "torch out="
the same with the native loops switched off (GGUF_RUNTIME_NATIVE=0).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from gguf_runtime import GGUFFile, dequantize
from gguf_runtime.gguf.dequant import SUPPORTED

TYPES = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
    "TQ2_0", "MXFP4", "NVFP4",
]


CLOCK = time.perf_counter


def best(fn, repeat: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t0 = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - t0)
    return min(times)


def gguf_py(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with np.errstate(all="ignore"):
        out = gguf_dequantize(raw, qtype)
    return np.array(out, dtype=np.float32)  # F32/F16 come back as views: make every path produce an array


def check(ours: torch.Tensor, ref: np.ndarray, label: str) -> None:
    o, r = ours.cpu().numpy().reshape(-1), ref.reshape(-1)
    keep = ~np.isnan(r)
    if not (np.array_equal(np.isnan(o), ~keep) and np.array_equal(o.view(np.uint32)[keep], r.view(np.uint32)[keep])):
        raise SystemExit(f"{label}: result differs from gguf-py")


def workloads(args) -> dict[str, list[tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]]]:
    """type name -> list of (raw uint8 rows, qtype, torch shape)."""
    out: dict[str, list] = defaultdict(list)
    if args.file:
        for path in args.file:
            f = GGUFFile(path)
            for name, info in f.tensor_infos.items():
                if info.qtype in SUPPORTED and len(info.shape) >= 1:
                    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) or 1
                    out[info.qtype.name].append((np.array(f.raw(name)).reshape(rows, -1), info.qtype, info.shape))
        return out
    rng = np.random.default_rng(0)
    for name in args.types:
        qtype = GGMLQuantizationType[name]
        bs, ts = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(args.rows, args.cols // bs * ts), dtype=np.uint8)
        out[name].append((raw, qtype, (args.rows, args.cols)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--file", nargs="*", help="benchmark the tensors of these GGUF files instead")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--thread-time", action="store_true",
                    help="one CPU thread, timed by its CPU time (time.thread_time): steady numbers on a busy machine")
    args = ap.parse_args()
    if args.thread_time:
        global CLOCK
        CLOCK, args.threads = time.thread_time, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    clock = "CPU time of the thread" if args.thread_time else "wall clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({clock}), {platform.processor() or platform.machine()}"
          + (f", CUDA: {torch.cuda.get_device_name()}" if cuda else ", no CUDA device"))
    head = ("| type | MB | gguf-py GB/s | ours CPU GB/s | speed-up | ours CPU, out= GB/s | speed-up |"
            " torch out= GB/s | speed-up |"
            + (" ours CUDA GB/s | CUDA speed-up |" if cuda else ""))
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, items in workloads(args).items():
        n_bytes = sum(raw.nbytes for raw, _, _ in items)
        for raw, qtype, shape in items:
            check(dequantize(raw, qtype, shape), gguf_py(raw, qtype), name)
        t_ref = best(lambda: [gguf_py(raw, q) for raw, q, _ in items], args.repeat)
        t_cpu = best(lambda: [dequantize(raw, q, s) for raw, q, s in items], args.repeat)
        bufs = [torch.empty(s) for _, _, s in items]
        t_out = best(lambda: [dequantize(raw, q, s, out=o) for (raw, q, s), o in zip(items, bufs)], args.repeat)
        prev, os.environ["GGUF_RUNTIME_NATIVE"] = os.environ.get("GGUF_RUNTIME_NATIVE"), "0"
        try:
            for (raw, q, s), o in zip(items, bufs):
                check(dequantize(raw, q, s, out=o), gguf_py(raw, q), name + " (torch kernels)")
            t_torch = best(lambda: [dequantize(raw, q, s, out=o) for (raw, q, s), o in zip(items, bufs)], args.repeat)
        finally:
            if prev is None:
                del os.environ["GGUF_RUNTIME_NATIVE"]
            else:
                os.environ["GGUF_RUNTIME_NATIVE"] = prev
        del bufs
        row = (f"| {name} | {n_bytes / 1e6:.1f} | {n_bytes / t_ref / 1e9:.3f} | {n_bytes / t_cpu / 1e9:.3f} | "
               f"{t_ref / t_cpu:.1f}x | {n_bytes / t_out / 1e9:.3f} | {t_ref / t_out:.1f}x | "
               f"{n_bytes / t_torch / 1e9:.3f} | {t_ref / t_torch:.1f}x |")
        if cuda:
            dev = [(torch.from_numpy(raw).cuda(), q, s) for raw, q, s in items]
            for (raw, q, s), (ref_raw, _, _) in zip(dev, items):
                check(dequantize(raw, q, s), gguf_py(ref_raw, q), name + " (CUDA)")
            t_gpu = best(lambda: [dequantize(raw, q, s) for raw, q, s in dev], args.repeat, sync)
            row += f" {n_bytes / t_gpu / 1e9:.1f} | {t_ref / t_gpu:.0f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
