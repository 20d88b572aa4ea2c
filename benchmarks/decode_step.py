"""One SmolLM2 decode step: wall time, the share spent in ``kernels.linear`` and the GB/s it reads.

    python benchmarks/decode_step.py [THREADS]

Decodes a 16-token prompt, then times 12 single-token steps (best kept), invariant and not, with
``kernels.linear`` wrapped by a timer; the weight bytes are those of the resident Linear weights
(float32), read once per step. Shows whether batch-1 decode is bound by weight bytes (issue 20).
"""
import sys, time
from gguf_runtime.threads import set_wait_policy; set_wait_policy()
import torch
from gguf_runtime import fixtures, numerics
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.models import load_model
from gguf_runtime.models.layers import Linear
import gguf_runtime.kernels as K

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
m = load_model(fixtures.smollm2_path())
wbytes = sum(mod.weight.numel() * mod.weight.element_size() for mod in m.modules() if isinstance(mod, Linear) and mod.weight is not None)
lin = [0.0]
real = K.linear
def timed(*a, **k):
    t = time.perf_counter(); r = real(*a, **k); lin[0] += time.perf_counter() - t; return r
import gguf_runtime.models.layers as layers
layers.kernels.linear = timed
for inv in (True, False):
    nx = numerics.Numerics(invariant=inv)
    ctx = Context(m, n_ctx=256, numerics=nx)
    ctx.decode(Batch(list(range(1, 17))))
    best = (1e9, 0)
    for i in range(12):
        lin[0] = 0.0
        t = time.perf_counter(); ctx.decode(Batch([100 + i])); dt = time.perf_counter() - t
        best = min(best, (dt, lin[0]))
    dt, tl = best
    print(f"invariant={inv}: step {dt*1e3:.1f} ms, linear {tl*1e3:.1f} ms ({tl/dt:.0%}), "
          f"weights {wbytes/1e6:.0f} MB -> {wbytes/tl/1e9:.1f} GB/s in linear")
