"""The calibration cache (issue 20): a new process reads the rule its machine key calibrated to,
a corrupt or foreign cache file is recalibrated over, and results do not depend on the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = """
import json, sys, torch
from gguf_runtime.kernels import calibrate
from gguf_runtime.models import load_model
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
r = calibrate.rule(torch.get_num_threads())
m = load_model(sys.argv[1])
c = Context(m, n_ctx=64)
c.decode(Batch(list(range(3, 40)), output=[True] * 37))
print(json.dumps({"rule": repr(r), "cached": calibrate.report().get("cached", False),
                  "sum": float(c.get_logits().double().sum()), "bits": c.get_logits().view(torch.int32).sum().item()}))
"""


def _probe(cache, gguf, **env):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(gguf)], capture_output=True, text=True, check=True,
                         env={**os.environ, "GGUF_RUNTIME_CACHE": str(cache), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_roundtrip_and_recovery(tmp_path, gguf_dir):
    gguf = gguf_dir / "llama-tiny-f32.gguf"
    first = _probe(tmp_path, gguf)
    assert not first["cached"] and (tmp_path / "calibration.json").is_file()
    second = _probe(tmp_path, gguf)
    assert second["cached"] and second["rule"] == first["rule"] and second["bits"] == first["bits"]
    (tmp_path / "calibration.json").write_text("{not json")  # corrupt: calibrated again and rewritten
    third = _probe(tmp_path, gguf)
    assert not third["cached"] and third["bits"] == first["bits"]
    json.loads((tmp_path / "calibration.json").read_text())
    fresh = _probe(tmp_path, gguf, GGUF_RUNTIME_CALIBRATION="fresh")  # ignore the cache
    assert not fresh["cached"] and fresh["bits"] == first["bits"]
