"""GGUFFile against gguf-py's GGUFReader on real files, and every kind of bad input through the API
and through ``gguf-runtime inspect`` (exit code 2, one line on stderr, never a traceback)."""
from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from gguf_runtime import GGUFFile, load
from gguf_runtime.cli.inspect_cmd import report
from gguf_runtime.cli.main import main
from gguf_runtime.errors import GGUFFormatError, GGUFRuntimeError
from gguf_runtime.gguf.reader import TensorNotFoundError


# ---------------------------------------------------------------------------------------------
# agreement with gguf-py's reader on real files


def _check_against_gguf_py(path: Path) -> None:
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_meta)
    assert ours.metadata == ref_meta
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert list(ours.tensor_infos) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensor_infos[t.name]
        assert (info.qtype, info.shape, info.n_bytes, info.offset) == (
            t.tensor_type, tuple(reversed(t.shape.tolist())), t.n_bytes, t.data_offset)
        assert np.array_equal(ours.raw(t.name), t.data.reshape(-1).view(np.uint8))


def test_matches_gguf_py_on_shared_files(gguf_dir):
    files = sorted(gguf_dir.glob("*.gguf"))
    assert len(files) >= 9
    for p in files:
        _check_against_gguf_py(p)


def test_matches_gguf_py_on_smollm2(smollm2):
    _check_against_gguf_py(smollm2)


def test_lazy_open_and_load(gguf_dir):
    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    assert f.arch == "llama" and f.get("{arch}.block_count") == 2
    raw = f.raw("token_embd.weight")
    assert not raw.flags.owndata and not raw.flags.writeable  # a view of the map, not a copy
    w = f.tensor("token_embd.weight")
    assert w.shape == (2048, 256)
    w.add_(1)  # the result owns its memory, the file is untouched
    assert np.array_equal(f.raw("token_embd.weight"), raw)
    m = load(gguf_dir / "llama-tiny-Q8_0.gguf", device="cpu", names=["output_norm.weight"])
    assert list(m.weights) == ["output_norm.weight"] and m.weights["output_norm.weight"].dtype == torch.float32
    with pytest.raises(TensorNotFoundError, match="no tensor named 'nope'"):
        f.tensor("nope")
    with pytest.raises(KeyError):
        load(gguf_dir / "llama-tiny-Q8_0.gguf", device="cpu", names=["nope"])


# ---------------------------------------------------------------------------------------------
# a small valid file written by gguf-py, then corrupted in every way item 6 of issue 2 lists


