"""Cost of batch invariance: invariant vs fastest mode, same model, same run.

Prefill of 512 tokens, decode at batch 1 (one sequence, one token per step) and decode at batch 64
(64 sequences, one token each per step), on llama-tiny f32 and SmolLM2-135M (Q4_1 dequantized to
f32). The two modes alternate round by round; each figure is the best of ``--reps`` rounds (on a
shared machine interference only ever adds time). Prints a markdown table of ms per step and the
invariant/fast ratio.

    python benchmarks/invariance.py [--threads 2] [--reps 5] [--cpu-time] [--weights resident,quant]

``--weights``: the weights modes to measure (``quant``: the fused kernel on the file's blocks,
invariant by construction, so its cost is attention's and the norms' alone). OpenMP waits as the
CLI's do (``threads.set_wait_policy``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy

set_wait_policy()  # before torch starts its threads, as the CLI does

import torch  # noqa: E402

from gguf_runtime import fixtures, numerics
from gguf_runtime.kernels import calibrate
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.device import keep_host_memory
from gguf_runtime.models import load_model


CLOCK = time.perf_counter  # --cpu-time: time.thread_time (with --threads 1, the work runs on this thread)


def _timed(fn):
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def bench(model, reps, n_vocab):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, n_vocab, (512,), generator=g).tolist()

    def prefill():
        c = Context(model, n_ctx=600, n_batch=512, n_ubatch=512)
        c.decode(Batch(toks))

    def decode1():
        c = Context(model, n_ctx=600)
        c.decode(Batch(toks[:64]))
        t0 = CLOCK()
        for t in toks[64:96]:
            c.decode(Batch([t]))
        return (CLOCK() - t0) / 32

    def decode64():
        c = Context(model, n_ctx=64 * 40, n_batch=2048, n_seq_max=64)
        c.decode(Batch.from_sequences([toks[i:i + 16] for i in range(64)]))
        t0 = CLOCK()
        for step in range(8):
            c.decode(Batch.from_sequences([[toks[(i + step) % 512]] for i in range(64)]))
        return (CLOCK() - t0) / 8

    # modes interleaved round by round, so drifting machine load hits both alike
    work = {"prefill 512": lambda: _timed(prefill), "decode batch 1": decode1, "decode batch 64": decode64}
    samples = {(w, mode): [] for w in work for mode in (True, False)}
    for w, fn in work.items():
        for mode in (True, False):  # warm-up
            with numerics.use(numerics.Numerics(invariant=mode)):
                fn()
        for _ in range(reps):
            for mode in (True, False):
                with numerics.use(numerics.Numerics(invariant=mode)):
                    samples[(w, mode)].append(fn())
    out = {k: min(v) for k, v in samples.items()}  # best of reps: interference only ever adds time
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--weights", default="resident", help="comma-separated weights modes (resident, quant, lazy)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this thread's CPU time (use with --threads 1): steady on a shared machine")
    a = ap.parse_args()
    if a.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(a.threads)
    keep_host_memory()
    shared = fixtures.shared_dir()
    models = [("llama-tiny f32", shared / "models" / "gguf" / "llama-tiny-f32.gguf")]
    try:
        models.append(("SmolLM2-135M Q4_1", fixtures.smollm2_path()))
    except fixtures.FixtureUnavailable as e:
        print(f"(skipping SmolLM2: {e})")
    print(f"threads={a.threads} device={a.device or 'default'} clock={'thread CPU' if a.cpu_time else 'wall'} "
          f"self-test={calibrate.report()}")
    print("| model | weights | workload | invariant ms/step | fast ms/step | cost |")
    print("|---|---|---|---:|---:|---:|")
    for name, path in models:
        for mode in a.weights.split(","):
            m = load_model(Path(path), device=a.device, weights=mode)
            res = bench(m, a.reps, m.args.n_vocab)
            for w in ("prefill 512", "decode batch 1", "decode batch 64"):
                inv, fast = res[(w, True)] * 1e3, res[(w, False)] * 1e3
                print(f"| {name} | {m.weights} | {w} | {inv:.2f} | {fast:.2f} | {100 * (inv / fast - 1):+.0f}% |")


if __name__ == "__main__":
    main()
