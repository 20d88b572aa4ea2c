"""HellaSwag throughput: ours against transformers scoring the same tasks the same way, one run.

    python benchmarks/hellaswag.py [--tasks 100] [--threads 2] [--model FILE]

Tasks are chosen as llama-perplexity chooses them (mt19937 seeded with 1) from
../shared/data/hellaswag_val_full.txt.bz2. Both score each ending by the mean log-probability of its
tokens after the part shared by the four endings, from the same token ids; transformers loads the same
GGUF (dequantized to f32) and runs the four sequences of several tasks as one right-padded batch.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402

from gguf_runtime import fixtures
from gguf_runtime.tools import tasks
from gguf_runtime.models import load_model
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer


def transformers_hellaswag(path: Path, tok, chosen, tasks_per_batch: int = 8) -> tuple[list[bool], float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    seqs = [[tok.encode(t.context + " " + e, add_special=True) for e in t.endings] for t in chosen]
    correct: list[bool] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(chosen), tasks_per_batch):
            group = seqs[b:b + tasks_per_batch]
            flat = [s for g in group for s in g]
            n = max(len(s) for s in flat)
            ids = torch.zeros(len(flat), n, dtype=torch.long)
            mask = torch.zeros(len(flat), n, dtype=torch.long)
            for i, s in enumerate(flat):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.double(), -1)
            for k, g in enumerate(group):
                cp = tasks.common_prefix(g)
                scores = []
                for s, seq in enumerate(g):
                    row = 4 * k + s
                    tgt = torch.tensor(seq[cp:])
                    scores.append(float(logp[row, cp - 1:len(seq) - 1].gather(-1, tgt[:, None]).mean()))
                correct.append(max(range(4), key=lambda s: (scores[s], -s)) == chosen[b + k].gold)
    return correct, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = a.model or fixtures.smollm2_path()
    data = tasks.read_prompt_file(fixtures.shared_dir() / "data" / "hellaswag_val_full.txt.bz2")
    chosen = tasks.select_hellaswag(tasks.load_hellaswag(data.decode("utf-8")), a.tasks)
    f = GGUFFile(path)
    tok = Tokenizer.from_gguf(f)
    ctx = tasks.make_task_context(load_model(f, device=a.device))
    tasks.hellaswag(ctx, tok, chosen[:2])  # warm-up (matmul self-test)
    r = tasks.hellaswag(ctx, tok, chosen)
    hf_correct, hf_s = transformers_hellaswag(path, tok, chosen)
    n = len(chosen)
    agree = sum(x == y for x, y in zip(r.correct, hf_correct))
    print(f"{path.name}, {n} HellaSwag tasks, {a.threads} threads")
    print(f"{'':14s} {'acc_norm':>9s} {'tasks/s':>8s}")
    print(f"{'gguf-runtime':14s} {100 * r.accuracy:8.2f}% {r.tasks_per_s:8.2f}")
    print(f"{'transformers':14s} {100 * sum(hf_correct) / n:8.2f}% {n / hf_s:8.2f}")
    print(f"same verdict on {agree}/{n} tasks")


if __name__ == "__main__":
    main()
