"""Product defaults, importable without loading Numba or llama.cpp (the CLI and the UI read them)."""

#: What the product uses when nobody picks a method (Session, CLI, UI, demo, ``compress()``).  Chosen by the
#: real-model suite (README, "Results on the real model"; SmolLM2-135M-Instruct, 18 RULER-style documents, 30
#: questions): KVzip keeps the most of the full cache's answer tokens at every budget (93% at 50% of the cells,
#: 63% at 25%; SnapKV 72 / 52, TOVA 71 / 39, StreamingLLM 62 / 45, H2O 60 / 44), and merging on top of its score
#: (kvmerger+kvzip, cam+kvzip) does not beat it.
DEFAULT_METHOD = "kvzip"

#: The cache element types a context can be opened with (``--kv-type``; the bridge maps them to ggml types).
KV_TYPE_NAMES = ("f16", "f32", "bf16", "q8_0", "q4_0")

#: The memory budget the CLI, the UI and the demo use when nobody gives ``--budget`` or ``--kv-type``: this fraction
#: of the bytes an f16 cache of the whole document takes, met by quantizing the cache first and evicting the rest
#: with the method (kvmerge_local/memory.py).  Chosen by the real-model suite (README, "Memory, not cells").
DEFAULT_MEMORY = 0.25
