"""Training the embedded default model (``kvmerge-tiny.gguf``): data and task generator (:mod:`.data`, no
torch), the PyTorch model (:mod:`.model`), the training loop (:mod:`.train`) and the GGUF exporter
(:mod:`.export`).  torch is imported only by ``model``, ``train`` and ``export`` (``pip install .[train]``);
importing this package imports nothing heavy."""
