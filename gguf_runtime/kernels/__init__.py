"""Batch-invariant kernels: a row's result never depends on how many other rows share the call.

Every model computes through these, under the :class:`~gguf_runtime.numerics.Numerics` in force:

- :mod:`.linear`: products padded to the calibrated tile (:mod:`.calibrate`), or read straight from
  GGUF blocks (``qlinear``, ``--weights quant``);
- :mod:`.attention`: fixed key blocks in a fixed order (called by memory views' ``attend``);
- :mod:`.elementwise`: float32 norms, lane-wise transcendental functions;
- :mod:`.rope`: rotary embeddings; :mod:`.ggml`: llama.cpp's CPU roundings (opt-in);
- :mod:`.ssm`, :mod:`.ssd`: Mamba's selective scan and Mamba2's SSD scan, aligned to positions.
"""
from .attention import attention
from .calibrate import KV_BLOCK
from .elementwise import exp, geglu, gelu, gelu_tanh, layer_norm, log_softmax, rms_norm, silu, softcap, softcap_, softplus, swiglu, tanh
from .linear import linear, qlinear, qmatmul
from .rope import rope, rope_freqs

__all__ = ["attention", "KV_BLOCK", "exp", "geglu", "gelu", "gelu_tanh", "layer_norm", "log_softmax", "rms_norm", "silu", "swiglu",
           "softcap", "softcap_", "softplus", "tanh", "linear", "qlinear", "qmatmul", "rope", "rope_freqs"]
