"""A structure-aware fuzzer of everything that reads a GGUF file: the reader, the tokenizer, the model
build (``load_model``) and one short decode.

``python -m gguf_runtime.tools.fuzz [-n MUTANTS] [--seed S] [--seconds T] [FILES...]`` takes tiny
fixtures (by default the smallest file of each architecture in ``models.ARCHS`` under
``../shared/models/gguf``), decomposes each into a :class:`Doc` (metadata with value types, tensor
infos, tensor bytes), applies one to three mutations of the kind an attacker would try (boundary
integers, wrong value types, deleted keys and tensors, overlapping or out-of-range tensor data,
absurd dimensions, bad BOOLs and alignments, thousands of keys, nested huge arrays, truncations, byte
flips), writes the mutant and runs the pipeline on it in a forked child with a 5 s deadline and an
address-space cap. Each mutant ends in one of:

- ``rejected``: a one-line project error (``GGUFRuntimeError``) - the wanted outcome for bad files;
- ``accepted``: every stage ran;
- ``crash``: any other exception (or a multi-line project message) - a bug;
- ``hang``: the child ran past the deadline - a bug;
- ``alloc``: the child's peak resident memory grew by more than ``2 x (file size + dequantized size of
  the file's tensors) + 64 MiB`` - a bug;
- ``silent``: a mutation that makes the file invalid by construction (overlap, out-of-range data,
  BOOL 2, duplicate key, zero alignment, fractional or zero layer count, ...) was ``accepted`` - a bug.

The run prints a summary (and ``--json`` a machine-readable one); the exit status is 1 when any bug
class is non-zero. :func:`write_gguf_bytes` and :func:`Doc.from_file` are also the minimal-file
builders of the regression tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

V_UINT8, V_INT8, V_UINT16, V_INT16, V_UINT32, V_INT32, V_FLOAT32, V_BOOL, V_STRING, V_ARRAY, V_UINT64, V_INT64, \
    V_FLOAT64 = range(13)
_FMT = {V_UINT8: "B", V_INT8: "b", V_UINT16: "H", V_INT16: "h", V_UINT32: "I", V_INT32: "i", V_FLOAT32: "f",
        V_BOOL: "B", V_UINT64: "Q", V_INT64: "q", V_FLOAT64: "d"}
_NP = {t: np.dtype("<" + c) for t, c in _FMT.items()}


# ---------------------------------------------------------------------------------------------
# a GGUF file as plain data, and its serialisation (independent of gguf-py's writer: it must be able
# to write what no valid writer would)


@dataclass
class KV:
    key: str
    vtype: int
    value: object  # scalar, str, or for ARRAY a list / numpy array of ``sub`` values
    sub: int | None = None
    raw: bytes | None = None  # overrides the encoded value bytes (after the type id)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # ggml order, innermost first
    type_id: int
    data: bytes
    offset: int | None = None  # relative to the data section; None: laid out in order


@dataclass
class Doc:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    kv_extra: int = 0  # added to the header counts (a lying header)
    tensor_extra: int = 0

    @classmethod
    def from_file(cls, path) -> "Doc":
        from ..gguf.reader import GGUFFile

        f = GGUFFile(path)
        kvs = []
        for k, v in f.metadata.items():
            t, sub = f.field_types[k]
            kvs.append(KV(k, int(t), v, None if sub is None else int(sub)))
        infos = sorted(f.tensor_infos.values(), key=lambda i: i.offset)
        tensors = [Tensor(i.name, list(reversed(i.shape)), int(i.qtype), bytes(f.raw(i.name))) for i in infos]
        return cls(kvs, tensors, f.version)

    def get(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)

    def set(self, key: str, vtype: int, value, sub: int | None = None) -> None:
        kv = self.get(key)
        if kv is None:
            self.kvs.append(KV(key, vtype, value, sub))
        else:
            kv.vtype, kv.value, kv.sub, kv.raw = vtype, value, sub, None

    def drop(self, key: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv.key != key]

    @property
    def alignment(self) -> int:
        kv = self.get("general.alignment")
        a = kv.value if kv is not None and isinstance(kv.value, int) else 32
        return a if 0 < a <= 1 << 16 and a & (a - 1) == 0 else 32

    def to_bytes(self) -> bytes:
        return write_gguf_bytes(self)


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value, sub: int | None = None) -> bytes:
    """The bytes of a value of GGUF type ``vtype`` (after its type id)."""
    if vtype == V_STRING:
        return _str(value)
    if vtype == V_ARRAY:
        vals = value
        head = struct.pack("<IQ", sub, len(vals))
        if sub in _NP:
            return head + np.asarray(vals).astype(_NP[sub]).tobytes()
        if sub == V_STRING:
            return head + b"".join(_str(s) for s in vals)
        # nested: each element is (sub_sub, values)
        return head + b"".join(encode_value(V_ARRAY, v[1], v[0]) for v in vals)
    if vtype == V_BOOL:
        return struct.pack("<B", int(value))
    return struct.pack("<" + _FMT[vtype], value)


def write_gguf_bytes(doc: Doc) -> bytes:
    """Serialise ``doc`` exactly as described (counts, offsets, types), valid or not."""
    out = [b"GGUF", struct.pack("<IQQ", doc.version, (len(doc.tensors) + doc.tensor_extra) % (1 << 64),
                                (len(doc.kvs) + doc.kv_extra) % (1 << 64))]
    for kv in doc.kvs:
        out.append(_str(kv.key) + struct.pack("<I", kv.vtype))
        out.append(kv.raw if kv.raw is not None else encode_value(kv.vtype, kv.value, kv.sub))
    align = doc.alignment
    pos, offsets = 0, []
    for t in doc.tensors:
        if t.offset is None:
            offsets.append(pos)
            pos += -(-len(t.data) // align) * align
        else:
            offsets.append(t.offset)
    for t, off in zip(doc.tensors, offsets):
        out.append(_str(t.name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *[d & (2**64 - 1) for d in t.dims],
                                              t.type_id, off & (2**64 - 1)))
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    # data: each tensor at its (laid out or given) offset
    end = max([o + len(t.data) for t, o in zip(doc.tensors, offsets) if o < 1 << 32] + [0])
    data = bytearray(-(-end // align) * align)
    for t, o in zip(doc.tensors, offsets):
        if o < 1 << 32:
            data[o:o + len(t.data)] = t.data
    return head + bytes(data)


# ---------------------------------------------------------------------------------------------
# mutations: each edits the Doc (or returns replacement bytes) and says whether the result is invalid
# by construction (so that accepting it is a "silent acceptance")

_INTS = [0, 1, 2, 3, -1, 255, 4096, 65535, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1]
_INT_KEYS = ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
             "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank", "ssm.group_count",
             "expert_count", "expert_used_count", "vocab_size", "attention.sliding_window")
_MUST_BE_WHOLE = ("block_count", "embedding_length")  # every model reads these (Mamba has no head count)


class Mutator:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick_kv(self, doc: Doc, pred=lambda kv: True) -> KV | None:
        kvs = [kv for kv in doc.kvs if pred(kv)]
        return self.rng.choice(kvs) if kvs else None

    def arch_key(self, doc: Doc, suffix: str) -> str:
        arch = doc.get("general.architecture")
        return f"{arch.value if arch is not None else 'llama'}.{suffix}"

    # each returns (name, invalid_by_construction, must_fail_stage or None)
    def m_int_boundary(self, doc):
        kv = self.pick_kv(doc, lambda kv: kv.vtype in _FMT and kv.vtype not in (V_FLOAT32, V_FLOAT64, V_BOOL))
        key = kv.key if kv is not None and self.rng.random() < 0.3 else self.arch_key(doc, self.rng.choice(_INT_KEYS))
        v = self.rng.choice(_INTS)
        vtype = V_INT64 if v < 0 else V_UINT64 if v >= 1 << 32 else self.rng.choice([V_UINT32, V_INT32, V_UINT64])
        if vtype == V_INT32 and v >= 1 << 31:
            vtype = V_INT64
        doc.set(key, vtype, v)
        bad = key.endswith((".block_count", ".embedding_length")) and (v <= 0 or v >= 1 << 24)
        return f"int {key}={v}", bad, "load" if bad else None

    def m_float(self, doc):
        key = self.arch_key(doc, self.rng.choice(_INT_KEYS))
        v = self.rng.choice([4.5, 0.5, float("nan"), float("inf"), -0.0, 1e30])
        doc.set(key, V_FLOAT32, v)
        bad = key.endswith(tuple("." + k for k in _MUST_BE_WHOLE))
        return f"float {key}={v}", bad, "load" if bad else None

    def m_wrong_type(self, doc):
        kv = self.pick_kv(doc)
        if kv is None:
            return "noop", False, None
        choice = self.rng.randrange(5)
        if choice == 0:
            kv.vtype, kv.value, kv.sub, kv.raw = V_STRING, "x", None, None
        elif choice == 1:
            kv.vtype, kv.value, kv.sub, kv.raw = V_BOOL, 1, None, None
        elif choice == 2:
            kv.vtype, kv.value, kv.sub, kv.raw = V_ARRAY, [1, 2], V_INT32, None
        elif choice == 3:
            kv.vtype, kv.value, kv.sub, kv.raw = V_ARRAY, [], V_STRING, None
        else:
            kv.vtype, kv.value, kv.sub, kv.raw = V_FLOAT64, 2.5, None, None
        return f"type {kv.key}->{choice}", False, None

    def m_delete_key(self, doc):
        kv = self.pick_kv(doc)
        if kv is None:
            return "noop", False, None
        doc.drop(kv.key)
        return f"del {kv.key}", False, None

    def m_duplicate_key(self, doc):
        kv = self.pick_kv(doc)
        if kv is None:
            return "noop", False, None
        doc.kvs.insert(self.rng.randrange(len(doc.kvs) + 1), KV(kv.key, V_UINT32, 1))
        return f"dup {kv.key}", True, "read"

    def m_bad_bool(self, doc):
        kv = self.pick_kv(doc, lambda kv: kv.vtype == V_BOOL)
        key = kv.key if kv is not None else "general.fuzz_flag"
        doc.set(key, V_BOOL, self.rng.choice([2, 127, 255]))
        return f"bool {key}", True, "read"

    def m_alignment(self, doc):
        v, t = self.rng.choice([(0, V_UINT32), (3, V_UINT32), (48, V_UINT32), (1, V_UINT32), (64, V_UINT32),
                                (32, V_UINT64), (32, V_INT32), (1 << 12, V_UINT32)])
        kv = doc.get("general.alignment")
        old = [(t_.name, t_.offset) for t_ in doc.tensors]
        doc.set("general.alignment", t, v)
        if v in (0, 3, 48) or t != V_UINT32:
            # the layout stays at 32: the file is invalid whatever its offsets say
            for t_, o in zip(doc.tensors, _layout(doc.tensors, 32)):
                t_.offset = o
            return f"alignment {v}/{t}", True, "read"
        del kv, old
        return f"alignment {v}", False, None

    def m_delete_tensor(self, doc):
        if not doc.tensors:
            return "noop", False, None
        t = doc.tensors.pop(self.rng.randrange(len(doc.tensors)))
        return f"del tensor {t.name}", False, None

    def m_all_tensors(self, doc):
        doc.tensors = []
        return "no tensors", False, None

    def m_rename_tensor(self, doc):
        if not doc.tensors:
            return "noop", False, None
        t = self.rng.choice(doc.tensors)
        new = self.rng.choice(["blk.0", "blk.", "blk.x.attn_q.weight", "blk.99999.attn_q.weight", "output.weight",
                               "token_embd.weight", "blk.-1.ffn_up.weight", "x" * 63, ".", "blk.0.attn_q"])
        if any(o.name == new for o in doc.tensors if o is not t):
            old, t.name = t.name, new
            return f"rename {old}->{new}", True, "read"  # duplicate name
        t.name = new
        return f"rename -> {new}", False, None

    def m_dims(self, doc):
        if not doc.tensors:
            return "noop", False, None
        t = self.rng.choice(doc.tensors)
        c = self.rng.randrange(6)
        if c == 0:  # zero elements, huge other dims
            t.dims, t.data = [t.dims[0] if t.dims else 32, 0, 1 << 40][:max(2, len(t.dims))] + [1 << 20], b""
            return f"zero-element {t.name} {t.dims}", False, None
        if c == 1:
            t.dims = list(reversed(t.dims))
            return f"transpose {t.name}", False, None
        if c == 2:
            t.dims = t.dims + [1 << 62]
            return f"huge dim {t.name}", True, "read"
        if c == 3:
            t.dims = [d * 2 for d in t.dims]
            return f"double {t.name}", True, "read"  # data past its bytes: out of range or overlap
        if c == 4:
            t.dims = [1 << 32, 1 << 32]
            return f"overflow {t.name}", True, "read"
        t.dims = t.dims[:1]
        return f"flatten {t.name}", False, None

    def m_type(self, doc):
        if not doc.tensors:
            return "noop", False, None
        t = self.rng.choice(doc.tensors)
        t.type_id = self.rng.choice([0, 1, 2, 8, 12, 14, 24, 30, 4, 39, 99, 1 << 31])
        return f"type {t.name}={t.type_id}", False, None

    def m_overlap(self, doc):
        if len(doc.tensors) < 2:
            return "noop", False, None
        offs = _layout(doc.tensors, doc.alignment)
        for t, o in zip(doc.tensors, offs):
            t.offset = o
        a, b = self.rng.sample(range(len(doc.tensors)), 2)
        if not doc.tensors[a].data or not doc.tensors[b].data:
            return "noop", False, None
        doc.tensors[a].offset = doc.tensors[b].offset
        return f"overlap {doc.tensors[a].name}/{doc.tensors[b].name}", True, "read"

    def m_offset_out(self, doc):
        if not doc.tensors:
            return "noop", False, None
        for t, o in zip(doc.tensors, _layout(doc.tensors, doc.alignment)):
            t.offset = o
        t = self.rng.choice([t for t in doc.tensors if t.data] or doc.tensors)
        t.offset = self.rng.choice([1 << 40, (1 << 64) - 32, 1 << 33])  # beyond any file written here
        return f"offset out {t.name}", bool(t.data), "read" if t.data else None

    def m_many_keys(self, doc):
        n = self.rng.choice([2000, 20000])
        doc.kvs += [KV(f"k{i}", V_UINT8, i & 255) for i in range(n)]
        return f"{n} keys", False, None

    def m_nested_array(self, doc):
        n = (1 << 20) + self.rng.randrange(1, 9)
        doc.kvs.append(KV("fuzz.nested", V_ARRAY, [(V_UINT8, np.zeros(n, np.uint8))], V_ARRAY))
        return "nested big array", False, None

    def m_counts(self, doc):
        if self.rng.random() < 0.5:
            doc.kv_extra = self.rng.choice([1, 1000, 1 << 40])
        else:
            doc.tensor_extra = self.rng.choice([1, 1 << 20, 1 << 62])
        return "counts", True, "read"

    def m_tokens(self, doc):
        kv = doc.get("tokenizer.ggml.tokens")
        c = self.rng.randrange(6)
        if c == 0 and kv is not None:
            kv.value = list(kv.value)[: self.rng.choice([0, 1, 3, 10])]
            return "tokens cut", False, None
        if c == 1:
            key = self.rng.choice(["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"])
            doc.set(key, V_UINT32, self.rng.choice([(1 << 32) - 1, 1 << 20, 2048, 0]))
            return f"special {key}", False, None
        if c == 2:
            doc.set("tokenizer.ggml.model", V_STRING, self.rng.choice(["", "nope", "bert", "gpt2", "t5", "llama"]))
            return "tokenizer model", False, None
        if c == 3 and kv is not None and len(kv.value):
            vals = list(kv.value)
            for _ in range(5):
                vals[self.rng.randrange(len(vals))] = self.rng.choice(["", "\u2581" * 50, "<0xZZ>", "<0x41>", "\x00"])
            kv.value = vals
            return "tokens edited", False, None
        if c == 4:
            for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
                m = doc.get(k)
                if m is not None:
                    m.value = list(m.value)[: len(m.value) // 2]
            return "vocab arrays cut", False, None
        doc.set("tokenizer.ggml.pre", V_STRING, self.rng.choice(["", "qwen2", "gpt-2", "llama-bpe", "unknown-pre"]))
        return "pre-tokenizer", False, None

    def m_huge_string(self, doc):
        doc.kvs.append(KV("fuzz.big", V_STRING, "a" * self.rng.choice([1 << 16, 1 << 22])))
        return "big string", False, None

    MUTATIONS = ("m_int_boundary", "m_int_boundary", "m_float", "m_wrong_type", "m_delete_key", "m_duplicate_key",
                 "m_bad_bool", "m_alignment", "m_delete_tensor", "m_all_tensors", "m_rename_tensor", "m_dims", "m_dims",
                 "m_type", "m_overlap", "m_offset_out", "m_many_keys", "m_nested_array", "m_counts", "m_tokens",
                 "m_tokens", "m_huge_string")

    def mutate(self, data: bytes, doc_of) -> tuple[bytes, list[str], bool, str | None]:
        """One mutant of the fixture ``data`` (``doc_of()`` gives a fresh Doc of it)."""
        r = self.rng.random()
        if r < 0.12:  # byte level: truncation or flips in the header
            b = bytearray(data)
            head = min(len(b), 4096)
            if self.rng.random() < 0.5:
                cut = self.rng.randrange(len(b))
                return bytes(b[:cut]), [f"truncate {cut}"], False, None
            for _ in range(self.rng.randint(1, 8)):
                b[self.rng.randrange(head)] = self.rng.randrange(256)
            return bytes(b), ["flips"], False, None
        doc = doc_of()
        names, bad, stage = [], False, None
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            name, b_, s_ = getattr(self, self.rng.choice(self.MUTATIONS))(doc)
            names.append(name)
            if b_:  # invalid by construction: no later mutation may undo it (delete the duplicate, ...)
                bad, stage = True, s_
                break
        try:
            return doc.to_bytes(), names, bad, stage
        except (struct.error, OverflowError, ValueError, TypeError):
            return data, names + ["(unencodable: original)"], False, None


def _layout(tensors: list[Tensor], align: int) -> list[int]:
    pos, out = 0, []
    for t in tensors:
        out.append(pos)
        pos += -(-len(t.data) // align) * align
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline, run in a forked child


def pipeline(path: str, res: dict | None = None) -> int:
    """Reader, tokenizer, model build and a two-token decode; returns the dequantized byte count (also
    put in ``res["dq"]`` as soon as the file is parsed)."""
    import torch

    from ..batch import Batch
    from ..context import Context
    from ..gguf.reader import GGUFFile
    from ..models import load_model
    from ..tokenizer import Tokenizer

    f = GGUFFile(path)
    n_el = sum(math.prod(i.shape) for i in f.tensor_infos.values())
    if res is not None:
        res["dq"] = 4 * n_el
    tok = Tokenizer.from_gguf(f)
    ids = tok.encode("Hello world, fuzz.", add_special=True)
    tok.decode(ids) if hasattr(tok, "decode") else None
    model = load_model(f, device="cpu")
    with torch.inference_mode():
        ctx = Context(model, n_ctx=16, n_ubatch=8)
        t = [i for i in ids[:2] if 0 <= i < model.args.n_vocab] or [0]
        ctx.decode(Batch(t, output=[True] * len(t)))
    return 4 * n_el


def _rss_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _release_free_heap() -> None:
    """Hand the free memory of the heap inherited from the parent back to the kernel (glibc's
    ``malloc_trim``). Otherwise an allocation in the child that reuses a free block the parent had
    touched only copies shared pages on write, which leaves the resident size, and so the peak
    measured, where it was: a long-lived parent (a test run) has hundreds of MiB of such blocks."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim by this name
        pass


