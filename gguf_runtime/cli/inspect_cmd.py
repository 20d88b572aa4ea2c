"""``gguf-runtime inspect FILE [--json]``: architecture, key metadata and a table of tensors."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import typer
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the reader imports torch: `inspect --help` must not
    from gguf_runtime.gguf.reader import GGUFFile

COMMAND_KWARGS = {"help": "Show a GGUF file's architecture, metadata and tensors (like gguf-dump, readable)."}

_LIST_MAX = 8  # arrays longer than this are summarised by their length
_STR_MAX = 96
_ROWS_MAX = 500  # metadata rows shown in the table (4x as many tensor rows)


def _vtype(f: GGUFFile, key: str) -> str:
    t, sub = f.field_types[key]
    return f"{t.name.lower()}[{sub.name.lower()}]" if sub is not None else t.name.lower()


def _plain(v):
    """JSON-safe value: non-finite floats become strings; a huge numeric array nested in an array
    (kept as numpy by the reader) becomes a summary holding its length."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, np.ndarray):
        return {"type": f"array[{v.dtype.name}]", "length": len(v), "head": _plain(v[:3].tolist())}
    return [_plain(x) for x in v] if isinstance(v, list) else v


def _summary(f: GGUFFile, key: str):
    """The value, or for long arrays a summary holding their length (vocabularies, merges)."""
    v = f.metadata[key]
    if isinstance(v, (list, np.ndarray)) and len(v) > _LIST_MAX:  # numpy: huge numeric arrays
        head = v[:3].tolist() if isinstance(v, np.ndarray) else v[:3]
        return {"type": _vtype(f, key), "length": len(v), "head": _plain(head)}
    return _plain(v)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


_FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3moe": "Qwen3-MoE", "phi3": "Phi-3",
             "gpt2": "GPT-2", "mamba": "Mamba", "mamba2": "Mamba-2", "bert": "BERT"}


def family(f: GGUFFile) -> dict:
    """The model family and the hyperparameters that tell its variants apart: experts (used of total),
    the layers with biases, per-head Q/K norms, the sliding window, learned positions. Read from the
    metadata and tensor names only; a malformed value is left out, never an error."""
    arch = f.arch or "?"

    def num(k: str):
        v = f.metadata.get(f"{arch}.{k}")
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    n_exp, n_used = num("expert_count") or 0, num("expert_used_count") or 0
    out: dict = {"family": "Mixtral (Llama with experts)" if arch == "llama" and n_exp else _FAMILIES.get(arch, arch)}
    for key, k in (("layers", "block_count"), ("embedding", "embedding_length"), ("heads", "attention.head_count"),
                   ("kv_heads", "attention.head_count_kv"), ("context", "context_length"), ("rope_base", "rope.freq_base")):
        if num(k) is not None:
            out[key] = num(k)
    if n_exp:
        out["experts"] = {"used": n_used, "total": n_exp}
    names = f.tensor_infos
    biases = sorted({n.split(".")[2] for n in names if n.startswith("blk.0.") and n.endswith(".bias") and "norm" not in n})
    if biases:
        out["biases"] = biases
    if "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names:
        out["qk_norm"] = True
    if num("attention.sliding_window") is not None:
        out["sliding_window"] = num("attention.sliding_window")
    if "position_embd.weight" in names:
        out["positions"] = "learned"
    return out


