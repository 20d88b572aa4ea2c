"""A/B: the same workloads on two commits of this repository, in one run, on the same machine.

    python benchmarks/ab.py [--a fdf0a42] [--b HEAD] [--rounds 3 | --paired 12] [--threads 2]
                            [--only ppl-tiny,mamba] [--omp-env GOMP_SPINCOUNT=100000] [--keep] [--list]

Each commit is checked out with ``git worktree add --detach`` under /tmp/ab-<sha> (``--b .`` uses this
checkout as it is, uncommitted changes included) and every workload runs as a fresh ``python -c``
process with that tree as its cwd and PYTHONPATH, so the tree's own ``gguf_runtime`` is imported: the
installed editable finder is taken off ``sys.meta_path`` and a tree's ``[tool.setuptools.package-dir]``
remaps (before issue 13's restructure ``gguf_runtime.convert`` lived in ``convert/`` and
``gguf_runtime.cli`` in ``cli/``) are honoured; a process that imported a ``gguf_runtime`` module from
outside its tree fails. The workloads are written against both APIs (``gguf_runtime.perplexity`` /
``gguf_runtime.tools.perplexity``, ``reader`` / ``gguf.reader``, ``ops.set_invariant`` /
``numerics``) and mirror benchmarks/perplexity.py, mamba.py, mamba2.py, embed.py, realmodels.py and
decode_step.py without their transformers/llama.cpp columns. Rounds interleave the trees
(A B A B ...); the table keeps each tree's best round (wall clock and process CPU time) and B/A.
Both trees get the same OpenMP environment (``--omp-env``, replacing any inherited OMP_WAIT_POLICY /
GOMP_SPINCOUNT) and the same torch thread count. Worktrees need ../shared beside them: /tmp/shared is
linked to this checkout's ../shared when absent. Worktrees are removed at the end unless ``--keep``.

``--paired N`` is for a machine whose speed drifts by more than the difference sought (a shared VM
seen here swinging 130-210 sentences/s on one tree within minutes): each tree's workload process
sets up once (model, data, warm-up) and stays up, then the driver has them time the workload in
turns, A B, B A, A B, ... for N pairs, so the two runs of a pair are seconds apart and a slow phase
falls on both. The table gives each tree's best and median and the median and quartiles of the N
per-pair ratios, the figure to read on such a machine.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_A = "fdf0a42"  # the session-2 tree, the last commit before issue 13's restructure (f89c3f0)

# Every workload process starts with this: only the tree's own gguf_runtime may be imported.
PRELUDE = r'''
import importlib, importlib.util, json, os, sys, time
TREE = os.path.realpath(os.environ["AB_TREE"])
SMOKE = os.environ.get("AB_SMOKE") == "1"  # --smoke: tiny sizes, to check a workload runs
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
_MAP = json.loads(os.environ.get("AB_PKG_DIRS", "{}"))

class _TreeFinder:
    """The tree's setuptools package-dir remaps (e.g. gguf_runtime.convert -> convert/)."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        d = _MAP.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"), submodule_search_locations=[d])

sys.meta_path.insert(0, _TreeFinder)

def first(*names):
    """The first of these modules that exists in this tree (the APIs moved in issue 13)."""
    err = None
    for n in names:
        try:
            return importlib.import_module(n)
        except ModuleNotFoundError as e:
            if not (e.name and (n == e.name or n.startswith(e.name + "."))):
                raise
            err = e
    raise err

def no_invariant():
    try:
        from gguf_runtime import numerics
    except ImportError:
        from gguf_runtime import ops
        ops.set_invariant(False)
    else:
        numerics.enter(numerics.Numerics(invariant=False))

def check_tree():
    bad = sorted(n for n, m in list(sys.modules.items()) if n.split(".")[0] == "gguf_runtime"
                 and getattr(m, "__file__", None) and not os.path.realpath(m.__file__).startswith(TREE + os.sep))
    if bad:
        raise SystemExit("imported from outside " + TREE + ": " + ", ".join(bad))

def result(wall, cpu):
    check_tree()
    import gguf_runtime
    print("AB_FILE", gguf_runtime.__file__)
    print("AB_RESULT", repr(float(wall)), repr(float(cpu)), flush=True)

