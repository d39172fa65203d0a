"""Rows of `kvmerge-local bench --kv-type ...` runs paired with the f16 full cache of another run on the same
documents (same --seed, --n-per-task, --lengths): token retention, exact-match retention, dNLL (README, "Memory,
not cells").

    python scripts/experiments/cross_kv_type.py F16_DIR OTHER_DIR [OTHER_DIR ...]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from kvmerge_local.quality.suite_report import _boot, _boot_diff  # noqa: E402

A = json.load(open(os.path.join(sys.argv[1], "results.json")))["rows"]
ref = {(r["doc"], r["q"]): r for r in A if r["method"] == "full"}
for name in sys.argv[2:]:
    R = json.load(open(os.path.join(name, "results.json")))
    kv = R["meta"].get("kv_type")
    confs = {}
    for r in R["rows"]:
        confs.setdefault((r["method"], r["budget"]), []).append(r)
    for (m, b), rs in confs.items():
        docs = [r["doc"] for r in rs]
        f = [ref[(r["doc"], r["q"])] for r in rs]
        tok = _boot(docs, np.array([r["tok_acc"] for r in rs]), np.array([x["tok_acc"] for x in f]))
        ex = _boot(docs, np.array([r["score"] for r in rs]), np.array([x["score"] for x in f]))
        d = _boot_diff(docs, np.array([r["nll"] - x["nll"] for r, x in zip(rs, f)]))
        print(f"{kv:5s} {m:14s} {b:4g} tokret {100*tok['retention']:.0f} ({100*tok['ret_lo']:.0f}-{100*tok['ret_hi']:.0f}) "
              f"exact {100*ex['retention']:.0f} ({100*ex['ret_lo']:.0f}-{100*ex['ret_hi']:.0f}) dNLL {d[0]:.3f} ({d[1]:.3f}-{d[2]:.3f}) n={len(rs)}")
