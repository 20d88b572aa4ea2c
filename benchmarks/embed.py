"""Embedding throughput: sentences/s of ours against sentence-transformers on the same texts, one run.

    python benchmarks/embed.py [--n 1000] [--threads 1] [--device cpu|cuda] [--dtype f32|bf16|f16] [--st-batch 32]

all-MiniLM-L6-v2 (the `minilm` fixture) is converted to an f32 GGUF by our converter; both sides
embed the same ``--n`` texts (WikiText-2 test lines cut to 5-240 characters, fixed seed) with mean
pooling and L2 normalisation, tokenization included, model loading excluded, after a warm-up.
sentence-transformers runs its own ``encode`` (length-sorted, padded batches of ``--st-batch``);
ours packs texts as separate sequences into ``-b`` token batches (no padding) and ubatches of ``-ub``.
Prints wall and process-CPU sentences/s (the CPU figure is steadier on a shared box) and the
agreement of the two (minimum cosine). ``--dtype`` sets the weights and compute dtype of both sides.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402

from gguf_runtime import fixtures, numerics
from gguf_runtime.convert.hf import convert
from gguf_runtime.tools.embedding import Embedder
from gguf_runtime.models import load_model
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer


def texts(n: int, seed: int = 0) -> list[str]:
    shared = fixtures.shared_dir()
    lines = [ln.strip() for ln in (shared / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8").splitlines()
             if len(ln.strip()) > 40]
    rnd = random.Random(seed)
    out = []
    while len(out) < n:
        s = rnd.choice(lines)
        a = rnd.randrange(0, len(s) // 2)
        out.append(s[a:a + rnd.randint(5, 240)].strip())
    return out


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of texts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="both sides' dtype")
    ap.add_argument("--st-batch", type=int, default=32, help="sentence-transformers batch size (its default: 32)")
    ap.add_argument("-b", "--batch-size", type=int, default=2048, help="our tokens per batch")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=0, help="our tokens per ubatch (0: the batch)")
    ap.add_argument("--no-invariant", action="store_true", help="ours without the batch-invariance padding")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.no_invariant:
        numerics.enter(numerics.Numerics(invariant=False))
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = texts(a.n)

    from sentence_transformers import SentenceTransformer

    minilm = fixtures.minilm_dir()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    st = SentenceTransformer(str(minilm), device=dev).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = convert(minilm, Path(tmp) / "minilm-f32.gguf", "f32", progress=False)
        f = GGUFFile(path)
        tok, model = Tokenizer.from_gguf(f), load_model(f, device=dev, dtype=dtype)
    emb = Embedder(model, n_batch=a.batch_size, n_ubatch=a.ubatch_size or None)

    def ours(ts):
        return torch.stack(emb.embed([t for t in ts], tok, 2))

    def theirs(ts):
        return st.encode(ts, batch_size=a.st_batch, convert_to_tensor=True).float()

    ours(data[:64]), theirs(data[:64])  # warm-up
    ref, st_w, st_c = timed(lambda: theirs(data))
    out, us_w, us_c = timed(lambda: ours(data))
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double().to(out.device), dim=-1)
    n_tok = sum(len(tok.encode(t, True, True)) for t in data)
    print(f"{a.n} texts, {n_tok} tokens, device {dev}, {a.dtype}, threads {torch.get_num_threads()}, "
          f"ours -b {emb.n_batch} -ub {emb.ctx.n_ubatch}{' (no invariance)' if a.no_invariant else ''}, "
          f"sentence-transformers batch {a.st_batch}")
    print("| | sentences/s wall | sentences/s CPU |\n|---|---|---|")
    print(f"| gguf-runtime | {a.n / us_w:,.1f} | {a.n / us_c:,.1f} |")
    print(f"| sentence-transformers | {a.n / st_w:,.1f} | {a.n / st_c:,.1f} |")
    print(f"ratio ours/theirs: wall {st_w / us_w:.2f}x, CPU {st_c / us_c:.2f}x; min cosine {cos.min().item():.7f}")


if __name__ == "__main__":
    main()
