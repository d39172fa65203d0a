"""The CPU in-place apply as a permutation (kernels.inplace / inplace_swap) and its exact undo, without llama.cpp.

Per layout (K/V rows of every cache type, transposed V of the float types) and per plan kind (selection, merges,
copies from behind, cells read by several slots, KVMerger, CaM): every copy slot holds its source's raw bytes,
and ``InplaceUndo.restore()`` gives back the original tensors bit for bit -- whole tensors, cells ``m..`` too.
A restore done wrong (swaps undone in the wrong order, late slots not put back) is caught, and a failure part-way
through the layers restores the layers that were written.  Bit-identity with the state path is
tests/test_inplace.py's (on real llama.cpp caches).
"""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local import codec
from kvmerge_local.kernels import inplace as I
from kvmerge_local.kernels import inplace_swap as S
from kvmerge_local.methods import get_method
from kvmerge_local.plan import Plan

L, H, N, d, m, KV = 2, 2, 24, 32, 10, 28
F32, F16, Q4, Q8, BF16 = 0, 1, 2, 8, 30
LAYOUTS = [(F16, F16, False), (F16, F16, True), (F32, F32, False), (F32, F32, True), (BF16, BF16, False),
           (BF16, BF16, True), (Q8, Q8, False), (Q4, Q4, False), (Q8, F16, True)]


def _encode(x: np.ndarray, t: int) -> np.ndarray:
    """float32[n, e] -> raw uint8[n, row_bytes] of ggml type t."""
    if t == F32:
        return np.ascontiguousarray(x, np.float32).view(np.uint8)
    if t == F16:
        return x.astype(np.float16).view(np.uint8)
    if t == BF16:
        return codec.f32_to_bf16_bits_array(x).view(np.uint8)
    return codec.quantize_rows(np.ascontiguousarray(x, np.float32), t)


def _layers(x: np.ndarray, t: int, trans: bool, rng) -> list:
    """x float32[L, H, KV, d] -> per layer uint8[KV, row_bytes], or transposed [H*d, KV] elements."""
    if not trans:
        return [_encode(x[l].transpose(1, 0, 2).reshape(KV, H * d), t).copy() for l in range(L)]
    dt = {F32: np.float32, F16: np.float16, BF16: np.uint16}[t]
    return [_encode(x[l].transpose(0, 2, 1).reshape(H * d * KV, 1), t).view(dt).reshape(H * d, KV).copy()
            for l in range(L)]


def _plan(src: np.ndarray, wk=None, wv=None, offsets=None) -> Plan:
    if offsets is None:
        offsets = np.zeros((L, H, m + 1), np.int64)
        offsets[..., 1:] = np.arange(1, m + 1)
        offsets += (np.arange(L * H) * m).reshape(L, H, 1)
    ones = np.ones(len(src), np.float32)
    pos = np.broadcast_to(np.arange(m, dtype=np.int32), (L, H, m)).copy()
    return Plan(N, offsets, np.asarray(src, np.int32), ones if wk is None else wk, ones if wv is None else wv, pos)


