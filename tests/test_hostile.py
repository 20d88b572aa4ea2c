"""Hostile files and failures (issue 18): each class the fuzz run found, rebuilt from a minimal file,
is one project error line - never another exception, never a hang, never an allocation sized by a
lying header - and every file the project writes appears whole or not at all."""
from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_runtime.atomic import AtomicFile, AtomicWriteError, atomic_write, remove_stale
from gguf_runtime.cli.inspect_cmd import report
from gguf_runtime.cli.main import main
from gguf_runtime.convert.checkpoint import Checkpoint
from gguf_runtime.errors import ConvertError, GGUFFormatError, GGUFRuntimeError
from gguf_runtime.gguf.reader import MAX_KV, GGUFFile
from gguf_runtime.models import load_model
from gguf_runtime.tools.fuzz import (KV, V_ARRAY, V_BOOL, V_FLOAT32, V_INT32, V_STRING, V_UINT8, V_UINT32, V_UINT64,
                                     Doc, Tensor)
from gguf_runtime.tools.tasks.data import TaskError, read_prompt_file

F32 = 0


def _doc(*kvs: KV, tensors=()) -> Doc:
    return Doc([KV("general.architecture", V_STRING, "llama"), *kvs], list(tensors))


def _t(name: str, dims, fill: float = 0.0) -> Tensor:
    n = int(np.prod(dims)) if dims else 1
    return Tensor(name, list(dims), F32, np.full(n, fill, np.float32).tobytes())


