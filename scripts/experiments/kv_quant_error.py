"""How much llama.cpp's q8_0 / q4_0 cache blocks perturb K and V of a real model, with and without the Hadamard
rotation llama.cpp applies before quantizing (docs/MEMORY.md).

Ingests a document into an f16 cache (SmolLM2-135M-Instruct by default), reads K and V back, and quantizes them
again with the bit-exact codec (kvmerge_local.codec) as a q8_0 / q4_0 cache would store them.  Prints the
relative error ||x - deq(q(x))|| / ||x|| over all rows, and the worst layer's, for K and V.

    python scripts/experiments/kv_quant_error.py [MODEL] [DOCUMENT]
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import numpy as np  # noqa: E402

from kvmerge_local.bridge.state import TYPE_IDS  # noqa: E402
from kvmerge_local.codec import dequantize_rows, quantize_rows  # noqa: E402
from kvmerge_local.codec.hadamard import rot_size, rotate, unrotate  # noqa: E402
from kvmerge_local.engine import Session  # noqa: E402
from kvmerge_local.models import default_document_model  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else str(default_document_model())
doc = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "..", "kvmerge_local",
                                                          "data", "sample.pdf")
doc = Path(doc)
with Session.open(model, n_ctx=4096, method="full", budget=1.0, kv_type="f16", n_threads=2) as s:
    s.ingest(doc)
    st = s.bridge.read()
    k = np.asarray(st.k4, np.float32)
    v = np.asarray(st.v4, np.float32)
L, H, N, D = k.shape
print(f"{model}: {L} layers, {H} KV heads, head_dim {D}, {N} cells")
for name, x in (("K", k), ("V", v)):
    rows = np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(L * N, H * D))  # cache rows: [head0 | head1 ...]
    for t in ("q8_0", "q4_0"):
        for rot in (True, False):
            n = rot_size(D, name.lower()) if rot else 0
            xr = rotate(rows, n) if n else rows
            y = dequantize_rows(quantize_rows(np.ascontiguousarray(xr, np.float32), TYPE_IDS[t]), TYPE_IDS[t])
            y = unrotate(y, n) if n else y
            e = (y - rows).reshape(L, N, H * D)
            r = rows.reshape(L, N, H * D)
            per_layer = np.linalg.norm(e, axis=(1, 2)) / np.linalg.norm(r, axis=(1, 2))
            total = np.linalg.norm(e) / np.linalg.norm(r)
            print(f"{name} {t} {'rotated' if rot else 'plain  '}: relative error {total:.4f} "
                  f"(worst layer {per_layer.max():.4f}, layer {int(per_layer.argmax())})")