def report(f: GGUFFile) -> dict:
    """Everything ``inspect`` shows, as plain data (the ``--json`` output)."""
    tensors = [
        {"name": i.name, "type": i.qtype.name, "shape": list(i.shape), "n_elements": math.prod(i.shape),
         "n_bytes": i.n_bytes, "offset": i.offset}
        for i in f.tensor_infos.values()
    ]
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "n_elements": 0, "n_bytes": 0})
    for t in tensors:
        agg = by_type[t["type"]]
        agg["tensors"] += 1
        agg["n_elements"] += t["n_elements"]
        agg["n_bytes"] += t["n_bytes"]
    n_el, n_by = sum(t["n_elements"] for t in tensors), sum(t["n_bytes"] for t in tensors)
    return {
        "path": str(f.path), "file_size": f.file_size, "gguf_version": f.version, "architecture": f.arch,
        "name": f.metadata.get("general.name"), "alignment": f.alignment, "data_offset": f.data_offset,
        "model": family(f),
        "metadata": {k: _summary(f, k) for k in f.metadata},
        "tensors": tensors,
        "totals": {"tensors": len(tensors), "n_elements": n_el, "n_bytes": n_by,
                   "bits_per_weight": round(8 * n_by / n_el, 4) if n_el else None,
                   "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["n_bytes"]))},
    }


def _show(value, vtype: str) -> str:
    """One table cell: strings quoted, float32 at float32 precision, long things cut."""
    if isinstance(value, dict):  # summarised array
        return f"{value['length']} items: {', '.join(map(repr, value['head']))}, ..."
    if "float32" in vtype:
        value = [float(str(np.float32(x))) for x in value] if isinstance(value, list) else float(str(np.float32(value)))
    s = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return escape(s if len(s) <= _STR_MAX else s[:_STR_MAX - 3] + "...")


def _print(f: GGUFFile, rep: dict) -> None:
    con = Console(width=None if Console().is_terminal else 120, highlight=False)
    tot = rep["totals"]
    con.print(f"[bold]{escape(rep['path'])}[/bold]  GGUF v{rep['gguf_version']}, {_human(rep['file_size'])}")
    con.print(f"architecture: [bold]{escape(rep['architecture'] or '?')}[/bold]   "
              f"name: {escape(str(rep['name'] or '-'))}   tensors: {tot['tensors']}   "
              f"parameters: {tot['n_elements']:,}   data: {_human(tot['n_bytes'])}")

    fam = dict(rep["model"])
    parts = [f"[bold]{escape(str(fam.pop('family')))}[/bold]"]
    if "experts" in fam:
        e = fam.pop("experts")
        parts.append(f"experts: {e['used']} used of {e['total']}")
    parts += [f"{k.replace('_', ' ')}: {escape(', '.join(v) if isinstance(v, list) else str(v))}" for k, v in fam.items()]
    con.print("family: " + "   ".join(parts))

    meta = Table(title="metadata", title_justify="left", show_lines=False)
    meta.add_column("key", style="cyan", overflow="fold")
    meta.add_column("type")
    meta.add_column("value", overflow="fold")
    for i, (k, v) in enumerate(rep["metadata"].items()):
        if i == _ROWS_MAX:  # a table of thousands of rows takes rich seconds: --json has them all
            meta.add_row("...", "", f"and {len(rep['metadata']) - i} more keys (see --json)")
            break
        meta.add_row(escape(k), escape(_vtype(f, k)), _show(v, _vtype(f, k)))
    con.print(meta)

    tab = Table(title="tensors (shape outermost first)", title_justify="left")
    for col, just in (("#", "right"), ("name", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right")):
        tab.add_column(col, justify=just, overflow="fold")
    for i, t in enumerate(rep["tensors"]):
        if i == 4 * _ROWS_MAX:
            tab.add_row("...", f"and {len(rep['tensors']) - i} more tensors (see --json)", "", "", "")
            break
        tab.add_row(str(i), escape(t["name"]), t["type"], " x ".join(map(str, t["shape"])), f"{t['n_bytes']:,}")
    con.print(tab)

    types = Table(title="totals by type", title_justify="left")
    for col in ("type", "tensors", "elements", "bytes", "bits/weight"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for name, agg in tot["by_type"].items():
        bpw = 8 * agg["n_bytes"] / agg["n_elements"] if agg["n_elements"] else 0
        types.add_row(name, str(agg["tensors"]), f"{agg['n_elements']:,}", f"{agg['n_bytes']:,}", f"{bpw:.2f}")
    types.add_row("total", str(tot["tensors"]), f"{tot['n_elements']:,}", f"{tot['n_bytes']:,}",
                  f"{tot['bits_per_weight'] or 0:.2f}", style="bold")
    con.print(types)


def command(
    file: Path = typer.Argument(..., help="GGUF file to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Show a GGUF file's architecture, key metadata and a table of its tensors."""
    from gguf_runtime.gguf.reader import GGUFFile

    with GGUFFile(file) as f:
        rep = report(f)
        if as_json:
            typer.echo(json.dumps(rep, ensure_ascii=False, indent=1))
        else:
            _print(f, rep)
