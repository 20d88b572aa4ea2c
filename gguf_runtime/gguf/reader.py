"""GGUF reading: a validating header parser over a read-only memory map.

Metadata values are plain Python values (str, int, float, bool, lists of them), except numeric
arrays of more than 2^20 elements, which stay read-only numpy views of the map.

``GGUFFile(path)`` checks the whole header before anything else touches the file: magic, version
(2 or 3), counts that fit in the file, string and array lengths inside the file, known value and
ggml type ids, tensor dimensions (at most 4, non-negative, no overflow), offsets aligned to
``general.alignment`` (a power-of-two UINT32 of at least 8: ggml's check plus the spec's multiple of 8), tensor data inside the
file and never overlapping another tensor's, BOOL values 0 or 1, tensor names under 64 bytes
(GGML_MAX_NAME), and strides that fit int64 even for zero-element tensors. Any problem is one
``GGUFFormatError`` line; nothing is allocated in proportion to a count read from the file before
that count is checked against the file size, and :data:`MAX_KV`, :data:`MAX_TENSORS` and
:data:`MAX_STRINGS` bound the Python objects a header can ask for. Only regular files are opened
(non-blocking: a FIFO or a device is refused without a read).

Tensor data is never copied when the file is opened: ``raw(name)`` is a zero-copy uint8 view of
the map and ``tensor(name)`` dequantizes just that tensor. Formats and constants come from gguf-py
(``GGUFValueType``, ``GGMLQuantizationType``, ``GGML_QUANT_SIZES``); gguf-py's own ``GGUFReader``
over the same file is available as ``.reader`` (it walks every array element in Python, which takes
seconds on a 262k-token vocabulary, so it is not used for opening).
"""
from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .dequant import dequantize
from ..errors import GGUFFormatError, GGUFRuntimeError, UnsupportedError

