"""The exact undo of compaction in place on a CUDA cache (kernels.cuda_undo) under the CUDA simulator.

Kernel level (device arrays laid out as llama.cpp's, as tests/test_inplace_cuda.py): after
``apply_inplace_cuda`` the slots hold the plan's output and ``DeviceUndo.restore()`` gives back every byte of
every tensor (cells ``m..`` too); a selection saves nothing (no late slot); a failure part-way through the
tensors, or between the swaps and the late slots, restores exactly what ran; ``DeviceKeySnapshot`` undoes a
re-rotation.  Each check is shown able to fail: with the unswap or the late-slot restore disabled the tensors
are not restored.  (The bridge-level failures -- re-rotation and cell rewrite on the device branch, no state
read -- are tests/test_inplace_device_undo.py's.)
"""
import os
import subprocess
import sys
import textwrap

from test_inplace_cuda import COMMON, _run

UNDO = COMMON + textwrap.dedent('''
    from kvmerge_local.kernels import cuda_rows as K, cuda_undo as CU

    def dev(layers):
        return [cuda.to_device(a) for a in layers]

    def host(dl):
        return [a.copy_to_host() for a in dl]

    def same(xs, ys):
        return all(np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
                   for x, y in zip(xs, ys))

    k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, N, d)).astype(np.float32)
    plans = make_plans(k, v)
    layouts = [("f16", "f16", False), ("f16", "f16", True), ("q8_0", "q8_0", False), ("bf16", "bf16", True)]

    def setup(kn, vn, vt):
        kt, vtp = TYPE[kn], TYPE[vn]
        kl = rows_layers(k, kt)
        vl = trans_layers(v, vtp) if vt else rows_layers(v, vtp)
        return kt, vtp, dev(kl), dev(vl), kl, vl

    n_cases = 0
    for kn, vn, vt in layouts:
        for name in ("h2o", "kvmerger+budget", "cam+h2o", "shuffled"):
            p = plans[name]
            kt, vtp, dk, dv, k0, v0 = setup(kn, vn, vt)
            undo = IC.apply_inplace_cuda(dk, dv, p, v_trans=vt, k_type=kt, v_type=vtp)
            gk, gv = host(dk), host(dv)
            for which, got, orig, tr, t in (("k", gk, k0, False, kt), ("v", gv, v0, vt, vtp)):
                exp = expected(heads_raw(orig, tr, N), t, p, which)
                assert np.array_equal(heads_raw(got, tr, p.m), exp), (kn, vn, vt, name, which)
            assert not same(gk, k0) and not same(gv, v0)
            n_late = sum(u.n_late for u in undo.units)
            assert (n_late == 0) == (name == "h2o"), (name, n_late)  # a selection saves nothing
            undo.restore()
            assert same(host(dk), k0) and same(host(dv), v0), (kn, vn, vt, name)
            n_cases += 1

    # a failure part-way: the third tensor's swaps (layer 0's V done, layer 1's K raising) or between the
    # swaps and the late slots of the first tensor
    for where in ("swap", "late"):
        for vt in (False, True):
            kt, vtp, dk, dv, k0, v0 = setup("f16", "f16", vt)
            real_swap, real_save, calls = CU._Unit.swap, CU._Unit.save_late, []

            def failing_swap(self):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("injected")
                real_swap(self)

            def failing_save(self):
                real_save(self)
                raise RuntimeError("injected")

            if where == "swap":
                CU._Unit.swap = failing_swap
            else:
                CU._Unit.save_late = failing_save
            undo = CU.DeviceUndo()
            try:
                IC.apply_inplace_cuda(dk, dv, plans["kvmerger+budget"], v_trans=vt, k_type=kt, v_type=vtp,
                                      undo=undo)
                raise AssertionError("no failure")
            except RuntimeError as e:
                assert "injected" in str(e)
            finally:
                CU._Unit.swap, CU._Unit.save_late = real_swap, real_save
            assert len(undo.units) == (3 if where == "swap" else 1)
            assert not (same(host(dk), k0) and same(host(dv), v0))
            undo.restore()
            assert same(host(dk), k0) and same(host(dv), v0), (where, vt)
            n_cases += 1

    # the re-rotation's key snapshot
    from kvmerge_local.bridge.rope import RopeParams
    dr = 64
    kr = (rng.standard_normal((L, H, N, dr)) * 2).astype(np.float32)
    delta = rng.integers(-40, 1, (L, H, N))
    delta[0, 0, :3] = 0
    rope = RopeParams(head_dim=dr, n_rot=48, freq_base=10000.0, neox=True)
    cos_t, sin_t = rope.angles(np.arange(int(delta.min()), 1))
    idx = np.where(delta == 0, -1, delta - int(delta.min()))
    for name in ("f16", "q8_0"):
        t = TYPE[name]
        raw = []
        for l in range(L):
            a = encode(kr[l].transpose(1, 0, 2).reshape(N, H * dr), t)
            raw.append(np.concatenate([a, a[:KV - N]]))
        dk = dev(raw)
        snap = CU.DeviceKeySnapshot(dk, idx, t, dr)
        nrot = codec.cache_rot_size(t, dr, "k") if t in (2, 8) else 0
        IC.rerotate_inplace_cuda(dk, idx, cos_t, sin_t, neox=True, k_type=t, nrot_hadamard=nrot)
        assert not same(host(dk), raw)
        snap.restore()
        assert same(host(dk), raw), name
        n_cases += 1
    print("UNDO-OK", n_cases)
''')

# the same checks with one of the undo's kernels made a no-op: each must then find a tensor not restored
BROKEN = ("K.unswap_in_order", "K.restore_if")


def test_device_undo_restores_every_byte():
    """f16 rows/transposed, q8_0, bf16 transposed V; selection, KVMerger, CaM and backward copies; failures
    part-way; the key snapshot."""
    out = _run(UNDO, "UNDO-OK")
    assert int(out.split("UNDO-OK")[1].split()[0]) == 4 * 4 + 4 + 2


def _broken(kernel: str) -> str:
    """UNDO with ``kernel`` (a ``cuda_rows`` kernel the undo launches) replaced by one that does nothing."""
    noop = f"\nclass _Noop:\n    def __getitem__(self, cfg):\n        return lambda *a: None\n{kernel} = _Noop()\n"
    head = "from kvmerge_local.kernels import cuda_rows as K, cuda_undo as CU\n"
    return UNDO.replace(head, head + noop)


def test_a_broken_device_undo_is_caught():
    for kernel in BROKEN:
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", OMP_WAIT_POLICY="PASSIVE")
        r = subprocess.run([sys.executable, "-c", _broken(kernel)], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode != 0 and "UNDO-OK" not in r.stdout and "AssertionError" in r.stderr, kernel