def _child(path: str, size: int, wfd: int, cap: int) -> None:
    """Runs in the fork: reset the peak-RSS mark, cap the address space, run, report one JSON line."""
    from ..errors import GGUFRuntimeError

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        torch.set_num_threads(1)
    except Exception:  # noqa: BLE001
        pass
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM
    except OSError:
        pass
    base = _rss_kib("VmRSS")
    vm = _rss_kib("VmSize")
    try:
        resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + cap, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
    res: dict = {}
    try:
        res["dq"] = pipeline(path, res)
        res["outcome"] = "accepted"
    except GGUFRuntimeError as e:
        msg = str(e)
        res["outcome"] = "rejected" if msg and "\n" not in msg else "crash"
        res["msg"] = msg[:300]
    except BaseException as e:  # noqa: BLE001 - everything else is what we are looking for
        res["outcome"] = "crash"
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(fr.filename).name}:{fr.lineno}" for fr in reversed(tb) if "gguf_runtime" in fr.filename),
                     "?")
        res["msg"] = f"{type(e).__name__} at {where}: {str(e)[:200]}"
    res["grow"] = max(0, _rss_kib("VmHWM") - base) * 1024
    os.write(wfd, (json.dumps(res) + "\n").encode())
    os._exit(0)


def run_one(path: str, timeout: float = 5.0) -> dict:
    size = os.path.getsize(path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            _child(path, size, w, cap=8 * size + (1 << 30))
        finally:
            os._exit(3)
    os.close(w)
    t0 = time.monotonic()
    buf = b""
    hang = False
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 65536)
            if chunk:
                buf += chunk
            else:
                break
        except BlockingIOError:
            pass
        if time.monotonic() - t0 > timeout:
            hang = True
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    os.waitpid(pid, 0)
    os.close(r)
    secs = time.monotonic() - t0
    if hang:
        return {"outcome": "hang", "secs": secs}
    try:
        res = json.loads(buf.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"outcome": "crash", "msg": "child died without a report"}
    res["secs"] = secs
    budget = 2 * (size + res.get("dq", 0)) + (64 << 20)
    if res["outcome"] != "hang" and res.get("grow", 0) > budget:
        res["outcome_before"] = res["outcome"]
        res["outcome"] = "alloc"
    return res


