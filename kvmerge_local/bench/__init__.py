"""The quality benchmark: every compression method x budget on long-context tasks (``kvmerge-local bench``).

- :mod:`.harness`: task files, method/budget parsing, scoring, running (one Session per method x budget);
- :mod:`.perplexity`: perplexity of held-out natural text with the prefix compressed;
- :mod:`.report`: results.json / results.md / PNG plots;
- :mod:`.cli`: the command line.
"""