def _write(tmp_path: Path, doc: Doc | bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(doc if isinstance(doc, bytes) else doc.to_bytes())
    return p


def _refused(path: Path, expect: str, fn=GGUFFile) -> str:
    with pytest.raises(GGUFRuntimeError) as e:
        fn(path)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg
    return msg


def _cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["gguf-runtime", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


# -- the reader ----------------------------------------------------------------------------------
def test_builder_round_trips_a_fixture(gguf_dir, tmp_path):
    """The minimal-file builder writes what the reader reads (the control for every case below)."""
    src = gguf_dir / "llama-tiny-Q4_0.gguf"
    out = _write(tmp_path, Doc.from_file(src), "rt.gguf")
    assert out.read_bytes() == src.read_bytes()


def test_overlapping_tensor_data_refused(tmp_path):
    a, b = _t("a", [8, 4], 1.0), _t("b", [8, 4], 2.0)
    ok = _write(tmp_path, _doc(tensors=[a, b]), "ok.gguf")
    assert GGUFFile(ok).tensor("b")[0, 0] == 2.0
    b.offset, a.offset = 64, 0  # b starts inside a's 128 bytes
    _refused(_write(tmp_path, _doc(tensors=[a, b])), "overlaps")
    a.offset = b.offset = 0  # the same bytes twice
    _refused(_write(tmp_path, _doc(tensors=[a, b])), "overlaps")
    a.offset, b.offset = 0, 1 << 40  # past the end
    _refused(_write(tmp_path, _doc(tensors=[a, b])), "past the end")


def test_zero_element_tensors(tmp_path):
    # ggml accepts zero-element tensors; their other dimensions must still give int64 strides (torch)
    p = _write(tmp_path, _doc(tensors=[Tensor("z", [32, 0, 1 << 20], F32, b"")]), "z.gguf")
    assert GGUFFile(p).tensor("z").shape == (1 << 20, 0, 32)
    _refused(_write(tmp_path, _doc(tensors=[Tensor("z", [32, 0, 1 << 40, 1 << 40], F32, b"")])), "overflows int64")


def test_bool_must_be_0_or_1(tmp_path):
    assert GGUFFile(_write(tmp_path, _doc(KV("x.flag", V_BOOL, 1)), "ok.gguf")).metadata["x.flag"] is True
    _refused(_write(tmp_path, _doc(KV("x.flag", V_BOOL, 2))), "BOOL of value 2")
    ok = GGUFFile(_write(tmp_path, _doc(KV("x.flags", V_ARRAY, [0, 1, 1], V_BOOL)), "ok2.gguf"))
    assert ok.metadata["x.flags"] == [False, True, True]
    _refused(_write(tmp_path, _doc(KV("x.flags", V_ARRAY, [0, 1, 255], V_BOOL))), "[2] at offset")


@pytest.mark.parametrize("value,vtype,ok", [
    (8, V_UINT32, True), (64, V_UINT32, True),  # a power of two (ggml) and a multiple of 8 (the spec)
    (1, V_UINT32, False), (4, V_UINT32, False),  # ggml would take these: the spec laxity
    (0, V_UINT32, False), (3, V_UINT32, False), (48, V_UINT32, False),
    (32, V_UINT64, False), (32, V_INT32, False),  # ggml: must be of type UINT32
])
def test_alignment_as_the_spec(tmp_path, value, vtype, ok):
    doc = _doc(KV("general.alignment", vtype, value), tensors=[_t("a", [8, 2])])
    if not ok:  # lay the data out at 32 so that only the key is wrong
        doc.tensors[0].offset = 0
    p = _write(tmp_path, doc)
    if ok:
        assert GGUFFile(p).alignment == value
    else:
        _refused(p, "alignment")


def test_tensor_name_length_as_ggml(tmp_path):
    assert "x" * 63 in GGUFFile(_write(tmp_path, _doc(tensors=[_t("x" * 63, [4])]), "ok.gguf")).tensor_infos
    _refused(_write(tmp_path, _doc(tensors=[_t("x" * 64, [4])])), "bytes long")


def test_many_keys_inspect_fast(tmp_path, monkeypatch, capsys):
    doc = _doc(*[KV(f"k{i}", V_UINT8, i & 255) for i in range(20_000)])
    p = _write(tmp_path, doc)
    t = time.perf_counter()
    code, out, err = _cli(monkeypatch, capsys, "inspect", p)
    assert code in (0, None) and "more keys" in out, err
    assert time.perf_counter() - t < 5  # was 15 s (a rich table of 20,000 rows)
    code, out, _ = _cli(monkeypatch, capsys, "inspect", p, "--json")
    assert len(json.loads(out)["metadata"]) == 20_001


def test_million_keys_refused_fast_and_small(tmp_path):
    n = 1_000_000
    kv = b"".join(struct.pack("<Q", 7) + f"k{i:06d}".encode() + struct.pack("<IB", V_UINT8, 0) for i in range(n))
    p = _write(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 0, n) + kv)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        _refused(p, f"limit of {MAX_KV}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 1 and peak < 1 << 20  # was 41 s and +386 MiB


def test_nested_big_array_inspect_json(tmp_path, monkeypatch, capsys):
    big = np.arange((1 << 20) + 3, dtype=np.uint8)
    p = _write(tmp_path, _doc(KV("x.nested", V_ARRAY, [(V_UINT8, big), (V_UINT8, big[:2])], V_ARRAY)))
    rep = report(GGUFFile(p))["metadata"]["x.nested"]
    assert rep == [{"type": "array[uint8]", "length": big.size, "head": [0, 1, 2]}, [0, 1]]
    code, out, err = _cli(monkeypatch, capsys, "inspect", p, "--json")  # was a TypeError
    assert code in (0, None), err
    assert json.loads(out)["metadata"]["x.nested"] == rep


def test_special_files_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p, expect in ((fifo, "regular file"), (Path("/dev/zero"), "regular file"), (tmp_path, "directory")):
        t = time.perf_counter()
        _refused(p, expect)
        with pytest.raises(TaskError, match="FIFO|directory"):
            read_prompt_file(p)
        assert time.perf_counter() - t < 1  # a FIFO with no writer would block open() forever


def test_prompt_file_bz2_and_limits(tmp_path):
    import bz2

    (p := tmp_path / "t.txt.bz2").write_bytes(bz2.compress(b"ab\n") + bz2.compress(b"cd\n"))
    assert read_prompt_file(p) == b"ab\ncd"
    p.write_bytes(bz2.compress(b"x" * 1000)[:-8])
    with pytest.raises(TaskError, match="truncated"):
        read_prompt_file(p)


# -- hparams and the model build ------------------------------------------------------------------
def _llama(gguf_dir) -> Doc:
    return Doc.from_file(gguf_dir / "llama-tiny-Q4_0.gguf")


CASES = {  # old crash classes: mutation of llama-tiny -> expected words of the one-line error
    "missing hparam": (lambda d: d.drop("llama.embedding_length"), "missing llama.embedding_length"),
    "zero head count": (lambda d: d.set("llama.attention.head_count", V_UINT32, 0), "out of range"),
    "string block count": (lambda d: d.set("llama.block_count", V_STRING, "2"), "must be an integer"),
    "float head count 4.5": (lambda d: d.set("llama.attention.head_count", V_FLOAT32, 4.5), "must be an integer"),
    "block_count 2^32-1": (lambda d: d.set("llama.block_count", V_UINT32, (1 << 32) - 1), "out of range"),
    "rope dims 2^31": (lambda d: d.set("llama.rope.dimension_count", V_UINT64, 1 << 31), "out of range"),
    "no tensors": (lambda d: setattr(d, "tensors", []), "tensor missing"),
    "blk.N with no kind": (lambda d: setattr(d.tensors[-1], "name", "blk.0"), "tensor missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_build_one_line(case, gguf_dir, tmp_path):
    doc = _llama(gguf_dir)
    mutate, expect = CASES[case]
    mutate(doc)
    p = _write(tmp_path, doc)
    t = time.perf_counter()
    _refused(p, expect, fn=load_model)
    assert time.perf_counter() - t < 5


# -- quantize ------------------------------------------------------------------------------------
def _small_f32(path: Path) -> Path:
    rng = np.random.default_rng(0)
    doc = _doc(KV("llama.block_count", V_UINT32, 1), KV("general.name", V_STRING, "q"),
               KV("x.list", V_ARRAY, ["a", "b"], V_STRING), KV("x.flag", V_BOOL, 1),
               tensors=[Tensor("blk.0.ffn_up.weight", [256, 8], F32, rng.standard_normal(2048, np.float32).tobytes()),
                        _t("blk.0.attn_norm.weight", [256], 1.0)])
    path.write_bytes(doc.to_bytes())
    return path


def test_quantize_reads_with_our_reader(tmp_path, monkeypatch):
    import gguf

    from gguf_runtime.convert.quantize import quantize

    def no_gguf_py(*a, **k):
        raise AssertionError("quantize must not re-parse its input with gguf-py")

    monkeypatch.setattr(gguf, "GGUFReader", no_gguf_py)
    src = _small_f32(tmp_path / "in.gguf")
    out = quantize(src, tmp_path / "out.gguf", "Q8_0", progress=False)
    f, g = GGUFFile(src), GGUFFile(out)
    assert {k: v for k, v in g.metadata.items() if k not in ("general.file_type", "general.quantization_version")} \
        == f.metadata
    assert g.tensor_infos["blk.0.ffn_up.weight"].qtype.name == "Q8_0"
    assert torch.allclose(g.tensor("blk.0.ffn_up.weight"), f.tensor("blk.0.ffn_up.weight"), atol=0.05)
    # a zero-element tensor with huge dims (was "array is too big" in gguf-py)
    doc = Doc.from_file(src)
    doc.tensors.append(Tensor("blk.0.ffn_down.weight", [256, 0, 1 << 30], F32, b""))
    (z := tmp_path / "z.gguf").write_bytes(doc.to_bytes())
    assert GGUFFile(quantize(z, tmp_path / "zq.gguf", "Q8_0", progress=False)).tensor_infos["blk.0.ffn_down.weight"]


def test_output_never_overwrites_input(tmp_path):
    from gguf_runtime.convert.quantize import quantize

    src = _small_f32(tmp_path / "in.gguf")
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.gguf")
    os.symlink(src, tmp_path / "soft.gguf")
    for dst in (src, tmp_path / "hard.gguf", tmp_path / "soft.gguf"):
        with pytest.raises(ConvertError, match="overwrite the input"):
            quantize(src, dst, "Q8_0", progress=False)
    assert src.read_bytes() == before
    with pytest.raises(AtomicWriteError, match="overwrite the input"):
        atomic_write(tmp_path / "hard.gguf", [b"x"], inputs=[src])


def test_read_only_target_one_line(tmp_path, monkeypatch):
    """A failing rename (read-only filesystem) is one line, and the temporary file is gone."""
    from gguf_runtime.convert import writer
    from gguf_runtime.convert.quantize import quantize

    src = _small_f32(tmp_path / "in.gguf")
    real = os.replace

    def erofs(a, b):
        if str(a).endswith(".part"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(a, b)

    monkeypatch.setattr(os, "replace", erofs)
    with pytest.raises(ConvertError) as e:
        quantize(src, tmp_path / "out.gguf", "Q8_0", progress=False)
    assert str(e.value) == f"{tmp_path / 'out.gguf'}: cannot write (Read-only file system)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(ConvertError, match="does not exist"):
        writer.write_gguf(None, tmp_path / "nope" / "x.gguf", [], iter(()))


_SLOW_WRITER = textwrap.dedent("""
    import sys, time, gguf
    real = gguf.GGUFWriter.write_tensor_data
    def slow(self, *a, **k):
        real(self, *a, **k)
        open(sys.argv[3], "a").close()  # 'writing has begun'
        time.sleep(0.5)
    gguf.GGUFWriter.write_tensor_data = slow
    from gguf_runtime.convert.quantize import quantize
    from gguf_runtime.convert.hf import convert
    if sys.argv[1] == "quantize":
        quantize(sys.argv[2], sys.argv[4], "Q8_0", progress=False)
    else:
        convert(sys.argv[2], sys.argv[4], progress=False)
""")


@pytest.mark.parametrize("what", ["quantize", "convert"])
def test_sigkill_mid_write_leaves_old_file(what, tmp_path, shared):
    src = _small_f32(tmp_path / "in.gguf") if what == "quantize" else shared / "models" / "mamba-tiny-ss"
    dst, started = tmp_path / "out.gguf", tmp_path / "started"
    dst.write_bytes(b"old contents")
    script = tmp_path / "w.py"
    script.write_text(_SLOW_WRITER)
    args = [sys.executable, str(script), what, str(src), str(started), str(dst)]
    p = subprocess.Popen(args, stderr=subprocess.PIPE)
    t = time.monotonic()
    while not started.exists() and p.poll() is None and time.monotonic() - t < 120:
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert dst.read_bytes() == b"old contents"
    stale = list(tmp_path.glob(".out.gguf.*.part"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the dead writer's partial file
    # the next run removes the dead writer's temporary file and publishes a whole file
    started.unlink()
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob(".out.gguf.*.part"))
    assert GGUFFile(dst).tensor_infos


def test_atomic_file_stale_and_abort(tmp_path):
    target = tmp_path / "x.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.bin.{int(dead.stdout)}.deadbeef.part"
    stale.write_bytes(b"partial")
    mine = tmp_path / f".x.bin.{os.getpid()}.cafe.part"  # a live writer's file stays
    mine.write_bytes(b"live")
    with AtomicFile(target) as f:
        assert not stale.exists() and mine.exists()
        f.write(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == sorted([target, mine])
    mine.unlink()
    assert remove_stale(target) == []


def test_kld_writer_is_atomic(tmp_path):
    from gguf_runtime.tools.tasks import LogitsWriter

    path = tmp_path / "base.kld"
    w = LogitsWriter(path, 8, 10, 1, torch.arange(8))
    w(0, torch.randn(3, 10), None)
    assert not path.exists() and w.tmp.exists()
    w.close()
    assert path.stat().st_size == 20 + 4 * 8 + 2 * 3 * 14
    w = LogitsWriter(path, 8, 10, 1, torch.arange(8))
    w.abort()
    assert path.stat().st_size == 20 + 4 * 8 + 2 * 3 * 14 and not w.tmp.exists()
    with pytest.raises(TaskError, match="does not exist"):
        LogitsWriter(tmp_path / "no" / "b.kld", 8, 10, 1, torch.arange(8))


# -- checkpoints ---------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"w": torch.zeros(2), "x": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(ConvertError) as e:
        Checkpoint(d)
    assert "\n" not in str(e.value) and "cannot read weights" in str(e.value)
    assert not _Evil.marker.exists()
    with open(d / "pytorch_model.bin", "wb") as fh:  # a legacy (non-zip) pickle
        pickle.dump(_Evil(), fh)
    with pytest.raises(ConvertError):
        Checkpoint(d)
    assert not _Evil.marker.exists()


def _safetensors(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("case,expect", [
    ("truncated", "header length"), ("lying length", "header length"), ("not json", "not JSON"),
    ("out of range", "outside the data"), ("short tensor", "does not fill"), ("overlap", "overlap"),
    ("bad dtype", "no known dtype"), ("bad shape", "bad shape"),
])
def test_safetensors_headers_validated(tmp_path, case, expect):
    from safetensors.torch import save_file

    d = tmp_path / "ckpt"
    d.mkdir()
    st = d / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 2)}, str(st))
    assert Checkpoint(d).load("a").sum() == 4  # control
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    if case == "truncated":
        st.write_bytes(raw[:8 + n // 2])
    elif case == "lying length":
        st.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    elif case == "not json":
        st.write_bytes(raw[:8] + b"{" * n + data)
    else:
        key = "a"
        if case == "out of range":
            head[key]["data_offsets"] = [0, 1 << 30]
            head[key]["shape"] = [1 << 28]
        elif case == "short tensor":
            head[key]["shape"] = [5]
        elif case == "overlap":
            head["b"]["data_offsets"] = [0, 16]
            head["a"]["data_offsets"] = [8, 24]
            data = data + bytes(8)
        elif case == "bad dtype":
            head[key]["dtype"] = "Q4"
        elif case == "bad shape":
            head[key]["shape"] = [-4]
        _safetensors(st, head, data)
    with pytest.raises(ConvertError) as e:
        Checkpoint(d)
    assert "\n" not in str(e.value) and expect in str(e.value), str(e.value)


# -- under load: perplexity and embed -------------------------------------------------------------
def test_perplexity_and_embed_hostile_text(gguf_dir, tmp_path, monkeypatch, capsys):
    m = gguf_dir / "llama-tiny-Q4_0.gguf"
    (empty := tmp_path / "empty.txt").write_bytes(b"")
    (binary := tmp_path / "rnd.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 700, np.uint8).tobytes())
    code, _, err = _cli(monkeypatch, capsys, "perplexity", "-m", m, "-f", empty, "-c", "128", "--no-progress")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "needs at least 256" in err
    # random bytes tokenize (byte fallback) and are scored, as llama-perplexity does
    code, out, err = _cli(monkeypatch, capsys, "perplexity", "-m", m, "-f", binary, "-c", "64", "--chunks", "1",
                          "--no-progress")
    assert code in (0, None), err
    assert "Final estimate: PPL = " in out
    code, _, err = _cli(monkeypatch, capsys, "embed", "-m", m, "-f", binary)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not UTF-8" in err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for cmd in (["perplexity", "-m", m, "-f", fifo, "--no-progress"], ["embed", "-m", m, "-f", fifo]):
        code, _, err = _cli(monkeypatch, capsys, *cmd)
        assert code == 2 and "not a regular file" in err and err.count("\n") == 1, err
    # longer than the context: one line, as llama-embedding refuses it
    code, out, err = _cli(monkeypatch, capsys, "embed", "-m", m, "-p", "word " * 200, "-c", "32", "-b", "32")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (out, err)


@pytest.mark.parametrize("key,vtype,value,sub", [
    ("tokenizer.ggml.eos_token_id", V_ARRAY, [1, 2], V_INT32),
    ("tokenizer.ggml.token_type", V_FLOAT32, 2.5, None),
    ("tokenizer.ggml.tokens", V_ARRAY, [1, 2], V_INT32),
])
def test_mistyped_vocabulary_one_line(gguf_dir, tmp_path, key, vtype, value, sub):
    from gguf_runtime.tokenizer import Tokenizer

    doc = _llama(gguf_dir)
    doc.set(key, vtype, value, sub)
    _refused(_write(tmp_path, doc), key, fn=lambda p: Tokenizer.from_gguf(GGUFFile(p)))


def test_lying_block_count_fails_fast(gguf_dir, tmp_path):
    """4096 layers (within the hparam's range) in a file with tensors for 2: refused before 4096
    empty layers are built (was 4.5 s and +90 MiB in the fuzz run)."""
    doc = _llama(gguf_dir)
    doc.set("llama.block_count", V_UINT32, 4096)
    t = time.perf_counter()
    _refused(_write(tmp_path, doc), "but the tensors stop at blk.1", fn=load_model)
    assert time.perf_counter() - t < 1


def test_fuzz_finds_stay_fixed(gguf_dir, tmp_path):
    """Two crashes of the long fuzz run (docs/fuzz.md), rebuilt minimally."""
    from gguf_runtime.tokenizer import Tokenizer

    doc = Doc.from_file(gguf_dir / "mamba-tiny-Q4_K_M.gguf")
    toks = doc.get("tokenizer.ggml.tokens").value
    i = toks.index("<0x38>")
    toks[i] = "<0x8w>"  # llama.cpp's strtol reads the leading hex digit: byte 0x08
    tok = Tokenizer.from_gguf(GGUFFile(_write(tmp_path, doc, "byte.gguf")))
    assert tok._pieces[i] == b"\x08"  # was ValueError: invalid literal for int() with base 16
    doc = Doc.from_file(gguf_dir / "mamba-tiny-Q4_K_M.gguf")
    t = next(t for t in doc.tensors if t.name == "blk.1.ssm_a")
    t.dims, t.data, t.type_id = [16, 0, 1 << 20], b"", F32  # zero elements, 3-D: the transform's t() failed
    _refused(_write(tmp_path, doc), "blk.1.ssm_a has shape", fn=load_model)


def test_convert_refuses_to_overwrite_its_checkpoint(shared, tmp_path):
    """The output may not be one of the checkpoint's files (a hard link to one included)."""
    import shutil

    from gguf_runtime.convert.hf import convert
    from gguf_runtime.errors import GGUFRuntimeError

    d = tmp_path / "ck"
    shutil.copytree(shared / "models" / "llama-tiny-hf", d)
    before = (d / "config.json").read_bytes()
    with pytest.raises(GGUFRuntimeError):
        convert(d, d / "config.json", "f32", progress=False)
    os.link(d / "model.safetensors", tmp_path / "alias.gguf")
    with pytest.raises(GGUFRuntimeError):
        convert(d, tmp_path / "alias.gguf", "f32", progress=False)
    assert (d / "config.json").read_bytes() == before
