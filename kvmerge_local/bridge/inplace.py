"""The KV cache's own tensors as NumPy views, and compaction in place on them (patch v2).

``cache_tensors(ctx)`` wraps, per layer, the K and V tensors of llama.cpp's unified cache as arrays over the
tensors' own memory (no copy), in the form the in-place kernels take (:mod:`kvmerge_local.kernels.inplace`):

- ``k[l]``: ``uint8[kv_size, k_row_bytes]``; ``v[l]``: ``uint8[kv_size, v_row_bytes]``, or when ``v_trans``
  (flash attention off) the element-typed ``[n_embd_v_gqa, kv_size]`` matrix (float16, float32, bf16 bits as
  uint16).  Cell ``i`` of the sequence is row (column) ``i`` once its cells are ``0..N-1`` in position order.

:func:`compact_inplace` is :meth:`KVBridge.compact <kvmerge_local.bridge.KVBridge.compact>`'s default path on
the CPU: synchronize, apply the plan to the rows in place, re-rotate the kept keys when re-indexing, then
``llama_kvm_seq_set_cells`` rewrites the cell metadata exactly as ``llama_state_seq_set_data`` would.  The
state blob path stays as the fallback (buffers on a device without ``numba.cuda``, a library without patch
v2, cells not at ``0..N-1``) and as the reference the tests hold this path to (bit-identical cache and logits).

**Failure and restore.**  Everything that can be refused is checked before the first write (plan, layout,
cells, types).  The apply permutes the cells rather than copying over them (:mod:`kvmerge_local.kernels.
inplace_swap`: a kept row is exchanged with the slot it moves to, so what it displaces lands in a cell that is
freed afterwards), and keeps only the few rows it does overwrite (merges, copies from behind: none for a
selection); its undo is exact.  Re-rotating keys first copies the compacted keys (cells ``0..m-1``).  Should the
apply, the re-rotation or llama.cpp's cell rewrite fail, those put the cache back bit for bit; a state blob the
caller read before is only the fallback should the undo itself fail.  The cell metadata changes only in the
last, atomic step, so a failure before it leaves llama.cpp's view of the cache as it was.

**CUDA.**  When the buffers are not host memory (``on_host`` False, e.g. ``buffer == "CUDA0"``) the views are
absent; with ``numba.cuda`` available :func:`device_tensors` wraps the pointers as device arrays,
:func:`device_keys` reads the keys the planner needs (never the values) and :func:`compact_device` runs the plan
with ``kvmerge_local.kernels.inplace_cuda`` and rewrites the cells as on the CPU.  Its restore is on the device
too (``kernels.cuda_undo``: the same permutation with an exact undo, and a device copy of the keys it
re-rotates), so no state blob is read; a state the caller read before is again only the fallback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..codec.types import TYPES
from ..errors import KVMergeError
from ..plan import Plan
from . import _lib
from .state import KVGeometry, row_bytes

log = logging.getLogger(__name__)


@dataclass
class CacheTensors:
    """Per layer, the K and V tensors of the context's cache (views over llama.cpp's memory when on host)."""

    k: list  # [n_layer] uint8[kv_size, k_row_bytes] (None entries when on a device)
    v: list  # [n_layer] uint8[kv_size, v_row_bytes] or, v_trans, [n_embd_v_gqa, kv_size] element-typed
    v_trans: bool
    k_type: int
    v_type: int
    kv_size: int
    on_host: bool
    buffers: tuple[str, ...] = ()  # backend buffer names, e.g. ("CPU",) or ("CUDA0",)
    ptrs: list = field(default_factory=list)  # [(k_ptr, v_ptr, k_nbytes, v_nbytes)] per layer (device hook)

    @property
    def n_layer(self) -> int:
        return len(self.k)


def cache_tensors(ctx: int, geom: KVGeometry) -> CacheTensors:
    """The cache tensors of context pointer ``ctx`` for a model of geometry ``geom``; KVMergeError when the
    cache is not one stream of per-layer tensors of one type each with ``geom``'s widths."""
    lay = _lib.cache_layout(ctx)
    if lay["n_stream"] != 1:
        raise KVMergeError(f"the cache has {lay['n_stream']} streams; compaction in place needs one")
    if lay["n_layer"] != geom.n_layer:
        raise KVMergeError(f"the cache has {lay['n_layer']} layers, the model {geom.n_layer}")
    kv, v_trans, E = lay["kv_size"], bool(lay["v_trans"]), geom.n_embd_kv
    ks, vs, ptrs, bufs, host = [], [], [], set(), True
    k_type = v_type = -1
    for il in range(geom.n_layer):
        tk, tv = _lib.cache_tensor(ctx, il, 0), _lib.cache_tensor(ctx, il, 1)
        if il == 0:
            k_type, v_type = tk["type"], tv["type"]
        if tk["type"] != k_type or tv["type"] != v_type or k_type not in TYPES or v_type not in TYPES:
            raise KVMergeError(f"layer {il}: cache types {tk['type']}/{tv['type']} differ or are unsupported")
        rk = row_bytes(k_type, E)
        if tk["ne"] != (E, kv) or tk["nb"][1] != rk or tk["nbytes"] != kv * rk:
            raise KVMergeError(f"layer {il}: K tensor {tk['ne']}, nb {tk['nb']} is not [{E}, {kv}] rows")
        rv = row_bytes(v_type, E)
        if tv["ne"] != (E, kv) or tv["nbytes"] != kv * rv or (v_trans and TYPES[v_type].view is None):
            raise KVMergeError(f"layer {il}: V tensor {tv['ne']} is not [{E}, {kv}]")
        bufs.update((tk["buffer"], tv["buffer"]))
        host = host and tk["is_host"] and tv["is_host"]
        ptrs.append((tk["ptr"], tv["ptr"], tk["nbytes"], tv["nbytes"]))
        if tk["host"] is None or tv["host"] is None:
            ks.append(None)
            vs.append(None)
            continue
        ks.append(tk["host"].reshape(kv, rk))
        if v_trans:
            vs.append(tv["host"].view(TYPES[v_type].view).reshape(E, kv))
        else:
            vs.append(tv["host"].reshape(kv, rv))
    return CacheTensors(ks, vs, v_trans, k_type, v_type, kv, bool(host), tuple(sorted(bufs)), ptrs)