V = GGUFValueType
_SCALARS: dict[GGUFValueType, str] = {  # value type -> struct code (little-endian, standard sizes)
    V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
    V.FLOAT32: "f", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d", V.BOOL: "B",  # BOOL: a byte, 0 or 1
}
_MIN_SIZE = {**{t: struct.calcsize("<" + c) for t, c in _SCALARS.items()}, V.STRING: 8, V.ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MAX_DIMS = 4
_MAX_DEPTH = 4  # nesting of arrays of arrays
_LIST_MAX = 1 << 20  # longer numeric arrays stay read-only numpy views instead of Python lists
_INT64_MAX = (1 << 63) - 1
# Limits beyond the file-size bounds, so that the Python objects built from a header stay within a
# small multiple of the file (real files hold a few hundred keys, a few thousand tensors and at most
# a few hundred thousand vocabulary strings).
MAX_KV = 1 << 16  # metadata keys
MAX_TENSORS = 1 << 20  # tensor infos
MAX_STRINGS = 1 << 23  # strings in all metadata arrays together
MAX_NAME = 64  # tensor name length in bytes, GGML_MAX_NAME (ggml refuses names of 64 bytes or more)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    n_bytes: int
    offset: int  # absolute offset of the data in the file


class TensorNotFoundError(GGUFRuntimeError, KeyError):
    """No tensor of that name in the file (also a KeyError)."""

    __str__ = Exception.__str__


class _Header:
    """One pass over the header of a memory-mapped GGUF file; raises GGUFFormatError."""

    def __init__(self, buf: mmap.mmap, size: int, where: str):
        self.buf, self.size, self.where, self.pos = buf, size, where, 0
        self.view = memoryview(buf)
        self.n_strings = 0

    def fail(self, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.where}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        raw = self.view[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - n} is not valid UTF-8") from None

    def count(self, n: int, min_size: int, what: str) -> int:
        if n * min_size > self.size - self.pos:
            raise self.fail(f"{what} {n} is impossible: {self.size - self.pos} bytes left at offset {self.pos}")
        return n

    def value_type(self, what: str) -> GGUFValueType:
        t = self.unpack("<I", f"type of {what}")
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what} has unknown value type id {t}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0):
        if vtype == V.BOOL:
            return self.boolean(self.unpack("<B", what), what)
        if vtype in _SCALARS:
            return self.unpack("<" + _SCALARS[vtype], what)
        if vtype == V.STRING:
            return self.string(what)
        if depth >= _MAX_DEPTH:
            raise self.fail(f"{what} nests arrays more than {_MAX_DEPTH} deep")
        itype = self.value_type(f"elements of {what}")
        n = self.count(self.unpack("<Q", f"length of {what}"), _MIN_SIZE[itype], f"length of {what}")
        if itype in _SCALARS:
            dt = np.dtype("<" + _SCALARS[itype])
            vals = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            if itype == V.BOOL:
                if n and int(vals.max()) > 1:
                    i = int(np.argmax(vals > 1))
                    raise self.fail(f"{what}[{i}] at offset {self.pos + i} is a BOOL of value {int(vals[i])} "
                                    f"(must be 0 or 1)")
                vals = vals.view(np.bool_)
            self.pos += n * dt.itemsize
            return vals.tolist() if n <= _LIST_MAX else vals
        if itype == V.STRING:
            return self.strings(n, what)
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]

    def boolean(self, b: int, what: str) -> bool:
        if b > 1:
            raise self.fail(f"{what} at offset {self.pos - 1} is a BOOL of value {b} (must be 0 or 1)")
        return bool(b)

    def strings(self, n: int, what: str) -> list[str]:
        self.n_strings += n
        if self.n_strings > MAX_STRINGS:
            raise self.fail(f"{what}: more than {MAX_STRINGS} strings in the metadata arrays")
        buf, pos, size, out = self.view, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for i in range(n):  # metadata only (vocabularies); lengths checked against the file
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            ln = unpack(buf, pos)[0]
            if ln > size - pos - 8:
                self.pos = pos + 8
                self.need(ln, f"{what}[{i}]")
            try:
                out.append(str(buf[pos + 8:pos + 8 + ln], "utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"{what}[{i}] is not valid UTF-8") from None
            pos += 8 + ln
        self.pos = pos
        return out


def _parse(buf: mmap.mmap, size: int, where: str):
    h = _Header(buf, size, where)
    try:
        return _parse_header(h, buf, size)
    finally:
        h.view.release()  # the map must stay closable


def _parse_header(h: _Header, buf: mmap.mmap, size: int):
    where = h.where
    h.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        raise h.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    h.pos = 4
    version = h.unpack("<I", "version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(f"{where}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise UnsupportedError(f"{where}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = h.unpack("<QQ", "tensor and metadata counts")
    h.count(n_kv, _MIN_KV, "metadata count")
    h.count(n_tensors, _MIN_TENSOR_INFO, "tensor count")
    if n_kv > MAX_KV:
        raise h.fail(f"metadata count {n_kv} exceeds the limit of {MAX_KV} keys")
    if n_tensors > MAX_TENSORS:
        raise h.fail(f"tensor count {n_tensors} exceeds the limit of {MAX_TENSORS}")

    metadata: dict = {}
    types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key #{i}")
        if not key:
            raise h.fail(f"metadata key #{i} is empty")
        if key in metadata:
            raise h.fail(f"duplicate metadata key {key!r}")
        vtype = h.value_type(f"metadata {key!r}")
        sub_pos = h.pos
        metadata[key] = h.value(vtype, f"metadata {key!r}")
        sub = GGUFValueType(struct.unpack_from("<I", buf, sub_pos)[0]) if vtype == V.ARRAY else None
        types[key] = (vtype, sub)

    alignment = GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        # ggml accepts any power of two; the GGUF spec asks for a multiple of 8, which every writer
        # (ggml, gguf-py) keeps: 1, 2 and 4 are refused as the laxity they are
        if types["general.alignment"][0] != V.UINT32 or alignment < 8 or alignment & (alignment - 1):
            raise h.fail(f"general.alignment must be a power-of-two uint32 of at least 8, got {alignment!r}")

    raw_infos = []
    for i in range(n_tensors):
        name = h.string(f"name of tensor #{i}")
        if len(name.encode()) >= MAX_NAME:
            raise h.fail(f"tensor #{i} name {name[:40]!r}... is {len(name.encode())} bytes long (at most {MAX_NAME - 1})")
        n_dims = h.unpack("<I", f"rank of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise h.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = h.unpack(f"<{n_dims}Q", f"shape of tensor {name!r}") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        type_id, offset = h.unpack("<IQ", f"type and offset of tensor {name!r}")
        raw_infos.append((name, dims, type_id, offset))
    data_start = -(-h.pos // alignment) * alignment

    infos: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in raw_infos:
        if name in infos:
            raise h.fail(f"duplicate tensor name {name!r}")
        # max(d, 1): a zero-element tensor must still have strides that fit int64 (torch needs them)
        if any(d > _INT64_MAX for d in dims) or math.prod(max(d, 1) for d in dims) > _INT64_MAX:
            raise h.fail(f"tensor {name!r} has an absurd shape {list(dims)} (element count overflows int64)")
        try:
            qtype = GGMLQuantizationType(type_id)
            bs, ts = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise h.fail(f"tensor {name!r} has unknown ggml type id {type_id}") from None
        ne0 = dims[0] if dims else 1
        if ne0 % bs:
            raise h.fail(f"tensor {name!r} of type {qtype.name} has rows of {ne0} elements, "
                         f"not a multiple of its block size {bs}")
        if offset % alignment:
            raise h.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        n_bytes = math.prod(dims) // bs * ts
        start = data_start + offset
        if start + n_bytes > size:
            raise h.fail(f"tensor {name!r} data [{start}, {start + n_bytes}) lies past the end of the file "
                         f"({size} bytes): truncated?")
        infos[name] = TensorInfo(name, qtype, tuple(reversed(dims)), n_bytes, start)
    _check_overlaps(h, infos)
    return version, metadata, types, alignment, data_start, infos


def _check_overlaps(h: _Header, infos: dict[str, TensorInfo]) -> None:
    """No two tensors share a byte (ggml insists on consecutive, padded data; gaps are allowed here)."""
    spans = sorted((i.offset, i.offset + i.n_bytes, i.name) for i in infos.values() if i.n_bytes)
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise h.fail(f"tensor {n1!r} data [{s1}, {e1}) overlaps tensor {n0!r} data [{s0}, {e0})")


class GGUFFile:
    """A GGUF file: ``.metadata`` (plain Python values), ``.tensor_infos`` (name -> TensorInfo),
    ``.raw(name)`` (zero-copy bytes) and ``.tensor(name, device, dtype)`` (dequantized)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        where = str(path)
        if not self.path.exists():
            raise GGUFFormatError(f"{where}: no such file")
        if self.path.is_dir():
            raise GGUFFormatError(f"{where}: is a directory, not a GGUF file")
        if not self.path.is_file():
            raise GGUFFormatError(f"{where}: not a regular file")
        try:  # O_NONBLOCK: a FIFO swapped in after the checks above must not block the open
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise GGUFFormatError(f"{where}: not a regular file")
                self.file_size = st.st_size
                if self.file_size == 0:
                    raise GGUFFormatError(f"{where}: empty file, not a GGUF file")
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        except OSError as e:
            raise GGUFFormatError(f"{where}: cannot read ({e.strerror or e})") from None
        (self.version, self.metadata, self.field_types, self.alignment, self.data_offset,
         self.tensor_infos) = _parse(self._mm, self.file_size, where)
        self._reader = None

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """Metadata value; ``{arch}`` in the key is replaced by the architecture name."""
        return self.metadata.get(key.replace("{arch}", self.arch), default)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensor_infos[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat read-only uint8 view of the memory map (no copy)."""
        info = self.info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def tensor(self, name: str, device=None, dtype=torch.float32) -> torch.Tensor:
        info = self.info(name)
        return dequantize(self.raw(name), info.qtype, info.shape, device=device, dtype=dtype)

    @property
    def reader(self):
        """gguf-py's ``GGUFReader`` over the same (already validated) file, built on first use."""
        if self._reader is None:
            from gguf import GGUFReader

            self._reader = GGUFReader(str(self.path), "r")
        return self._reader

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # views handed out by raw() are still alive: the map lives on with them
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.arch!r}, tensors={len(self.tensor_infos)})"