@pytest.fixture(scope="session")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_custom_alignment(32)
    w.add_string("test.text", "hello")
    w.add_uint32("test.uint", 7)
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.words", ["a", "bb"])
    rng = np.random.default_rng(0)
    w.add_tensor("t_f32", rng.standard_normal((4, 32), dtype=np.float32))
    q = quantize(rng.standard_normal((2, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("t_q80", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    f = GGUFFile(path)  # sanity: the untouched file is fine
    assert f.tensor("t_q80").shape == (2, 64)
    return data


def _at(data: bytes, needle: bytes) -> int:
    i = data.index(needle)
    assert data.count(needle) == 1
    return i


def _patch(data: bytes, pos: int, fmt: str, *vals) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, *vals)
    return bytes(b)


def _key_value(data: bytes, key: str) -> int:
    """Offset of the value type (u32) of metadata ``key``."""
    return _at(data, key.encode()) + len(key)


def _tensor(data: bytes, name: str) -> dict[str, int]:
    """Offsets of the fields of tensor info ``name`` (2-D tensors)."""
    i = _at(data, name.encode()) + len(name)
    return {"n_dims": i, "ne0": i + 4, "ne1": i + 12, "type": i + 20, "offset": i + 24}


CASES = {
    "wrong magic": (lambda d: b"GGML" + d[4:], "magic"),
    "version 1": (lambda d: _patch(d, 4, "<I", 1), "version 1"),
    "version 4": (lambda d: _patch(d, 4, "<I", 4), "version 4"),
    "big-endian": (lambda d: _patch(d, 4, ">I", 3), "big-endian"),
    "absurd tensor count": (lambda d: _patch(d, 8, "<Q", 1 << 62), "tensor count"),
    "absurd kv count": (lambda d: _patch(d, 16, "<Q", (1 << 64) - 1), "metadata count"),
    "absurd key length": (lambda d: _patch(d, 24, "<Q", 1 << 62), "truncated"),
    "absurd string length": (lambda d: _patch(d, _key_value(d, "test.text") + 4, "<Q", 1 << 40), "truncated"),
    "absurd array length": (lambda d: _patch(d, _key_value(d, "test.words") + 8, "<Q", 1 << 61), "impossible"),
    "unknown value type": (lambda d: _patch(d, _key_value(d, "test.uint"), "<I", 99), "unknown value type id 99"),
    "unknown array type": (lambda d: _patch(d, _key_value(d, "test.ints") + 4, "<I", 77), "unknown value type id 77"),
    "bad alignment": (lambda d: _patch(d, _key_value(d, "general.alignment") + 4, "<I", 48), "alignment"),
    "invalid utf-8": (lambda d: d.replace(b"test.text", b"test.\xff\xfext"), "UTF-8"),
    "duplicate key": (lambda d: d.replace(b"test.uint", b"test.text"), "duplicate metadata key"),
    "duplicate tensor": (lambda d: d.replace(b"t_q80", b"t_f32"), "duplicate tensor"),
    "too many dims": (lambda d: _patch(d, _tensor(d, "t_f32")["n_dims"], "<I", 5), "5 dimensions"),
    "overflowing dims": (lambda d: _patch(d, _tensor(d, "t_f32")["ne0"], "<QQ", 1 << 40, 1 << 40), "overflow"),
    "negative dim": (lambda d: _patch(d, _tensor(d, "t_f32")["ne1"], "<q", -4), "overflow"),
    "huge dim": (lambda d: _patch(d, _tensor(d, "t_f32")["ne1"], "<Q", 1 << 40), "past the end"),
    "unknown type id": (lambda d: _patch(d, _tensor(d, "t_f32")["type"], "<I", 99), "unknown ggml type id 99"),
    "removed type id": (lambda d: _patch(d, _tensor(d, "t_f32")["type"], "<I", 4), "unknown ggml type id 4"),
    "row not whole blocks": (lambda d: _patch(d, _tensor(d, "t_q80")["ne0"], "<Q", 48), "block size"),
    "misaligned offset": (lambda d: _patch(d, _tensor(d, "t_q80")["offset"], "<Q", 520), "alignment"),
    "offset past end": (lambda d: _patch(d, _tensor(d, "t_q80")["offset"], "<Q", 1 << 50), "past the end"),
    "truncated data": (lambda d: d[:-64], "past the end"),  # tensor data is padded to 32 bytes
    "truncated header": (lambda d: d[:60], "truncated"),
    "empty file": (lambda d: b"", "empty"),
}


def _one_line_error(path: Path, monkeypatch, capsys) -> str:
    """Run ``gguf-runtime inspect path`` in-process: exit code 2 and a single 'error:' line."""
    monkeypatch.setattr(sys, "argv", ["gguf-runtime", "inspect", str(path)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, good, tmp_path, monkeypatch, capsys):
    mutate, expect = CASES[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(good))
    tracemalloc.start()
    try:
        with pytest.raises(GGUFRuntimeError) as e:
            GGUFFile(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg
    assert peak < 1 << 20, peak  # nothing sized by a bogus count is ever allocated
    assert expect in _one_line_error(bad, monkeypatch, capsys)


def test_missing_directory_device(tmp_path, monkeypatch, capsys):
    cases = [(tmp_path / "missing.gguf", "no such file"), (tmp_path, "directory"), (Path("/dev/null"), "regular file")]
    for path, expect in cases:
        with pytest.raises(GGUFFormatError, match=expect):
            GGUFFile(path)
        assert expect in _one_line_error(path, monkeypatch, capsys)


def test_huge_numeric_array_stays_numpy(tmp_path):
    vals = np.arange((1 << 20) + 5, dtype="<u2")
    kv = [(b"test.big", struct.pack("<IIQ", 9, 2, vals.size) + vals.tobytes()),  # ARRAY of UINT16
          (b"test.small", struct.pack("<IIQff", 9, 6, 2, 1.5, 2.5))]  # ARRAY of FLOAT32
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    data += b"".join(struct.pack("<Q", len(k)) + k + v for k, v in kv)
    (path := tmp_path / "big.gguf").write_bytes(data)
    f = GGUFFile(path)
    big = f.metadata["test.big"]
    assert isinstance(big, np.ndarray) and not big.flags.writeable and np.array_equal(big, vals)
    assert f.metadata["test.small"] == [1.5, 2.5] and f.field_types["test.big"][1].name == "UINT16"
    rep = report(f)["metadata"]  # inspect summarises it like any long array
    assert rep["test.big"] == {"type": "array[uint16]", "length": vals.size, "head": [0, 1, 2]}


def test_every_prefix_and_byte_flips(good, tmp_path):
    """Every truncation point and random byte corruptions of the header: either a clean read
    or one project error line - never another exception."""
    p = tmp_path / "cut.gguf"
    p.write_bytes(good)
    f = GGUFFile(p)
    end, data_end = f.data_offset, max(i.offset + i.n_bytes for i in f.tensor_infos.values())
    for cut in list(range(0, end + 1)) + list(range(end + 1, data_end, 13)):
        p.write_bytes(good[:cut])
        with pytest.raises(GGUFFormatError) as e:
            GGUFFile(p)
        assert "\n" not in str(e.value)
    rng = np.random.default_rng(1)
    for _ in range(300):
        b = bytearray(good)
        for pos in rng.integers(0, end, size=rng.integers(1, 4)):
            b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            f = GGUFFile(p)
        except GGUFRuntimeError as e:
            assert "\n" not in str(e)
            continue
        for name in f.tensor_infos:  # whatever parsed must also read
            try:
                f.tensor(name)
            except GGUFRuntimeError as e:
                assert "\n" not in str(e)
