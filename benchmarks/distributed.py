"""Data-parallel scaling: the same perplexity and HellaSwag runs on 1 and 2 torchrun ranks, one
thread per rank, timed end to end (the CLI as a user runs it: start-up and model load included),
modes interleaved, best of rounds. SmolLM2-135M Q4_1 (the registry fixture).

    python benchmarks/distributed.py [--rounds 3] [--chunks 32] [--tasks 32]

Checks on the way that the printed lines are byte-identical for every N (else it stops).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from gguf_runtime import fixtures


def run(args: list[str], n: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "gguf_runtime", *args]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "gguf_runtime", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=32)
    a = ap.parse_args()
    sh = fixtures.shared_dir()
    smol = str(fixtures.smollm2_path())
    work = {
        "perplexity SmolLM2 Q4_1 -c 256 (tok/s)": (["perplexity", "-m", smol, "-f", str(sh / "data" / "wikitext-2-test.txt"),
                                                    "-c", "256", "-b", "256", "-t", "1", "--chunks", str(a.chunks),
                                                    "--no-progress"], a.chunks * 256),
        "HellaSwag SmolLM2 Q4_1 (tasks/s)": (["perplexity", "-m", smol, "-f", str(sh / "data" / "hellaswag_val_full.txt.bz2"),
                                              "--hellaswag", "-t", "1", "--hellaswag-tasks", str(a.tasks), "-c", "256",
                                              "--no-progress"], a.tasks),
    }
    print(f"| workload | N=1 | N=2 | speed-up |\n|---|---:|---:|---:|")
    for name, (args, units) in work.items():
        best = {1: float("inf"), 2: float("inf")}
        ref = None
        for _ in range(a.rounds):
            for n in (1, 2):  # interleaved, so drifting load hits both alike
                s, out = run(args, n)
                if ref is None:
                    ref = out
                if out != ref:
                    raise SystemExit(f"{name}: N={n} printed other bytes")
                best[n] = min(best[n], s)
        r1, r2 = units / best[1], units / best[2]
        print(f"| {name} | {r1:,.1f} | {r2:,.1f} | {r2 / r1:.2f}x |")


if __name__ == "__main__":
    main()
