"""Issue 12: compare query-agnostic scorers offline on score_dump.py's dumps: for each budget, the mean fraction
of (layer, head) that keep the answer's value tokens ("val") and the needle sentence's tokens ("sent").

    python scripts/experiments/score_eval.py DUMPDIR [BUDGETS]
"""
import glob
import os
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view as swv


def keep_mask(score, m, n_sink=4, n_recent=1):
    """bool[L, H, N]: sinks + recent + top rest of score (float[L, H or 1, N])."""
    L, H, N = score.shape
    s = score.astype(np.float64).copy()
    s[..., :n_sink] = np.inf
    s[..., N - n_recent:] = np.inf
    idx = np.argpartition(-s, m - 1, axis=-1)[..., :m]
    out = np.zeros((L, H, N), bool)
    np.put_along_axis(out, idx, True, axis=-1)
    return out


def rank01(x):
    r = np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float32)
    return r / max(1, x.shape[-1] - 1)


def maxpool(x, w):
    if w <= 0:
        return x
    p = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(w, w)], mode="edge")
    return swv(p, 2 * w + 1, axis=-1).max(-1)


def scorers(z):
    L, H, N = z["ev_reconstruct"].shape
    sup = z["surprisal"][None, None, :].astype(np.float32)
    kz = z["ev_reconstruct"]
    rng = np.random.default_rng(0)
    out = {
        "random": rng.random((L, H, N)),
        "streaming": np.broadcast_to(np.arange(N, dtype=np.float32), (L, 1, N)),
        "kvzip": kz,
        "h2o": z["ev_all"],
        "snapkv": z["ev_window"],
        "surprisal": sup,
        "surp_pool2": maxpool(sup, 2),
        "surp_pool4": maxpool(sup, 4),
        "surp_pool8": maxpool(sup, 8),
        "kz+surp": rank01(kz) + rank01(np.broadcast_to(sup, kz.shape)),
        "kz+surp_p4": rank01(kz) + rank01(np.broadcast_to(maxpool(sup, 4), kz.shape)),
        "vnorm": z["vnorm"],
        "knorm": z["knorm"],
        "kz*vnorm": kz * z["vnorm"],
        "kz_headnorm": kz / kz.mean(-1, keepdims=True),
        "kz_layermean": rank01(kz).mean(1, keepdims=True),
        "kz_tokmean": np.broadcast_to(rank01(kz).mean((0, 1))[None, None], (L, 1, N)),
    }
    return out


def main():
    d = sys.argv[1]
    budgets = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "0.5,0.25").split(",")]
    res = {}
    files = sorted(glob.glob(os.path.join(d, "*.npz")))
    for f in files:
        z = dict(np.load(f))
        N = z["ev_reconstruct"].shape[-1]
        qs = sorted(int(k[4:]) for k in z if k.startswith("val_"))
        sc_all = scorers(z)
        for qi in qs:
            if f"evq_{qi}" in z:
                sc_all[f"q-aware{qi}"] = z[f"evq_{qi}"]
        for name, sc in sc_all.items():
            for b in budgets:
                km = keep_mask(np.asarray(sc), int(b * N))
                km = km if km.shape[1] > 1 else km  # broadcast below
                for qi in qs:
                    if name.startswith("q-aware") and name != f"q-aware{qi}":
                        continue
                    name2 = "q-aware" if name.startswith("q-aware") else name
                    for part in ("val", "sent"):
                        ix = z[f"{part}_{qi}"]
                        if len(ix) == 0:
                            continue
                        frac = km[..., ix].mean()
                        allk = km[..., ix].all(-1).mean()  # (l,h) keeping every token of it
                        res.setdefault((name2, b, part), []).append((frac, allk))
    print(f"{len(files)} documents")
    print(f"{'scorer':14s} {'budget':>6s} {'val kept':>9s} {'val all':>8s} {'sent kept':>10s} {'sent all':>9s}")
    for b in budgets:
        for name in scorers.__code__.co_consts[0:0] or sorted({k[0] for k in res}):
            v = np.array(res[(name, b, "val")])
            s = np.array(res[(name, b, "sent")])
            print(f"{name:14s} {b:6.2f} {v[:, 0].mean():9.3f} {v[:, 1].mean():8.3f} {s[:, 0].mean():10.3f} "
                  f"{s[:, 1].mean():9.3f}")


if __name__ == "__main__":
    main()