def GGUFFile_arch(path: Path) -> str:
    from ..gguf.reader import GGUFFile

    return GGUFFile(path).arch


def _preload(archs: list[str]) -> None:
    """Import everything the pipeline needs once, in the parent (computing nothing: no thread pools
    exist before the fork), so that each child starts at once."""
    from .. import batch, context  # noqa: F401
    from ..models import model_class
    from ..tokenizer import Tokenizer  # noqa: F401

    for a in set(archs):
        try:
            model_class(a)
        except Exception:  # noqa: BLE001
            pass


def default_fixtures(gguf_dir: Path | None = None) -> list[Path]:
    """The smallest fixture of every architecture in models.ARCHS."""
    from ..gguf.reader import GGUFFile
    from ..models import ARCHS

    d = gguf_dir or Path(__file__).resolve().parents[2].parent / "shared" / "models" / "gguf"
    best: dict[str, Path] = {}
    for p in sorted(d.glob("*.gguf"), key=lambda p: p.stat().st_size):
        try:
            arch = GGUFFile(p).arch
        except Exception:  # noqa: BLE001
            continue
        if arch in ARCHS and arch not in best:
            best[arch] = p
    return list(best.values())


@dataclass
class Summary:
    mutants: int = 0
    counts: dict = field(default_factory=lambda: {k: 0 for k in ("accepted", "rejected", "crash", "hang", "alloc",
                                                                 "silent")})
    bugs: list = field(default_factory=list)
    seconds: float = 0.0
    max_secs: float = 0.0

    @property
    def n_bugs(self) -> int:
        return sum(self.counts[k] for k in ("crash", "hang", "alloc", "silent"))


