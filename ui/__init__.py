"""The Gradio face of kvmerge-local: chat with a long document and see what merging the KV cache saved.

Installed as ``kvmerge_local.ui`` (the folder stays at the top of the repository; ``package-dir`` in
pyproject.toml maps it).  Importing this package does nothing; :func:`kvmerge_local.ui.app.build_app` builds the
app and :func:`kvmerge_local.ui.app.launch` serves it (``kvmerge-local ui``).  Only the CLI's ``ui`` command
imports it.
"""
