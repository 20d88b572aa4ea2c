"""Start-up, decode and contention against llama.cpp, in one run (issue 20).

    python benchmarks/decode.py [--rounds 3] [--bin /tmp/llamacpp-build/bin] [--threads T]
                                [--sections startup,decode,contention] [--parallel 8,32,64]

Every measurement runs as a fresh process, ours (``python -m gguf_runtime ...``) and llama.cpp's
interleaved (A B A B ...), and the best of ``--rounds`` rounds is kept. Sections:

1. **start-up**: SmolLM2-135M Q4_1 and gemma-3-270m Q4_K_M, prompt "Hello", one token (``-n 1
   --temp 0``). Ours: wall time from process start to the prompt decoded, split into Python start,
   ``import torch``, importing the package, CLI and tokenizer, model load, context, calibration
   (cached per machine, torch version and thread count: a lookup after the first run) and the prompt;
   plus the whole process. llama.cpp: the whole process of ``llama-simple -n 1`` and of
   ``llama-completion -no-cnv -n 1 -c 256``.
2. **decode** on SmolLM2 with ``-t T``: tokens/s at batch 1 (ours: ``generate -n 64 --temp 0``'s eval
   time line; llama.cpp: ``llama-bench -p 0 -n 64``) and with N parallel sequences sharing a 16-token
   prompt (ours: ``generate --parallel N -n 32``'s eval line, decode steps only; llama.cpp:
   ``llama-batched-bench -npp 16 -ntg 32 -npl N -pps``, its S_TG column), ours invariant and
   ``--no-invariant`` (the ratio is the invariance cost at decode).
3. **contention**: two busy background processes (``python -c "while True: pass"``), then
   ``generate -n 32`` and ``perplexity -c 128 --chunks 16`` (first 20,000 bytes of wikitext-2-test),
   default threads against ``-t 1``, ours and llama.cpp's (``llama-completion``'s eval line,
   ``llama-perplexity`` timed from its log stamps), under the same load.

The load average (``/proc/loadavg``) is printed beside each section: figures from a loaded machine
say so. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_runtime import fixtures  # noqa: E402  (no torch: fixtures only finds files)

PY = sys.executable
PROMPT16 = "The history of the city begins with a small village on the river, where farmers"

# Runs the CLI exactly as ``python -m gguf_runtime`` does, stamping wall-clock times on the way.
STAMPED = r"""
import json, sys, time
T = {"python": time.time()}
from gguf_runtime.threads import set_wait_policy
set_wait_policy()
import torch
T["torch"] = time.time()
from gguf_runtime import numerics
from gguf_runtime.cli import common
from gguf_runtime.tools import generate as gen
T["package"] = time.time()
def stamp(obj, name, before, after):
    f = getattr(obj, name)
    def w(*a, **k):
        if before:
            T.setdefault(before, time.time())
        r = f(*a, **k)
        T.setdefault(after, time.time())
        return r
    setattr(obj, name, w)
stamp(common, "open_model", "cli", "load")
stamp(numerics.Numerics, "linear_rule", "context", "calibration")
stamp(gen, "_prefill", None, "prompt")
from gguf_runtime.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
T["exit"] = time.time()
print("STAMPS " + json.dumps(T), file=sys.stderr)
"""
PHASES = ["python", "torch", "package", "cli", "load", "context", "calibration", "prompt"]


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def sh(cmd: list[str], env: dict | None = None, timeout: float = 900) -> tuple[float, float, str, str]:
    """(start wall clock, seconds, stdout, stderr) of one process; fails loudly on a non-zero exit."""
    t0w, t0 = time.time(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return t0w, dt, p.stdout, p.stderr


def ours(*args: str) -> list[str]:
    return [PY, "-m", "gguf_runtime", *args]


def eval_tps(err: str) -> float:
    """tokens/s of the (llama.cpp-style) ``eval time`` line, ours or llama_perf_context_print's."""
    m = re.findall(r"(?<!prompt )eval time =.*?([\d.]+) tokens per second", err)
    if not m:
        raise SystemExit("no eval time line in:\n" + err[-2000:])
    return float(m[-1])


