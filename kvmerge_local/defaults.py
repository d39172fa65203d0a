"""Product defaults, importable without loading Numba or llama.cpp (the CLI and the UI read them)."""

#: What the product uses when nobody picks a method (Session, CLI, UI, demo).  Chosen by the quality
#: benchmark, not by taste (docs/ALGORITHMS.md): on the embedded model KVMerger's budget mode (adjacency-constrained
#: clustering to exactly m sets) scored 83% at a 50% budget against 85% for the full cache, the paper's threshold
#: mode 45% (README, "Quality benchmark").  ``kvmerger`` stays the paper's Algorithm 1.
DEFAULT_METHOD = "kvmerger+budget"
