"""``python -m gguf_runtime ...`` (and ``torchrun -m gguf_runtime ...``): the ``gguf-runtime`` command."""
from gguf_runtime.cli.main import main

main()
