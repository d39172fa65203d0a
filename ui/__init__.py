"""The Gradio face of kvmerge-local: chat with a long document and see what merging the KV cache saved.

Importing this package does nothing; :func:`ui.app.build_app` builds the app and :func:`ui.app.launch` serves
it (``kvmerge-local ui``).
"""