def device_available() -> bool:
    """Whether ``numba.cuda`` can run the CUDA in-place kernels here (a GPU, or the simulator in tests)."""
    try:
        from numba import cuda  # noqa: PLC0415
        return bool(cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install means "no device path", not a crash
        log.info("numba.cuda unavailable (%s)", exc)
        return False


def device_tensors(ct: CacheTensors, geom: KVGeometry) -> tuple[list, list]:
    """Per layer ``numba.cuda`` device arrays over the cache's device memory (no copy), laid out as
    :class:`CacheTensors`: K ``uint8[kv_size, k_row_bytes]``, V the same or, ``v_trans``, ``[n_embd_v_gqa,
    kv_size]`` in the element dtype.  The pointers are llama.cpp's, in the primary context ggml uses
    (:func:`kvmerge_local.kernels.inplace_cuda.device_array_from_pointer`; under the simulator they view host
    memory).  Touch them only inside ``inplace_cuda.synchronized()`` after :func:`_lib.synchronize`."""
    from ..kernels.inplace_cuda import device_array_from_pointer  # noqa: PLC0415 - imports numba.cuda

    E, kv = geom.n_embd_kv, ct.kv_size
    ks, vs = [], []
    for kp, vp, kn, vn in ct.ptrs:
        ks.append(device_array_from_pointer(kp, (kv, kn // kv), np.uint8))
        if ct.v_trans:
            vs.append(device_array_from_pointer(vp, (E, kv), TYPES[ct.v_type].view))
        else:
            vs.append(device_array_from_pointer(vp, (kv, vn // kv), np.uint8))
    return ks, vs


def device_keys(ctx: int, ct: CacheTensors, geom: KVGeometry, n: int) -> np.ndarray:
    """The keys of cells ``0..n-1`` of a device cache on the host, ``[n_layer, n_kv_head, n, head_dim]`` as the
    methods plan on them (f16/f32 as stored; bf16/quantized decoded on the device to float16) -- only K's
    first ``n`` rows cross the bus, never the values."""
    from ..kernels import inplace_cuda as IC  # noqa: PLC0415

    k, _ = device_tensors(ct, geom)
    with IC.synchronized():
        _lib.synchronize(ctx)
        return IC.read_keys_cuda(k, n, geom.n_kv_head, k_type=ct.k_type)


def compact_device(ctx: int, seq_id: int, geom: KVGeometry, ct: CacheTensors, plan: Plan, cell_pos: np.ndarray,
                   key_delta: np.ndarray | None, rope, restore_state=None, write_state=None) -> None:
    """:func:`compact_inplace` on a CUDA cache (``ct.on_host`` False): the same plan with the ``numba.cuda``
    kernels on the cache's device memory (``kernels.inplace_cuda``), then the same cell rewrite.  Nothing of the
    cache crosses the bus (no state read).

    Order: ``cuda.synchronize()`` and ``llama_synchronize`` (llama.cpp's pending writes land), apply (a
    permutation with its exact undo on the device, :class:`~kvmerge_local.kernels.cuda_undo.DeviceUndo`: it
    keeps only the late slots' previous segments -- none for a selection), re-rotate the kept keys by
    ``key_delta`` (int[L, H, m]; tables as ``rope._shift`` builds them) after copying the head segments it
    rotates on the device (:class:`~kvmerge_local.kernels.cuda_undo.DeviceKeySnapshot`), both syncs again, then
    ``llama_kvm_seq_set_cells``.  If anything fails, the key snapshot and then the undo put the cache back bit
    for bit on the device; ``restore_state`` (a state blob the caller read before, written with
    ``write_state``) is only the fallback should that undo itself fail."""
    from .. import codec  # noqa: PLC0415
    from ..kernels import inplace_cuda as IC  # noqa: PLC0415 - numba.cuda, compiles on first use
    from .rope import shift_tables  # noqa: PLC0415

    if ct.on_host:
        raise KVMergeError("the cache is in host memory: compact_inplace")
    _check_slots(ctx, seq_id, plan.n_in)
    k, v = device_tensors(ct, geom)
    undo, snap = IC.DeviceUndo(), None
    try:
        with IC.synchronized():
            _lib.synchronize(ctx)
            IC.apply_inplace_cuda(k, v, plan, v_trans=ct.v_trans, k_type=ct.k_type, v_type=ct.v_type, undo=undo)
            if key_delta is not None and np.any(key_delta):
                idx, cos_t, sin_t = shift_tables(rope, np.asarray(key_delta))
                snap = IC.DeviceKeySnapshot(k, idx, ct.k_type, geom.head_dim)
                IC.rerotate_inplace_cuda(k, idx, cos_t, sin_t, neox=rope.neox, k_type=ct.k_type,
                                         nrot_hadamard=codec.cache_rot_size(ct.k_type, geom.head_dim, "k"))
            _lib.synchronize(ctx)
        _set_cells(ctx, seq_id, cell_pos)
    except BaseException:
        log.warning("compaction on the device failed; restoring the %d-cell original", plan.n_in)

        def restore() -> None:
            with IC.synchronized():
                if snap is not None:
                    snap.restore()
                undo.restore()

        _undo_or_fallback(restore, restore_state, write_state)
        raise


def _undo_or_fallback(restore, restore_state, write_state) -> None:
    """Run ``restore()`` (the exact undo); should it fail, write back ``restore_state`` (a state blob read
    before, with ``write_state``) when there is one, else re-raise the undo's failure."""
    try:
        restore()
    except BaseException:
        if restore_state is None:
            raise
        log.exception("the undo failed; writing back the state read before")
        write_state(restore_state)


def _check_slots(ctx: int, seq_id: int, n: int) -> None:
    """KVMergeError unless the sequence holds exactly the cells at slots ``0..n-1`` (what in place assumes)."""
    slots, _ = _lib.seq_cells(ctx, seq_id)
    if len(slots) != n or not np.array_equal(slots, np.arange(n)):
        raise KVMergeError(f"the sequence's {len(slots)} cells are not slots 0..{n - 1}")


def _set_cells(ctx: int, seq_id: int, cell_pos: np.ndarray) -> None:
    """The last, atomic step: cells ``0..m-1`` of the sequence get ``cell_pos`` (int[m]), the rest are freed."""
    if not _lib.seq_set_cells(ctx, seq_id, np.asarray(cell_pos, np.int32)):
        raise KVMergeError("llama.cpp refused to rewrite the cells (a pending K shift, or another sequence "
                           "in the way)")


def layer_keys(ct: CacheTensors, geom: KVGeometry, l: int, n: int) -> np.ndarray:
    """Layer ``l``'s keys of cells ``0..n-1`` as a view ``[n_kv_head, n, head_dim]`` (float types in their
    dtype, bf16 as uint16 bits) or ``uint8[n_kv_head, n, head_bytes]`` (quantized); no copy."""
    t, H, d = TYPES[ct.k_type], geom.n_kv_head, geom.head_dim
    a = ct.k[l]
    rk = a.shape[1]
    hb = rk // H
    if t.view is None:
        return np.ndarray((H, n, hb), np.uint8, buffer=a, strides=(hb, rk, 1))
    es = t.block_bytes
    return np.ndarray((H, n, d), t.view, buffer=a, strides=(d * es, rk, es))


def live_keys(ct: CacheTensors, geom: KVGeometry, n: int) -> np.ndarray:
    """The keys of cells ``0..n-1`` of every layer as one 4-D view over the cache's memory, like
    :attr:`KVState.k4 <kvmerge_local.bridge.state.KVState>` (``[n_layer, n_kv_head, n, head_dim]`` in the
    float dtype, or ``uint8[..., head_bytes]`` quantized) -- no copy when the layers' K tensors lie at one
    stride in one host buffer (llama.cpp allocates them so on the CPU), else the layers' keys copied (keys only).
    """
    L, H = geom.n_layer, geom.n_kv_head
    per = [layer_keys(ct, geom, l, n) for l in range(L)]
    kp = [p[0] for p in ct.ptrs]
    step = kp[1] - kp[0] if L > 1 else 0
    if ct.on_host and all(kp[l] == kp[0] + l * step for l in range(L)) and step >= 0:
        span = step * (L - 1) + ct.k[0].nbytes
        base = _lib.host_bytes(kp[0], span)
        e = per[0]
        return np.ndarray((L, H, n, e.shape[2]), e.dtype, buffer=base, strides=(step, *e.strides))
    return np.stack(per)


@dataclass
class LiveKeys:
    """What a method plans on, read from the cache's own memory without the state blob: ``k4`` (a view of the
    keys, see :func:`live_keys`), ``v4`` (a zero-stride float16 stand-in: planners read values only for their
    shape), ``pos`` (the cells' positions), ``n_cells``, ``geom``, ``k_type``.  Works with
    :func:`~.state.float_views` and :meth:`KVBridge.evidence`; passed back to :meth:`KVBridge.compact` it
    means "no state read" (the in-place path restores from its own exact undo)."""

    geom: KVGeometry
    n_cells: int
    pos: np.ndarray
    k4: np.ndarray
    v4: np.ndarray
    k_type: int
    v_type: int


class KeySnapshot:
    """The keys of cells ``0..m-1`` of every layer as the in-place apply left them, copied before re-rotating
    them (a re-rotation is not exactly invertible): restoring puts them back, then the apply's own undo runs.

    ``buf``: a uint8 buffer to copy into when large enough (reused across compactions: a fresh allocation of
    ~m/N of the keys costs as much again in first-touch page faults as the copy itself)."""

    def __init__(self, ct: CacheTensors, m: int, buf: np.ndarray | None = None) -> None:
        regions = [k[:m] for k in ct.k]
        need = sum(r.nbytes for r in regions)
        self.buf = buf if buf is not None and buf.nbytes >= need else np.empty(need, np.uint8)
        self.saved, off = [], 0
        for r in regions:
            c = self.buf[off:off + r.nbytes].reshape(r.shape)
            np.copyto(c, r)
            self.saved.append((r, c))
            off += r.nbytes

    def restore(self) -> None:
        for r, c in self.saved:
            np.copyto(r, c)


def compact_inplace(ctx: int, seq_id: int, geom: KVGeometry, ct: CacheTensors, plan: Plan, cell_pos: np.ndarray,
                    key_delta: np.ndarray | None, rope, restore_state=None, write_state=None,
                    undo_buf: np.ndarray | None = None) -> np.ndarray | None:
    """Apply ``plan`` (validated by the caller, :meth:`KVBridge.compact`) in place on the cache tensors ``ct`` of
    the sequence's cells ``0..plan.n_in-1``, re-rotate the kept keys by ``key_delta`` (int[L, H, m], None:
    none), and make cells ``0..m-1`` hold ``cell_pos``.

    The apply permutes the cells and returns its exact undo (:class:`~kvmerge_local.kernels.inplace.InplaceUndo`);
    a re-rotation first copies the compacted keys (:class:`KeySnapshot`, into ``undo_buf`` when large enough;
    that buffer is returned for reuse, None without re-rotation).  If anything fails the cache is put back
    from those; ``restore_state`` (the sequence's state blob read before, written with ``write_state``) is only
    the fallback should the undo itself fail.  Raises KVMergeError (cache as before) when a check fails or the
    write phase fails (after restoring)."""
    from ..kernels.inplace import InplaceUndo, apply_inplace  # noqa: PLC0415 - Numba compiles on first use
    from .rope import rerotate_state_keys  # noqa: PLC0415

    if not ct.on_host:
        raise KVMergeError("the cache is not in host memory")
    _check_slots(ctx, seq_id, plan.n_in)
    m = plan.m
    undo, snap = InplaceUndo(), None
    _lib.synchronize(ctx)
    try:
        apply_inplace(ct.k, ct.v, plan, v_trans=ct.v_trans, k_type=ct.k_type, v_type=ct.v_type, undo=undo,
                      validated=True)
        if key_delta is not None and np.any(key_delta):
            snap = KeySnapshot(ct, m, undo_buf)
            for l in range(geom.n_layer):
                view = _LayerKeys(geom, m, ct.k_type, layer_keys(ct, geom, l, m)[None])
                rerotate_state_keys(view, key_delta[l:l + 1], rope)
        _set_cells(ctx, seq_id, cell_pos)
    except BaseException:
        log.warning("compaction in place failed; restoring the %d-cell original", plan.n_in)

        def restore() -> None:
            if snap is not None:
                snap.restore()
            undo.restore()

        _undo_or_fallback(restore, restore_state, write_state)
        raise
    return None if snap is None else snap.buf


@dataclass
class _LayerKeys:
    """What :func:`~.rope.rerotate_state_keys` reads of a state: one layer's kept keys as a 1-layer state."""

    full: KVGeometry
    n_cells: int
    k_type: int
    k4: np.ndarray

    @property
    def geom(self) -> KVGeometry:
        return KVGeometry(1, self.full.n_kv_head, self.full.head_dim)
