"""The quality benchmark: every compression method x budget on long-context tasks (``kvmerge-local bench``).

Its data (task files, committed results.md and plots) lives in ``benchmarks/quality/``; the speed benchmarks are
the scripts in ``benchmarks/speed/``.

- :mod:`.tasks`: the synthetic task generator (``scripts/make_tasks.py``; the trainer reuses it);
- :mod:`.harness`: task files, method/budget parsing, the one answer scorer, running (one Session per method x
  budget);
- :mod:`.perplexity`: perplexity of held-out natural text with the prefix compressed;
- :mod:`.report`: results.json / results.md / PNG plots;
- :mod:`.ruler`, :mod:`.suite`, :mod:`.suite_cli`, :mod:`.suite_report`: the RULER-style real-model suite
  (``kvmerge-local bench`` without ``--tasks``);
- :mod:`.cli`: the command line.
"""