def _stamp(text: str, marker: str) -> float:
    """Seconds of llama.cpp's log stamp (M.SS.mmm.uuu) on the entry ``marker`` starts."""
    m, s, ms, us = (int(x) for x in re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I " + re.escape(marker), text).groups())
    return m * 60 + s + ms / 1e3 + us / 1e6


class Best:
    """Best-of-rounds table: key -> best value (max for rates, min for times)."""

    def __init__(self):
        self.v: dict = {}

    def add(self, key, value, higher=True):
        old = self.v.get(key)
        if old is None or (value > old if higher else value < old):
            self.v[key] = value

    def __getitem__(self, key):
        return self.v.get(key, float("nan"))


def startup(args, models: dict[str, Path], best: Best, rounds: int) -> None:
    b = args.bin
    env = dict(os.environ, LD_LIBRARY_PATH=b)
    for name, path in models.items():  # warm the page cache and the calibration cache, untimed
        sh(ours("generate", "-m", str(path), "-p", "Hello", "-n", "1", "--temp", "0"))
    for r in range(rounds):
        for name, path in models.items():
            t0w, dt, _, err = sh([PY, "-c", STAMPED, "generate", "-m", str(path), "-p", "Hello", "-n", "1", "--temp", "0"])
            st = json.loads(re.search(r"^STAMPS (.*)$", err, re.M).group(1))
            prev = t0w
            for ph in PHASES:
                best.add(("start", name, ph), st[ph] - prev, higher=False)
                prev = st[ph]
            best.add(("start", name, "first"), st["prompt"] - t0w, higher=False)
            best.add(("start", name, "total"), dt, higher=False)
            _, dt, _, _ = sh([f"{b}/llama-simple", "-m", str(path), "-n", "1", "Hello"], env=env)
            best.add(("start", name, "simple"), dt, higher=False)
            _, dt, _, _ = sh([f"{b}/llama-completion", "-m", str(path), "-p", "Hello", "-n", "1", "-no-cnv",
                              "--temp", "0", "-c", "256"], env=env)
            best.add(("start", name, "completion"), dt, higher=False)
        print(f"start-up round {r + 1}/{rounds} done (load {loadavg()})", file=sys.stderr)


def decode(args, model: Path, best: Best, rounds: int) -> None:
    b, t = args.bin, str(args.threads)
    env = dict(os.environ, LD_LIBRARY_PATH=b)
    npl = [int(x) for x in args.parallel.split(",")]
    n_kv = 16 + 32 * max(npl) + 256
    for r in range(rounds):
        for inv in ("--invariant", "--no-invariant"):
            _, _, _, err = sh(ours(inv, "generate", "-m", str(model), "-p", PROMPT16, "-n", "64", "--temp", "0", "-t", t))
            best.add(("dec", inv, 1), eval_tps(err))
        _, _, out, _ = sh([f"{b}/llama-bench", "-m", str(model), "-p", "0", "-n", "64", "-r", "1", "-t", t, "-o", "json"], env=env)
        best.add(("dec", "lcpp", 1), float(json.loads(out)[0]["avg_ts"]))
        for n in npl:
            for inv in ("--invariant", "--no-invariant"):
                _, _, _, err = sh(ours(inv, "generate", "-m", str(model), "-p", PROMPT16, "-n", "32", "--temp", "0",
                                       "-t", t, "--parallel", str(n)))
                best.add(("dec", inv, n), eval_tps(err))
            _, _, out, _ = sh([f"{b}/llama-batched-bench", "-m", str(model), "-c", str(n_kv), "-npp", "16", "-ntg", "32",
                               "-npl", str(n), "-pps", "-t", t], env=env)
            row = [ln for ln in out.splitlines() if re.match(r"\|\s+16 \|\s+32 \|", ln)][-1]
            best.add(("dec", "lcpp", n), float(row.strip("|").split("|")[7]))  # S_TG t/s
        print(f"decode round {r + 1}/{rounds} done (load {loadavg()})", file=sys.stderr)


def contention(args, model: Path, best: Best, rounds: int) -> None:
    b = args.bin
    env = dict(os.environ, LD_LIBRARY_PATH=b)
    text = Path(args.wikitext).read_bytes()[:20000]
    busy = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(2.0)
        with tempfile.NamedTemporaryFile(suffix=".txt") as f:
            f.write(text)
            f.flush()
            for r in range(rounds):
                for tflag in ([], ["-t", "1"]):
                    key = "default" if not tflag else "-t 1"
                    _, _, _, err = sh(ours("generate", "-m", str(model), "-p", PROMPT16, "-n", "32", "--temp", "0", *tflag))
                    best.add(("cont", "ours", "gen", key), eval_tps(err))
                    _, _, _, err = sh([f"{b}/llama-completion", "-m", str(model), "-p", PROMPT16, "-n", "32", "-no-cnv",
                                       "--temp", "0", "-c", "256", *tflag], env=env)
                    best.add(("cont", "lcpp", "gen", key), eval_tps(err))
                    _, _, _, err = sh(ours("perplexity", "-m", str(model), "-f", f.name, "-c", "128", "--chunks", "16", *tflag))
                    best.add(("cont", "ours", "ppl", key), float(re.search(r"\(([\d.]+) tokens/s\)", err).group(1)))
                    _, _, _, err = sh([f"{b}/llama-perplexity", "-m", str(model), "-f", f.name, "-c", "128",
                                       "--chunks", "16", *tflag], env=env)
                    dt = _stamp(err, "Final estimate") - _stamp(err, "perplexity: calculating perplexity")
                    best.add(("cont", "lcpp", "ppl", key), 16 * 128 / dt)
                print(f"contention round {r + 1}/{rounds} done (load {loadavg()})", file=sys.stderr)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def report(best: Best, sections: set[str], models: dict, args, loads: dict) -> None:
    f = lambda x: f"{x:.2f}"  # noqa: E731
    if "startup" in sections:
        print(f"\n### Start-up (seconds, best of {args.rounds}; load average before: {loads['startup']})\n")
        print("| model | " + " | ".join(PHASES) + " | ours: to first token | ours: whole process | llama-simple | "
              "llama-completion | ours / llama-simple | ours / llama-completion |")
        print("|---" * (len(PHASES) + 7) + "|")
        for name in models:
            g = lambda k: best[("start", name, k)]  # noqa: E731
            print(f"| {name} | " + " | ".join(f(g(p)) for p in PHASES) +
                  f" | {f(g('first'))} | {f(g('total'))} | {f(g('simple'))} | {f(g('completion'))} | "
                  f"{g('total') / g('simple'):.1f}x | {g('total') / g('completion'):.1f}x |")
    if "decode" in sections:
        print(f"\n### Decode, SmolLM2-135M Q4_1, -t {args.threads} (tokens/s, best of {args.rounds}; "
              f"load average before: {loads['decode']})\n")
        print("| sequences | ours invariant | ours --no-invariant | invariance cost | llama.cpp | ours inv. / llama.cpp |")
        print("|---|---|---|---|---|---|")
        for n in [1] + [int(x) for x in args.parallel.split(",")]:
            a, c, ll = best[("dec", "--invariant", n)], best[("dec", "--no-invariant", n)], best[("dec", "lcpp", n)]
            print(f"| {n} | {a:.1f} | {c:.1f} | {c / a:.2f}x | {ll:.1f} | {a / ll:.2f} |")
    if "contention" in sections:
        print(f"\n### Contention: two busy processes, SmolLM2-135M Q4_1 (tokens/s, best of {args.rounds}; "
              f"load average before: {loads['contention']})\n")
        print("| run | ours default -t | ours -t 1 | default / -t 1 | llama.cpp default -t | llama.cpp -t 1 | "
              "ours default / llama.cpp default |")
        print("|---|---|---|---|---|---|---|")
        for what, label in (("gen", "generate -n 32 (eval)"), ("ppl", "perplexity -c 128 --chunks 16")):
            o, o1 = best[("cont", "ours", what, "default")], best[("cont", "ours", what, "-t 1")]
            ll, l1 = best[("cont", "lcpp", what, "default")], best[("cont", "lcpp", what, "-t 1")]
            print(f"| {label} | {o:.1f} | {o1:.1f} | {o / o1:.2f} | {ll:.1f} | {l1:.1f} | {o / ll:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", default=os.environ.get("LLAMA_CPP_BIN", "/tmp/llamacpp-build/bin"),
                    help="folder with llama-simple, llama-completion, llama-bench, llama-batched-bench, llama-perplexity")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="-t for the decode section")
    ap.add_argument("--sections", default="startup,decode,contention")
    ap.add_argument("--parallel", default="8,32,64", help="N for --parallel N / -npl N")
    ap.add_argument("--wikitext", default=str((fixtures.shared_dir() or Path(".")) / "data" / "wikitext-2-test.txt"))
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    models = {"SmolLM2-135M Q4_1": fixtures.smollm2_path(), "gemma-3-270m Q4_K_M": fixtures.gemma3_path()}
    smol = models["SmolLM2-135M Q4_1"]
    best, loads = Best(), {}
    print(f"load average at start: {loadavg()}; {os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}",
          file=sys.stderr)
    if "startup" in sections:
        loads["startup"] = loadavg()
        startup(args, models, best, args.rounds)
    if "decode" in sections:
        loads["decode"] = loadavg()
        decode(args, smol, best, args.rounds)
    if "contention" in sections:
        loads["contention"] = loadavg()
        contention(args, smol, best, args.rounds)
    report(best, sections, models, args, loads)
    print(f"\nload average at end: {loadavg()}")


if __name__ == "__main__":
    main()
