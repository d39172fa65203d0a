"""kvmerge-local: long-document chat on local quantized Llama models by merging the KV cache."""
__version__ = "0.1.0"