def measure(once):
    """``once()`` -> (wall figure, CPU figure), run once; with --paired (AB_PAIRED=1) the process
    stays up after its set-up and runs it again for every "run" line the driver writes to stdin."""
    if os.environ.get("AB_PAIRED") != "1":
        result(*once())
        return
    check_tree()
    import gguf_runtime
    print("AB_READY", gguf_runtime.__file__, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        result(*once())

class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self
    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c

import torch
torch.set_num_threads(int(os.environ["AB_THREADS"]))
from gguf_runtime import fixtures
from gguf_runtime.models import load_model
from gguf_runtime.tokenizer import Tokenizer
GGUFFile = first("gguf_runtime.gguf.reader", "gguf_runtime.reader").GGUFFile
perplexity = first("gguf_runtime.tools.perplexity", "gguf_runtime.perplexity").perplexity
SHARED = fixtures.shared_dir()
if SHARED is None:
    raise SystemExit("no ../shared beside " + TREE)

def wiki_tokens(path, n_bytes=200_000):
    text = (SHARED / "data" / "wikitext-2-test.txt").read_bytes()[:n_bytes]
    tok = Tokenizer.from_gguf(GGUFFile(path))
    return tok, torch.tensor(tok.encode(text.decode("utf-8", errors="ignore"), add_special=True))
'''

PROBE = r'''
check_tree()
import gguf_runtime
mods = ["gguf_runtime"] + sorted(_MAP)
for n in mods:
    print("AB_PROBE", n, importlib.import_module(n).__file__)
check_tree()
'''

# benchmarks/perplexity.py: llama-tiny f32, first 200,000 bytes of wikitext-2, -c 128 -b 2048, 683 chunks.
PPL_TINY = r'''
from gguf_runtime.device import keep_host_memory
keep_host_memory()
if NO_INVARIANT:
    no_invariant()
path = SHARED / "models" / "gguf" / "llama-tiny-f32.gguf"
tok, tokens = wiki_tokens(path)
n_ctx, n_batch = 128, 2048
n_chunks = min(CHUNKS, len(tokens) // n_ctx)
model = load_model(path)
perplexity(model, tokens, n_ctx, n_chunks=2, bos=tok.bos_id)  # warm-up (matmul self-test)
n = n_chunks * n_ctx
def once():
    with Clock() as c:
        perplexity(model, tokens, n_ctx, n_batch, n_chunks=n_chunks, bos=tok.bos_id)
    return n / c.wall, n / c.cpu
measure(once)
'''

# benchmarks/mamba.py (128 chunks) and mamba2.py's invariant row (100 chunks): -c 128, 16 chunks a batch.
PPL_MAMBA = r'''
path = SHARED / "models" / "gguf" / FILE
tok, tokens = wiki_tokens(path)
n_chunks = min(CHUNKS, len(tokens) // 128)
model = load_model(path)
perplexity(model, tokens, 128, n_chunks=16, bos=tok.bos_id)  # warm-up (matmul self-test, workspace)
n = n_chunks * 128
def once():
    with Clock() as c:
        perplexity(model, tokens, 128, 128 * 16, n_chunks=n_chunks, bos=tok.bos_id)
    return n / c.wall, n / c.cpu
measure(once)
'''

# benchmarks/embed.py (ours only): MiniLM converted by the tree's own converter (kept in this run's
# scratch folder between rounds), 1000 WikiText-2 snippets, -b 2048, mean pooling, after a 64-text warm-up.
EMBED = r'''
import random
from pathlib import Path
convert = first("gguf_runtime.convert.hf").convert
Embedder = first("gguf_runtime.tools.embedding", "gguf_runtime.embedding").Embedder
lines = [ln.strip() for ln in (SHARED / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8").splitlines()
         if len(ln.strip()) > 40]
rnd = random.Random(0)
data = []
while len(data) < N_TEXTS:
    s = rnd.choice(lines)
    a = rnd.randrange(0, len(s) // 2)
    data.append(s[a:a + rnd.randint(5, 240)].strip())
gguf = Path(os.environ["AB_SCRATCH"]) / "minilm-f32.gguf"
if not gguf.exists():
    convert(fixtures.minilm_dir(), gguf, "f32", progress=False)
f = GGUFFile(gguf)
tok, model = Tokenizer.from_gguf(f), load_model(f, device="cpu", dtype=torch.float32)
emb = Embedder(model, n_batch=2048, n_ubatch=None)
torch.stack(emb.embed(data[:64], tok, 2))  # warm-up
def once():
    with Clock() as c:
        torch.stack(emb.embed(data, tok, 2))
    return len(data) / c.wall, len(data) / c.cpu
measure(once)
'''

# benchmarks/realmodels.py's "ours (invariant, resident)": SmolLM2-135M Q4_1, -c 512 -b 2048.
PPL_SMOL = r'''
path = fixtures.smollm2_path()
tok, tokens = wiki_tokens(path)
model = load_model(path)
perplexity(model, tokens, n_ctx=512, n_batch=2048, n_chunks=1, bos=tok.bos_id)  # warm-up (packing, scratch)
n = CHUNKS * 512
def once():
    with Clock() as c:
        perplexity(model, tokens, n_ctx=512, n_batch=2048, n_chunks=CHUNKS, bos=tok.bos_id)
    return n / c.wall, n / c.cpu
measure(once)
'''

# benchmarks/decode_step.py's invariant case: SmolLM2 resident, 16-token prompt, then single-token
# steps; the median of STEPS timed steps after 2 untimed ones.
DECODE = r'''
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
model = load_model(fixtures.smollm2_path())
import statistics
def once():
    ctx = Context(model, n_ctx=256)  # (a fresh context each time: --paired runs this again)
    ctx.decode(Batch(list(range(1, 17))))
    walls, cpus = [], []
    for i in range(2 + STEPS):
        with Clock() as c:
            ctx.decode(Batch([100 + i]))
        if i >= 2:
            walls.append(c.wall)
            cpus.append(c.cpu)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3
measure(once)
'''

# name: (description, unit, higher is better, code)
WORKLOADS = {
    "ppl-tiny": ("perplexity llama-tiny f32, -c 128, 683 chunks (perplexity.py)", "tok/s", True,
                 "NO_INVARIANT, CHUNKS = False, 4 if SMOKE else 683\n" + PPL_TINY),
    "ppl-tiny-noinv": ("same, --no-invariant", "tok/s", True, "NO_INVARIANT, CHUNKS = True, 4 if SMOKE else 683\n" + PPL_TINY),
    "mamba": ("Mamba perplexity, mamba-tiny f32, 128 chunks (mamba.py)", "tok/s", True,
              "FILE, CHUNKS = 'mamba-tiny-f32.gguf', 16 if SMOKE else 128\n" + PPL_MAMBA),
    "mamba2": ("Mamba2 perplexity, mamba2-tiny f32, 100 chunks (mamba2.py)", "tok/s", True,
               "FILE, CHUNKS = 'mamba2-tiny-f32.gguf', 16 if SMOKE else 100\n" + PPL_MAMBA),
    "embed": ("MiniLM embeddings, 1000 texts (embed.py, ours only)", "sentences/s", True, "N_TEXTS = 64 if SMOKE else 1000\n" + EMBED),
    "smollm2-ppl": ("perplexity SmolLM2-135M Q4_1, -c 512, 8 chunks (realmodels.py)", "tok/s", True,
                    "CHUNKS = 1 if SMOKE else 8\n" + PPL_SMOL),
    "smollm2-decode": ("decode batch 1, SmolLM2 resident, median of 24 steps (decode_step.py)", "ms/step", False,
                       "STEPS = 2 if SMOKE else 24\n" + DECODE),
}


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Tree:
    """One side of the comparison: a commit checked out as a worktree (or this checkout, for '.')."""

    def __init__(self, label: str, rev: str):
        self.label, self.rev = label, rev
        self.created = False
        self.scratch = Path()  # set by main: this run's scratch folder for the tree
        if rev == ".":
            self.sha = git("rev-parse", "HEAD")
            self.path = REPO
            self.name = f"{self.sha[:7]}+uncommitted"
        else:
            self.sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
            self.path = Path(f"/tmp/ab-{self.sha[:12]}")
            self.name = self.sha[:7]
        self.subject = git("log", "-1", "--format=%s", self.sha)[:90]

    def checkout(self) -> None:
        if self.path == REPO:
            return
        if self.path.exists():
            try:
                same = git("rev-parse", "HEAD", cwd=self.path) == self.sha and not git("status", "--porcelain", "-uno", cwd=self.path)
            except subprocess.CalledProcessError:
                same = False
            if same:
                print(f"# {self.label}: reusing {self.path}")
                self.created = True
                return
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO, capture_output=True)
            git("worktree", "prune")
            if self.path.exists():
                raise SystemExit(f"{self.path} exists and is not a worktree of {self.sha[:7]}; remove it first")
        git("worktree", "add", "--detach", str(self.path), self.sha)
        self.created = True

    def remove(self) -> None:
        if self.created:
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO, capture_output=True)
            git("worktree", "prune")

    def layout(self) -> tuple[Path, dict[str, str]]:
        """PYTHONPATH root and package-dir remaps from the tree's pyproject.toml."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        pp = self.path / "pyproject.toml"
        cfg = tomllib.loads(pp.read_text()) if pp.exists() else {}
        pkg_dir = cfg.get("tool", {}).get("setuptools", {}).get("package-dir", {}) or {}
        root = (self.path / pkg_dir.get("", ".")).resolve()
        remaps = {}
        for pkg, d in pkg_dir.items():
            if pkg and (root / pkg.replace(".", "/")).resolve() != (self.path / d).resolve():
                remaps[pkg] = str((self.path / d).resolve())
        return root, remaps


def env_for(tree: Tree, threads: int, omp_env: list[str], smoke: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH") and not k.startswith("AB_")}
    for kv in omp_env:
        k, _, v = kv.partition("=")
        env[k] = v
    root, remaps = tree.layout()
    if smoke:
        env["AB_SMOKE"] = "1"
    env.update(PYTHONPATH=str(root), AB_TREE=str(tree.path), AB_PKG_DIRS=json.dumps(remaps), AB_THREADS=str(threads),
               AB_SCRATCH=str(tree.scratch))
    return env


def run(tree: Tree, code: str, env: dict[str, str], timeout: float) -> tuple[float, float, str] | str:
    """(wall figure, CPU figure, gguf_runtime.__file__) or an error line."""
    try:
        p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=tree.path, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    out = p.stdout
    res = [ln.split() for ln in out.splitlines() if ln.startswith("AB_RESULT ")]
    files = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("AB_FILE ")]
    if p.returncode or not res:
        return failure(p.returncode, p.stderr.strip() or out.strip())
    return float(res[-1][1]), float(res[-1][2]), files[-1] if files else "?"


def failure(rc: int, output: str) -> str:
    """A failed workload process in one line: its exit status and the last lines it wrote."""
    return f"rc={rc}: " + " | ".join(output.splitlines()[-6:])


class Worker:
    """One tree's workload process kept up for --paired: it sets up (model, data, warm-up) once,
    prints AB_READY, then times the workload once for each "run" line it reads."""

    def __init__(self, tree: Tree, code: str, env: dict[str, str]):
        self.tree, self.lines = tree, queue.Queue()
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=tree.path,
                                  env=dict(env, AB_PAIRED="1"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for ln in self.p.stdout:
            self.lines.put(ln)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            try:
                ln = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"timed out after {timeout:.0f} s") from None
            if ln is None:
                self.p.wait()
                self.err.seek(0)
                raise RuntimeError(failure(self.p.returncode, self.err.read().strip()))
            if ln.startswith(prefix):
                return ln.split()

    def once(self, timeout: float) -> tuple[float, float]:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        r = self.wait_for("AB_RESULT ", timeout)
        return float(r[1]), float(r[2])

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.close()
                self.p.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
        self.err.close()


def paired(trees: list[Tree], name: str, n: int, env_of, timeout: float) -> list[list[tuple[float, float]]] | str:
    """Both trees' workers set up and kept up, then ``n`` pairs of runs, in the order A B, B A, A B,
    ...: the two sides of a pair are seconds apart, so a slow phase of the machine falls on both."""
    workers = []
    try:
        for t in trees:  # one set-up at a time (fixture downloads, conversion, calibration, warm-up)
            workers.append(Worker(t, WORKLOADS[name][3], env_of(t)))
            workers[-1].wait_for("AB_READY ", timeout)
        res: list[list[tuple[float, float]]] = [[], []]
        for i in range(n):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                res[j].append(workers[j].once(timeout))
            (a_w, _), (b_w, _) = res[0][-1], res[1][-1]
            print(f"pair {i + 1:2d} {name:15s} A {a_w:12,.2f}  B {b_w:12,.2f}  B/A {b_w / a_w:.3f}  "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
        return res
    except RuntimeError as e:
        return str(e)
    finally:
        for w in workers:
            w.close()


def best(vals: list[float], hi: bool) -> float:
    return max(vals) if hi else min(vals)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def all_paired(trees: list[Tree], names: list[str], n: int, env_of, timeout: float) -> tuple[dict, dict]:
    """--paired: each workload's pairs (name -> [A runs, B runs]) and failures (name -> line)."""
    results, errors = {}, {}
    for name in names:
        r = paired(trees, name, n, env_of, timeout)
        if isinstance(r, str):
            errors[name] = r
            print(f"{name:15s} FAILED {r}", flush=True)
        else:
            results[name] = r
    return results, errors


def all_rounds(trees: list[Tree], names: list[str], rounds: int, env_of, timeout: float) -> tuple[dict, dict]:
    """--rounds: every workload as a fresh process per tree and round, trees alternating;
    (name, label) -> runs, and failures (name, label) -> line."""
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    errors: dict[tuple[str, str], str] = {}
    for rnd in range(rounds):
        for name in names:
            desc, unit, hi, code = WORKLOADS[name]
            for t in trees:
                r = run(t, code, env_of(t), timeout)
                if isinstance(r, str):
                    errors[(name, t.label)] = r
                    print(f"round {rnd + 1} {name:15s} {t.label} {t.name}: FAILED {r}", flush=True)
                    continue
                results.setdefault((name, t.label), []).append(r[:2])
                print(f"round {rnd + 1} {name:15s} {t.label} {t.name}: {r[0]:12,.2f} {unit} wall "
                      f"{r[1]:12,.2f} CPU  (load {os.getloadavg()[0]:.2f}; {r[2]})", flush=True)
    return results, errors


def report_rounds(trees: list[Tree], names: list[str], results: dict, errors: dict, setting: str) -> None:
    A, B = trees
    print(f"\n## A/B: A = {A.name} ({A.rev}), B = {B.name} ({B.rev}); {setting}\n")
    print(f"| workload | unit | A {A.name} | B {B.name} | B/A | A CPU | B CPU | B/A CPU | rounds A / B (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        desc, unit, hi, _ = WORKLOADS[name]
        ra, rb = results.get((name, "A")), results.get((name, "B"))
        if not ra or not rb:
            why = errors.get((name, "A")) or errors.get((name, "B")) or "no result"
            print(f"| {desc} | {unit} | | | failed: {why[:120]} | | | | |")
            continue
        aw, bw = best([w for w, _ in ra], hi), best([w for w, _ in rb], hi)
        ac, bc = best([c for _, c in ra], hi), best([c for _, c in rb], hi)
        spread = " ".join(f"{w:,.4g}" for w, _ in ra) + " / " + " ".join(f"{w:,.4g}" for w, _ in rb)
        print(f"| {desc} | {unit} | {aw:,.2f} | {bw:,.2f} | {bw / aw:.3f} | {ac:,.2f} | {bc:,.2f} | {bc / ac:.3f} | {spread} |")
    print("\nB/A above 1 means B is faster for tok/s and sentences/s, slower for ms/step. CPU: process CPU time "
          "(all threads, OpenMP spinning included).")


def report_paired(trees: list[Tree], names: list[str], results: dict, errors: dict, setting: str) -> None:
    A, B = trees
    print(f"\n## A/B, paired: A = {A.name} ({A.rev}), B = {B.name} ({B.rev}); {setting}\n")
    print(f"| workload | unit | A best | B best | B/A best | A median | B median | B/A of pairs: median | "
          f"quartiles | pairs B ahead |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name in names:
        desc, unit, hi, _ = WORKLOADS[name]
        res = results.get(name)
        if res is None:
            print(f"| {desc} | {unit} | | | failed: {errors.get(name, 'no result')[:120]} | | | | | |")
            continue
        aw, bw = [w for w, _ in res[0]], [w for w, _ in res[1]]
        ratios = [b / a for a, b in zip(aw, bw)]
        ahead = sum((r > 1) == hi for r in ratios if r != 1)
        print(f"| {desc} | {unit} | {best(aw, hi):,.2f} | {best(bw, hi):,.2f} | {best(bw, hi) / best(aw, hi):.3f} | "
              f"{statistics.median(aw):,.2f} | {statistics.median(bw):,.2f} | {statistics.median(ratios):.3f} | "
              f"{quantile(ratios, 0.25):.3f} - {quantile(ratios, 0.75):.3f} | {ahead} of {len(ratios)} |")
    print("\nB/A above 1 means B is faster for tok/s and sentences/s, slower for ms/step. B/A of pairs: each pair's "
          "two runs seconds apart, so the machine's slow phases cancel; the median and quartiles of those ratios.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default=DEFAULT_A, help=f"baseline commit (default {DEFAULT_A}, before issue 13)")
    ap.add_argument("--b", default="HEAD", help="commit to compare ('.': this checkout with its changes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each running every workload on A then B")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every workload")
    ap.add_argument("--only", default=None, help="comma-separated workloads (default: all; --list names them)")
    ap.add_argument("--omp-env", action="append", default=None, metavar="K=V",
                    help="OpenMP environment for both trees (repeatable; default GOMP_SPINCOUNT=100000)")
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="keep both trees' workload processes up and run N pairs of timed runs, trees "
                         "alternating (for a noisy machine); --rounds is then ignored")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per workload process")
    ap.add_argument("--keep", action="store_true", help="keep the worktrees")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that each workload runs")
    a = ap.parse_args()
    if a.list:
        for k, (desc, unit, hi, _) in WORKLOADS.items():
            print(f"{k:16s} {unit:12s} {desc}")
        return
    names = list(WORKLOADS) if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    omp_env = a.omp_env or ["GOMP_SPINCOUNT=100000"]

    shared = REPO.parent / "shared"
    link = Path("/tmp/shared")
    if not link.exists() and shared.is_dir():
        link.symlink_to(shared)
    elif link.exists() and shared.is_dir() and link.resolve() != shared.resolve():
        print(f"# warning: {link} -> {link.resolve()}, not {shared}")

    trees = [Tree("A", a.a), Tree("B", a.b)]
    scratch = Path(tempfile.mkdtemp(prefix="ab-scratch-"))
    for t in trees:
        t.scratch = scratch / t.label
        t.scratch.mkdir()
    ours = {k: v for k, v in os.environ.items() if k.startswith("GGUF_RUNTIME_")}
    load0 = loadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {a.threads} threads, "
          f"{f'{a.paired} pairs' if a.paired else f'{a.rounds} round(s)'}, "
          f"env {' '.join(omp_env)}, load average before {load0}")
    if ours:
        print(f"# inherited by both trees: {' '.join(f'{k}={v}' for k, v in sorted(ours.items()))}")
    try:
        for t in trees:
            t.checkout()
            root, remaps = t.layout()
            print(f"# {t.label} = {t.name} ({t.rev}): {t.subject}")
            print(f"#   tree {t.path}, PYTHONPATH {root}, package-dir remaps {remaps or 'none'}")
            r = subprocess.run([sys.executable, "-c", PRELUDE + PROBE], cwd=t.path, env=env_for(t, a.threads, omp_env),
                               capture_output=True, text=True, timeout=300)
            for ln in r.stdout.splitlines():
                if ln.startswith("AB_PROBE "):
                    print("#   " + ln[9:])
            if r.returncode:
                raise SystemExit(f"{t.label}: the tree does not import: {r.stderr.strip().splitlines()[-1:]}")

        def env_of(t: Tree) -> dict[str, str]:
            return env_for(t, a.threads, omp_env, a.smoke)

        if a.paired:
            results, errors = all_paired(trees, names, a.paired, env_of, a.timeout)
        else:
            results, errors = all_rounds(trees, names, a.rounds, env_of, a.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not a.keep:
            for t in trees:
                t.remove()
    setting = (f"{a.threads} threads, {' '.join(omp_env)}, " + (f"{a.paired} pairs" if a.paired else f"best of {a.rounds}")
               + f"; load average {load0} before, {loadavg()} after")
    (report_paired if a.paired else report_rounds)(trees, names, results, errors, setting)
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv))


if __name__ == "__main__":
    main()
