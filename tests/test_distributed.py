"""Data-parallel and resumable evaluation (issue 17): the printed lines are byte-identical for one
process, two processes under torchrun (gloo), and a run killed with SIGKILL then resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gguf_runtime.tools.distributed import DistError, ResumeLog

CHUNKS = "16"


def _ppl_args(gguf_dir, wikitext, *extra):
    return ["perplexity", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(wikitext), "-c", "128",
            "--chunks", CHUNKS, "--no-progress", *extra]


def _run(args, torchrun: int = 0, timeout=300):
    cmd = [sys.executable, "-m", "gguf_runtime.cli.main", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "gguf_runtime.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def single(gguf_dir, wikitext):
    r = _run(_ppl_args(gguf_dir, wikitext))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[") == int(CHUNKS) and "Final estimate: PPL = " in r.stdout
    return r.stdout


def test_two_processes_print_the_same_bytes(single, gguf_dir, wikitext):
    """Two and three gloo ranks, another -b (so other chunks share a batch): the same lines, to the byte."""
    r = _run(_ppl_args(gguf_dir, wikitext, "-b", "256", "-ub", "64"), torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == single
    assert "2 processes share the work" in r.stderr
    three = _run(_ppl_args(gguf_dir, wikitext, "-b", "384"), torchrun=3)  # 3 ranks on 2 cores: uneven rounds
    assert three.returncode == 0, three.stderr[-2000:]
    assert three.stdout == single


def test_killed_run_resumes_to_the_same_bytes(single, gguf_dir, wikitext, tmp_path):
    log = tmp_path / "ppl.resume"
    args = _ppl_args(gguf_dir, wikitext, "-b", "128", "--resume", str(log))
    p = subprocess.Popen([sys.executable, "-m", "gguf_runtime.cli.main", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120:  # kill it once some, not all, chunks are recorded
        try:
            n = len(json.loads(log.read_text())["items"])
        except (OSError, ValueError, KeyError):
            n = 0
        if n >= 2 or p.poll() is not None:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    done = len(json.loads(log.read_text())["items"])
    assert 0 < done < int(CHUNKS), done  # really interrupted midway
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == single
    assert len(json.loads(log.read_text())["items"]) == int(CHUNKS)
    # a finished log: nothing is recomputed, the same bytes again
    again = _run(args)
    assert again.stdout == single and "tokens in" in again.stderr


def test_resume_file_of_another_run_is_one_line(gguf_dir, wikitext, tmp_path):
    log = tmp_path / "ppl.resume"
    assert _run(_ppl_args(gguf_dir, wikitext, "--resume", str(log))).returncode == 0
    r = _run(_ppl_args(gguf_dir, wikitext, "--resume", str(log), "-c", "64"))  # other settings
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {log}: this resume file was made for another model, input or settings"
    log.write_text("{broken")
    with pytest.raises(DistError, match="not a gguf-runtime resume file"):
        ResumeLog(log, "k")


def test_hellaswag_two_processes_and_resume(gguf_dir, shared, tmp_path):
    """HellaSwag tasks shared by two ranks print what one process prints; a resumed log reprints them."""
    args = ["perplexity", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(shared / "data" / "hellaswag_val_full.txt.bz2"),
            "--hellaswag", "--hellaswag-tasks", "24", "-c", "256", "--no-progress"]
    one = _run(args)
    assert one.returncode == 0, one.stderr
    assert one.stdout.count("\n24\t") == 1
    two = _run(args + ["-b", "512"], torchrun=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout
    log = tmp_path / "hs.resume"
    assert _run(args + ["--resume", str(log)]).stdout == one.stdout
    assert len(json.loads(log.read_text())["items"]) == 24
    assert _run(args + ["--resume", str(log)]).stdout == one.stdout  # all recorded: printed, not recomputed


def _rank_pids(parent: int) -> dict[int, int]:
    """torchrun's worker processes below ``parent``, by RANK."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(d)
    return out


def test_a_dead_rank_ends_the_run_and_resume_recovers(gguf_dir, wikitext, tmp_path):
    """Rank 1 is SIGKILLed midway through a run long enough to be caught midway (400 chunks): the
    run ends (no hang), and one process resumes the log to an uninterrupted run's bytes."""
    log = tmp_path / "ppl.resume"
    base = ["perplexity", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(wikitext), "-c", "128",
            "--chunks", "400", "--no-progress", "-b", "128"]
    ref = _run(base)
    assert ref.returncode == 0, ref.stderr
    args = base + ["--resume", str(log)]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "gguf_runtime.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0, killed = time.time(), False
    while time.time() - t0 < 120 and p.poll() is None:
        try:
            started = len(json.loads(log.read_text())["items"]) >= 2
        except (OSError, ValueError, KeyError):
            started = False
        pids = _rank_pids(p.pid)
        if started and 1 in pids:
            os.kill(pids[1], signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    p.communicate(timeout=120)  # no hang: the run ends within the bounded timeout
    assert killed, "the run finished before rank 1 could be killed"
    assert p.returncode != 0
    assert len(json.loads(log.read_text())["items"]) < 400  # really stopped midway
    r = _run(args)  # one process resumes what the two recorded
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.stdout


def test_embed_two_processes_same_json(gguf_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {k}: " + "words " * (k % 5 + 1) for k in range(9)) + "\n")
    args = ["embed", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(texts), "--pooling", "mean",
            "--embd-output-format", "json"]
    one = _run(args)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["data"][8]["index"] == 8
    two = _run(args + ["-np", "2"], torchrun=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout


def test_kl_divergence_two_processes(gguf_dir, wikitext, tmp_path):
    base = tmp_path / "base.kld"
    r = _run(["perplexity", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(wikitext), "-c", "128",
              "--chunks", "6", "--no-progress", "--kl-divergence-base", str(base)])
    assert r.returncode == 0, r.stderr
    args = ["perplexity", "-m", str(gguf_dir / "llama-tiny-Q4_K_M.gguf"), "--kl-divergence-base", str(base),
            "--kl-divergence", "--no-progress", "-c", "128"]
    one = _run(args)
    assert one.returncode == 0, one.stderr
    assert "Mean    KLD:" in one.stdout or "KLD" in one.stdout
    two = _run(args + ["-b", "256"], torchrun=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout
    log = tmp_path / "kld.resume"
    assert _run(args + ["--resume", str(log)]).stdout == one.stdout
    assert _run(args + ["--resume", str(log)]).stdout == one.stdout
