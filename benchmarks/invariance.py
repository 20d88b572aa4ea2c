"""Cost of batch invariance: invariant vs fastest mode, same model, same run.

Prefill of 512 tokens, decode at batch 1 (one sequence, one token per step) and decode at batch 64
(64 sequences, one token each per step), on llama-tiny f32 and SmolLM2-135M (Q4_1 dequantized to
f32). Prints a markdown table of ms per step and the invariant/fast ratio.

    python benchmarks/invariance.py [--threads 2] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gguf_runtime import fixtures, ops
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.models import load_model


def _time(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(model, reps, n_vocab):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, n_vocab, (512,), generator=g).tolist()

    def prefill():
        c = Context(model, n_ctx=600, n_batch=512, n_ubatch=512)
        c.decode(Batch(toks))

    def decode1():
        c = Context(model, n_ctx=600)
        c.decode(Batch(toks[:64]))
        t0 = time.perf_counter()
        for t in toks[64:96]:
            c.decode(Batch([t]))
        return (time.perf_counter() - t0) / 32

    def decode64():
        c = Context(model, n_ctx=64 * 40, n_batch=2048, n_seq_max=64)
        c.decode(Batch.from_sequences([toks[i:i + 16] for i in range(64)]))
        t0 = time.perf_counter()
        for step in range(8):
            c.decode(Batch.from_sequences([[toks[(i + step) % 512]] for i in range(64)]))
        return (time.perf_counter() - t0) / 8

    out = {}
    for mode in (True, False):
        ops.set_invariant(mode)
        out[("prefill 512", mode)] = _time(prefill, reps)
        decode1()
        out[("decode batch 1", mode)] = statistics.median(decode1() for _ in range(reps))
        decode64()
        out[("decode batch 64", mode)] = statistics.median(decode64() for _ in range(reps))
    ops.set_invariant(True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shared = fixtures.shared_dir()
    models = [("llama-tiny f32", shared / "models" / "gguf" / "llama-tiny-f32.gguf")]
    try:
        models.append(("SmolLM2-135M Q4_1", fixtures.smollm2_path()))
    except fixtures.FixtureUnavailable as e:
        print(f"(skipping SmolLM2: {e})")
    print(f"threads={a.threads} device={a.device or 'default'} self-test={ops.self_test()}")
    print("| model | workload | invariant ms/step | fast ms/step | cost |")
    print("|---|---|---:|---:|---:|")
    for name, path in models:
        m = load_model(Path(path), device=a.device)
        res = bench(m, a.reps, m.args.n_vocab)
        for w in ("prefill 512", "decode batch 1", "decode batch 64"):
            inv, fast = res[(w, True)] * 1e3, res[(w, False)] * 1e3
            print(f"| {name} | {w} | {inv:.2f} | {fast:.2f} | {100 * (inv / fast - 1):+.0f}% |")


if __name__ == "__main__":
    main()