def fuzz(files: list[Path], n: int, seed: int = 0, seconds: float | None = None, timeout: float = 5.0,
         keep: Path | None = None, log=None) -> Summary:
    """Run ``n`` mutants (or until ``seconds`` pass) spread over ``files``; see the module docstring."""
    rng = random.Random(seed)
    mut = Mutator(rng)
    sources = [(p, p.read_bytes()) for p in files]
    docs = {p: Doc.from_file(p) for p, _ in sources}
    import copy

    _preload([GGUFFile_arch(p) for p, _ in sources])
    s = Summary()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-") as tmp:
        target = Path(tmp) / "mutant.gguf"
        for i in range(n):
            if seconds is not None and time.monotonic() - t0 > seconds:
                break
            src, data = sources[i % len(sources)]
            mutant, names, bad, stage = mut.mutate(data, lambda: copy.deepcopy(docs[src]))
            target.write_bytes(mutant)
            res = run_one(str(target), timeout)
            out = res["outcome"]
            if out == "accepted" and bad:
                out = "silent"
            s.counts[out] += 1
            s.mutants += 1
            s.max_secs = max(s.max_secs, res["secs"])
            if out in ("crash", "hang", "alloc", "silent"):
                s.bugs.append({"i": i, "fixture": src.name, "mutations": names, "outcome": out,
                               "msg": res.get("msg", ""), "grow": res.get("grow"), "secs": round(res["secs"], 2)})
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{out}-{i}-{src.stem}.gguf").write_bytes(mutant)
                if log:
                    log(f"[{i}] {out}: {src.name} {names} {res.get('msg', '')} grow={res.get('grow')} "
                        f"{res['secs']:.2f}s")
    s.seconds = time.monotonic() - t0
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gguf_runtime.tools.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="fixture GGUF files (default: one per architecture)")
    ap.add_argument("-n", "--mutants", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--timeout", type=float, default=5.0, help="a mutant running longer is a hang")
    ap.add_argument("--keep", type=Path, default=None, help="folder to save the mutants that found bugs")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    files = a.files or default_fixtures()
    if not files:
        print("error: no fixture files", file=sys.stderr)
        return 2
    s = fuzz(files, a.mutants, a.seed, a.seconds, a.timeout, a.keep, log=lambda m: print(m, file=sys.stderr))
    rep = {"fixtures": [p.name for p in files], "seed": a.seed, "mutants": s.mutants, **s.counts,
           "seconds": round(s.seconds, 1), "slowest_mutant_s": round(s.max_secs, 2), "bugs": s.bugs[:50]}
    if a.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{s.mutants} mutants of {len(files)} fixtures in {s.seconds:.0f} s (slowest {s.max_secs:.2f} s): "
              + ", ".join(f"{k} {v}" for k, v in s.counts.items()))
    return 1 if s.n_bugs else 0


if __name__ == "__main__":
    sys.exit(main())
