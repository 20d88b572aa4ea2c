"""The tools behind the CLI (llama.cpp's tools/): perplexity and the choice tasks, embeddings,
generation, drift."""
