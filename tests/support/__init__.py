"""Test toolkit: tiny LLAMA GGUF models (:mod:`.tiny_model`), a NumPy reference forward pass
(:mod:`.reference`), a minimal low-level llama.cpp driver (:mod:`.llama_runner`) and pytest fixtures
(:mod:`.fixtures`, loaded by ``tests/conftest.py``)."""
