"""Tiny GGUF model builder (random, well-scaled LLAMA/Qwen2/Qwen3 weights with the real Llama-2 tokenizer).

Used by the tests, the speed benchmarks and the training export (``train/export.py`` writes the embedded
demo model with its GGUF writer). Importing this package loads nothing.
"""