def _plans() -> dict:
    rng = np.random.default_rng(3)
    sel = np.concatenate([np.sort(rng.choice(N - 1, m - 1, replace=False)).tolist() + [N - 1]
                          for _ in range(L * H)])
    dup = np.concatenate([np.sort(rng.choice(N, m, replace=True)) for _ in range(L * H)])  # repeats, s < j
    back = np.concatenate([rng.permutation(N)[:m] for _ in range(L * H)])  # copies from behind and ahead
    k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, N, d)).astype(np.float32)
    ev = rng.random((L, H, N)).astype(np.float32)
    mixed = np.where(np.arange(L * H * m) // m % 2 == 0, sel, back)  # selection heads and others in a layer
    plans = {"select": _plan(sel), "dup": _plan(dup), "back": _plan(back), "mixed": _plan(mixed),
             "kvmerger": get_method("kvmerger", n_sink=2, n_recent=3).plan(k, v, None, ev, m),
             "kvmerger+budget": get_method("kvmerger+budget", n_sink=2, n_recent=3).plan(k, v, None, ev, m),
             "cam+h2o": get_method("cam+h2o").plan(k, v, None, ev, m)}
    assert plans["kvmerger+budget"].src.shape[0] > L * H * m and np.any(plans["cam+h2o"].wk == 0)
    return plans


PLANS = _plans()


def _setup(kt, vt, trans, seed=0):
    rng = np.random.default_rng(seed)
    k = (np.cumsum(rng.standard_normal((L, H, KV, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, KV, d)).astype(np.float32)
    kl, vl = _layers(k, kt, False, rng), _layers(v, vt, trans, rng)
    return kl, vl, [a.copy() for a in kl], [a.copy() for a in vl]


def _same(xs, ys) -> bool:
    return all(np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
               for x, y in zip(xs, ys))


def _heads(a, trans: bool, n: int) -> np.ndarray:
    """Cells 0..n-1 of one layer as raw bytes [H, n, head_bytes]."""
    if trans:
        return np.ascontiguousarray(a[:, :n].reshape(H, d, n).transpose(0, 2, 1)).view(np.uint8)
    return np.ascontiguousarray(a[:n].reshape(n, H, -1).transpose(1, 0, 2))


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("kt,vt,trans", LAYOUTS)
def test_copies_land_and_undo_restores_every_byte(kt, vt, trans, name):
    plan = PLANS[name]
    kl, vl, k0, v0 = _setup(kt, vt, trans)
    undo = I.apply_inplace(kl, vl, plan, v_trans=trans, k_type=kt, v_type=vt)
    assert len(undo.units) == 2 * L
    for layers, orig, w, tr in ((kl, k0, plan.wk, False), (vl, v0, plan.wv, trans)):
        cf = I.swap_plans(plan.offsets, plan.src, w, N)[0]
        for l in range(L):
            got, src = _heads(layers[l], tr, m), _heads(orig[l], tr, N)
            for h in range(H):
                c = cf[l, h]
                assert np.array_equal(got[h, c >= 0], src[h, c[c >= 0]]), (name, l, h)
    assert not (_same(kl, k0) and _same(vl, v0))
    undo.restore()
    assert _same(kl, k0) and _same(vl, v0)
    assert undo.units == []


@pytest.mark.parametrize("plan_name", ["select", "back"])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("wrong", ["repeat", "no-late"])
def test_a_wrong_restore_is_caught(monkeypatch, trans, wrong, plan_name):
    """The check above fails when the undo is wrong: the permutation applied again instead of undone, or the
    late slots not put back -- in K (rows) and in V (rows or transposed) alike."""
    kl, vl, k0, v0 = _setup(F16, F16, trans)
    plan = PLANS[plan_name if wrong == "repeat" else "kvmerger"]
    undo = I.apply_inplace(kl, vl, plan, v_trans=trans, k_type=F16, v_type=F16)
    if wrong == "repeat":
        monkeypatch.setattr(S, "unswap_rows", lambda a, hb, fw: S.swap_rows(a, hb, fw, 1, np.zeros(1, np.int64)))
        monkeypatch.setattr(S, "unpartition_elems", lambda a, d, fw, part, n: S.partition_elems(
            a, d, fw, part, n, np.zeros(1, np.int64)))
    else:
        monkeypatch.setattr(S, "restore_late_rows", lambda *a: None)
        monkeypatch.setattr(S, "restore_late_elems", lambda *a: None)
    undo.restore()
    assert not _same(kl, k0) and not _same(vl, v0)


def test_a_selection_saves_nothing_and_swaps_sort_the_plan():
    """A selection is all swaps (no late slot, nothing saved); ``dup`` and ``back`` need late slots."""
    for name, w_late in (("select", False), ("dup", True), ("back", True), ("mixed", True)):
        p = PLANS[name]
        cf, fw, late, off = I.swap_plans(p.offsets, p.src, p.wk, N)
        assert (len(late) > 0) == w_late, name
        assert np.all((fw < 0) | (fw > np.arange(m))), name  # swaps only with cells ahead
        for l in range(L):
            for h in range(H):
                used = fw[l, h][fw[l, h] >= 0]
                assert len(np.unique(used)) == len(used)
        lo = S.partition_plan(cf[0], fw[0], N)[0]  # selection heads partition, the others swap
        assert np.all(lo >= 0) if name == "select" else np.any(lo < 0), name
        if name == "mixed":
            assert np.all(lo[::2] >= 0) and np.all(lo[1::2] < 0)


@pytest.mark.parametrize("trans", [False, True])
def test_failure_part_way_restores_the_layers_written(monkeypatch, trans):
    kt = F16 if trans else Q8
    kl, vl, k0, v0 = _setup(kt, F16, trans)
    plan = PLANS["kvmerger"]
    name = "partition_elems" if trans else "swap_rows"
    real, calls = getattr(S, name), []
    fail_at = 2 if trans else 3  # layer 1's V (transposed) or layer 1's K (rows): 3 or 2 tensors written

    def failing(*a):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected")
        return real(*a)

    monkeypatch.setattr(S, name, failing)
    undo = I.InplaceUndo()
    with pytest.raises(RuntimeError, match="injected"):
        I.apply_inplace(kl, vl, plan, v_trans=trans, k_type=kt, v_type=F16, undo=undo)
    assert len(undo.units) == (4 if trans else 3) and undo.units[-1][-1][0] == 0  # recorded, not run
    assert not (_same(kl, k0) and _same(vl, v0))
    undo.restore()
    assert _same(kl, k0) and _same(vl, v0)


@pytest.mark.parametrize("trans", [False, True])
def test_failure_between_the_swaps_and_the_late_slots(monkeypatch, trans):
    """A tensor permuted but its late slots not written (stage 1): the undo repeats only the swaps."""
    kl, vl, k0, v0 = _setup(F16, F16, trans)
    monkeypatch.setattr(S, "write_late_elems" if trans else "write_late_rows", lambda *a: _raise())
    undo = I.InplaceUndo()
    with pytest.raises(RuntimeError, match="injected"):
        I.apply_inplace(kl, vl, PLANS["kvmerger"], v_trans=trans, k_type=F16, v_type=F16, undo=undo)
    assert undo.units[-1][-1][0] == 1
    undo.restore()
    assert _same(kl, k0) and _same(vl, v0)


def _raise():
    raise RuntimeError("injected")


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("vt", [F16, BF16])
def test_partition_of_long_rows(monkeypatch, vt, simd):
    """Transposed 16-bit V of a selection over 200 cells: the 32-cell compress steps, not only the cell-by-cell
    tail the small layouts above reach; kept cells land in order, the undo gives every byte back."""
    n, mm, kv, hh, dd = 200, 70, 232, 3, 8
    rng = np.random.default_rng(11)
    keep = [np.sort(np.append(rng.choice(n - 1, mm - 1, replace=False), n - 1)) for _ in range(hh)]
    keep[1][:40] = np.arange(40)  # a head whose first 40 slots are their own cells: the partition starts at 32
    keep[1][40:] = np.sort(rng.choice(np.arange(40, n - 1), mm - 41, replace=False).tolist() + [n - 1])
    src = np.concatenate(keep)
    off = np.zeros((1, hh, mm + 1), np.int64)
    off[0, :, 1:] = np.arange(1, mm + 1)
    off += (np.arange(hh) * mm).reshape(1, hh, 1)
    ones = np.ones(len(src), np.float32)
    pos = np.broadcast_to(np.arange(mm, dtype=np.int32), (1, hh, mm)).copy()
    plan = Plan(n, off, src.astype(np.int32), ones, ones, pos)
    k = [_encode(rng.standard_normal((kv, hh * 32)).astype(np.float32), F16).copy()]
    v = [_encode(rng.standard_normal((hh * dd * kv, 1)).astype(np.float32), vt).view(np.uint16).reshape(hh * dd, kv)
         .copy()]
    k0, v0 = [k[0].copy()], [v[0].copy()]
    if not simd:  # a CPU without AVX-512 VBMI2: the swaps
        monkeypatch.setattr(I, "HAS_VBMI2", False)
    undo = I.apply_inplace(k, v, plan, v_trans=True, k_type=F16, v_type=vt)
    for h in range(hh):
        assert np.array_equal(v[0][h * dd:(h + 1) * dd, :mm], v0[0][h * dd:(h + 1) * dd, keep[h]])
    part = undo.units[-1][6]
    if I.HAS_VBMI2:
        assert part is not None and list(part[0][0]) == [0, 32, 0]
    else:
        assert part is None
    undo.restore()
    assert _same(k, k0) and _same(v, v0)
