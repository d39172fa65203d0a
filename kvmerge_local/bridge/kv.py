"""The KV bridge: read one sequence's cache into NumPy, apply a compaction plan, write it back.

    bridge = KVBridge(ctx)
    st = bridge.read()                          # KVState: k4/v4 [n_layer, n_kv_head, N, head_dim] views
    ev = bridge.evidence(st)                    # float32[n_layer, n_kv_head, N] (patched llama.cpp)
    k, v = float_views(st)                      # what the methods plan on
    new = bridge.compact(plan, st)              # writes the compacted cache; on failure restores st
    new = bridge.compact(plan, st, key_pos=rope_pos, reindex=True)   # ... and renumbers slots 0..m-1
    live = bridge.planning_state()              # in place: LiveKeys, a view of the cache's keys (no read)
    new = bridge.compact(plan, live)            # compacts in place, undone exactly if a step fails

:meth:`KVBridge.compact` is the one compaction path (product, benchmarks and tests).  By default, when every
layer's cache tensor is in host memory (the CPU backend) and the sequence's cells are slots ``0..N-1``, it
compacts **in place** on the cache's own memory (:mod:`.inplace`, patch v2: no state round trip; only the cell
metadata goes through llama.cpp).  When the tensors are on a CUDA device (buffers like ``"CUDA0"``) and
``numba.cuda`` is available it compacts in place **on the device** (:func:`.inplace.compact_device`: the
``numba.cuda`` kernels of :mod:`kvmerge_local.kernels.inplace_cuda`, planning on keys read from the device,
undone exactly on the device if a step fails: no state read).  Otherwise, or with ``KVBridge(ctx, inplace=False)``, it takes the state
path: apply the plan to a fresh blob, re-rotate keys when positions are re-indexed (:mod:`.rope`), write it,
and write the original back if llama.cpp refuses the result.  Both give bit-identical caches
(tests/test_inplace.py).  On the state path, applying fills the fresh blob of ``m`` cells in place: float caches go
through the Numba apply kernel directly on the blob views (f16 as bit patterns, no whole-cache conversion);
quantized caches (q8_0, q4_0; stored Hadamard-rotated, which merging does not need to undo because the
rotation is orthonormal and merges are linear) are dequantized, merged in float32 and requantized, with copy
slots moved as raw blocks so they stay bit-identical.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import KVMergeError
from ..plan import Plan
from . import _lib
from .context import LlamaContext
from .inplace import (CacheTensors, LiveKeys, cache_tensors, compact_device, compact_inplace, device_available,
                      device_keys, live_keys)
from .rope import RopeParams, rerotate_state_keys
from .state import TYPE_IDS, KVState, new_state, parse_state

log = logging.getLogger(__name__)


def copy_sources(plan: Plan, which: str) -> np.ndarray:
    """int64[n_layer, n_kv_head, m]: the input cell a slot copies unchanged, or -1 for a merged slot.

    A slot is a copy when exactly one of its sources has a non-zero weight (``wk`` or ``wv``) and that
    weight is 1 -- the same rule as the apply kernel.
    """
    w = plan.wk if which == "k" else plan.wv
    off = plan.offsets
    L, H, m = plan.pos.shape
    counts = (off[..., 1:] - off[..., :-1]).reshape(-1)
    nz = w != 0
    slot_of = np.repeat(np.arange(L * H * m), counts)
    n_nz = np.bincount(slot_of, weights=nz, minlength=L * H * m)
    # the last non-zero source of each slot (the only one where n_nz == 1)
    idx = np.where(nz, np.arange(len(w)), -1)
    last = np.full(L * H * m, -1, dtype=np.int64)
    np.maximum.at(last, slot_of, idx)
    ok = (n_nz == 1) & (last >= 0)
    ok[ok] &= w[last[ok]] == 1.0
    out = np.full(L * H * m, -1, dtype=np.int64)
    out[ok] = plan.src[last[ok]]
    return out.reshape(L, H, m)


def apply_plan_to_state(st: KVState, plan: Plan, out: np.ndarray | None = None) -> KVState:
    """A new KVState of ``plan.m`` cells built from ``st`` by ``plan`` (``st`` is not modified).

    ``out``: an optional uint8 buffer, not overlapping ``st.blob``, to build the new blob in.
    """
    from ..kernels.apply import apply_plan  # noqa: PLC0415 - numba compile on first use

    if plan.n_in != st.n_cells or plan.n_layer != st.geom.n_layer or plan.n_kv_head != st.geom.n_kv_head:
        raise ValueError(f"plan for {plan.n_layer}x{plan.n_kv_head} heads and {plan.n_in} cells does not "
                         f"match the cache ({st.geom.n_layer}x{st.geom.n_kv_head}, {st.n_cells} cells)")
    if out is not None and np.shares_memory(out, st.blob):
        raise ValueError("the output buffer overlaps the source state")
    out = new_state(st, plan.m, plan.cell_positions(), out)
    for which, src4, dst4, t in (("k", st.k4, out.k4, st.k_type), ("v", st.v4, out.v4, st.v_type)):
        if src4.dtype == np.uint8:
            _apply_quantized(src4, dst4, t, plan, which)
        elif t == TYPE_IDS["bf16"]:
            _apply_bf16(src4, dst4, plan, which)
        else:
            apply_plan(src4, dst4, plan, which)
    return out


def _apply_bf16(src4: np.ndarray, dst4: np.ndarray, plan: Plan, which: str) -> None:
    """bf16 bit patterns (uint16[L, H, N, d], any strides) -> [L, H, m, d]: merges in float32, rounded back to
    bf16 half-to-even as ggml; copies move the raw bits.  (The apply kernel reads uint16 as f16 bits.)"""
    from .. import codec  # noqa: PLC0415
    from ..kernels.apply import apply_plan  # noqa: PLC0415

    cs = copy_sources(plan, which)
    if np.any(cs < 0):
        y = np.empty(dst4.shape, dtype=np.float32)
        apply_plan(codec.bf16_bits_to_f32_array(src4), y, plan, which)
        dst4[...] = codec.f32_to_bf16_bits_array(y)
    li, hi, ji = np.nonzero(cs >= 0)
    dst4[li, hi, ji] = src4[li, hi, cs[li, hi, ji]]


def _apply_quantized(src4: np.ndarray, dst4: np.ndarray, type_id: int, plan: Plan, which: str) -> None:
    """Quantized blocks [L, H, N, head_bytes] -> [L, H, m, head_bytes]: merges via float32, copies raw."""
    from .. import codec  # noqa: PLC0415
    from ..kernels.apply import apply_plan  # noqa: PLC0415

    L, H, N, hb = src4.shape
    m = dst4.shape[2]
    d = codec.n_elems_of_row(type_id, hb)
    cs = copy_sources(plan, which)
    if np.any(cs < 0):
        raw = np.ascontiguousarray(src4).reshape(L * H * N, hb)
        x = np.empty((L * H * N, d), dtype=np.float32)
        codec.dequantize_rows(raw, type_id, x)
        y = np.empty((L, H, m, d), dtype=np.float32)
        apply_plan(x.reshape(L, H, N, d), y, plan, which)
        q = np.empty((L * H * m, hb), dtype=np.uint8)
        codec.quantize_rows(y.reshape(L * H * m, d), type_id, q)
        dst4[...] = q.reshape(L, H, m, hb)
    li, hi, ji = np.nonzero(cs >= 0)
    dst4[li, hi, ji] = src4[li, hi, cs[li, hi, ji]]


class KVBridge:
    """Reads, compacts and writes sequence 0 of a :class:`LlamaContext`; captures attention evidence."""

    seq_id = 0

    def __init__(self, ctx: LlamaContext, reuse_buffers: bool = False, inplace: bool | None = None) -> None:
        """``reuse_buffers``: read into, and compact into, two preallocated buffers instead of fresh
        allocations (no page faults on the hot path).  A state returned by :meth:`read` then stays valid
        only until the next ``read``, and one returned by :meth:`compact` until the next ``compact``.
        ``inplace``: None (default) compacts in place on the cache's memory when it is host memory, else
        through the state blob; False always takes the state path; True requires in place (KVMergeError
        when the cache is not in host memory)."""
        self.ctx = ctx
        self.inplace = inplace
        self._tensors: CacheTensors | None = None
        self._undo_buf: np.ndarray | None = None  # the re-rotation's key snapshot (kept with reuse_buffers)
        self.geom = ctx.model.geom
        self.reuse_buffers = reuse_buffers
        self._read_buf: np.ndarray | None = None
        self._out_buf: np.ndarray | None = None
        self._rope: RopeParams | None = None
        self.timings: dict[str, float] = {}

    # --- state ---------------------------------------------------------------------------------------
    def read(self) -> KVState:
        """The current cache of the sequence (its own blob: later writes do not change it)."""
        t0 = time.perf_counter()
        blob = _lib.state_seq_get(self.ctx.ptr, self.seq_id, self._read_buf if self.reuse_buffers else None)
        if self.reuse_buffers:
            self._read_buf = blob.base if blob.base is not None else blob
        st = parse_state(blob, self.geom)
        self.timings["read"] = time.perf_counter() - t0
        return st

    def write(self, st: KVState) -> None:
        """Replace the sequence's cache with ``st`` (cells land in slots 0..n-1 in blob order)."""
        if st.n_cells > self.ctx.n_ctx:
            raise KVMergeError(f"{st.n_cells} cells do not fit a context of {self.ctx.n_ctx}")
        t0 = time.perf_counter()
        _lib.state_seq_set(self.ctx.ptr, st.blob, self.seq_id)
        self.timings["write"] = time.perf_counter() - t0

    def replace(self, new: KVState, old: KVState) -> None:
        """Write ``new``; if that fails, write ``old`` back and re-raise (never half-compacted)."""
        try:
            self.write(new)
        except BaseException:
            log.warning("writing the compacted cache failed; restoring the %d-cell original", old.n_cells)
            self.write(old)
            raise

    def compact(self, plan: Plan, st: KVState | None = None, *, key_pos: np.ndarray | None = None,
                reindex: bool = False, rope: RopeParams | None = None) -> KVState:
        """Apply ``plan`` to the cache and return the new state.

        In place (the default on host memory; :mod:`.inplace`): the rows are compacted on the cache's own
        memory and the cells rewritten; nothing is read unless ``st`` is given, and the returned state is read
        from llama.cpp only when first used.  ``st``: the state or :class:`LiveKeys` the plan was made on (the
        apply permutes the cells and undoes itself exactly on failure; a state read before is only the fallback
        should that undo fail).  State path: ``st`` is read now unless given, the plan applied to a fresh blob and written.

        ``key_pos``: int32[n_layer, n_kv_head, m], the RoPE position each slot's key is rotated to now
        (its pivot's; default ``plan.pos``): the cells get ``max`` over heads as their position.  With
        ``reindex`` the slots are renumbered ``0..m-1`` and every head's key is re-rotated by its own delta
        (``rope``: default the model's, :meth:`RopeParams.from_model`).  An identity plan that moves no
        position writes nothing and returns ``st``.  A bad plan raises before the context is touched; if the
        write fails (llama.cpp refuses the compacted blob or the cell rewrite, or the in-place kernel fails),
        the original cache is put back before the exception propagates (:meth:`replace`, or the in-place undo).
        """
        t0 = time.perf_counter()
        plan.validate()
        kp = plan.pos if key_pos is None else np.ascontiguousarray(key_pos, dtype=np.int32)
        if kp.shape != plan.pos.shape:
            raise ValueError(f"key_pos shape {kp.shape} != the plan's {plan.pos.shape}")
        cell_pos = np.arange(plan.m, dtype=np.int32) if reindex else kp.max(axis=(0, 1)).astype(np.int32)
        live = self._inplace_tensors()
        if isinstance(st, LiveKeys):  # planned on the live keys: no state was read
            st = None
            if live is None:
                raise KVMergeError("the cache changed since its keys were read: it no longer compacts in place")
        if live is not None:
            return self._compact_inplace(*live, plan, st, kp, cell_pos, reindex, rope, t0)
        st = self.read() if st is None else st
        t0 = time.perf_counter()
        if _is_noop(plan, kp, cell_pos, reindex, st.pos):
            self.timings["apply"] = time.perf_counter() - t0
            log.info("compaction of %d cells is the identity: nothing written", st.n_cells)
            return st
        wplan = plan if key_pos is None else Plan(plan.n_in, plan.offsets, plan.src, plan.wk, plan.wv, kp)
        wplan.validate()
        out = None
        if self.reuse_buffers:
            if self._out_buf is None or self._out_buf.nbytes < st.blob.nbytes:
                self._out_buf = np.empty(st.blob.nbytes, np.uint8)  # m <= N cells always fit
            out = None if np.shares_memory(self._out_buf, st.blob) else self._out_buf
        new = apply_plan_to_state(st, wplan, out)
        if reindex:
            rerotate_state_keys(new, cell_pos[None, None, :] - kp, rope or self.rope)
            new.pos[:] = cell_pos
        self.timings["apply"] = time.perf_counter() - t0
        self.replace(new, st)
        return new

    def planning_state(self) -> KVState | LiveKeys:
        """What a method plans on: with the in-place path, the live keys (:class:`LiveKeys`: a view of the
        cache's keys, no state read, values never copied); otherwise the state (:meth:`read`).  Pass it to
        :meth:`compact` as ``st``."""
        live = self._inplace_tensors()
        if live is None:
            return self.read()
        ct, pos = live
        n, g = len(pos), self.geom
        k4 = live_keys(ct, g, n) if ct.on_host else device_keys(self.ctx.ptr, ct, g, n)
        v4 = np.broadcast_to(np.zeros(1, np.float16), (g.n_layer, g.n_kv_head, n, g.head_dim))
        return LiveKeys(g, n, pos, k4, v4, ct.k_type, ct.v_type)

    def tensors(self) -> CacheTensors:
        """The cache's own K/V tensors per layer (views over llama.cpp's memory when it is host memory)."""
        if self._tensors is None:
            self._tensors = cache_tensors(self.ctx.ptr, self.geom)
        return self._tensors

    def _inplace_tensors(self) -> tuple[CacheTensors, np.ndarray] | None:
        """(the tensors, the cells' positions int32[N]) when :meth:`compact` goes in place, None for the state
        path (one cell query: the sequence must hold slots 0..N-1)."""
        if self.inplace is False:
            return None
        try:
            ct = self.tensors()
        except KVMergeError as exc:
            if self.inplace:
                raise
            log.info("compaction in place unavailable (%s): state path", exc)
            return None
        if not ct.on_host and not device_available():  # a device cache (e.g. "CUDA0") needs numba.cuda
            if self.inplace:
                raise KVMergeError(f"compaction in place on the device (buffers {ct.buffers}) needs numba.cuda")
            log.info("cache on %s and numba.cuda unavailable: state path", ct.buffers)
            return None
        slots, pos = _lib.seq_cells(self.ctx.ptr, self.seq_id)
        if len(slots) and int(slots[-1]) != len(slots) - 1:  # ascending slots: 0..N-1 exactly
            if self.inplace:
                raise KVMergeError("compaction in place needs the sequence's cells at slots 0..N-1")
            return None
        return ct, np.asarray(pos, np.int32)

    def _compact_inplace(self, ct: CacheTensors, pos: np.ndarray, plan: Plan, st: KVState | None, kp: np.ndarray,
                         cell_pos: np.ndarray, reindex: bool, rope: RopeParams | None, t0: float) -> KVState:
        """:meth:`compact` in place on the cache tensors; ``pos``: the cells' positions now, ``kp``/``cell_pos``:
        the slots' key positions and the cells' new positions (checked and derived by :meth:`compact`)."""
        n = len(pos)
        if plan.n_in != n or (st is not None and st.n_cells != n) or plan.n_layer != self.geom.n_layer or \
                plan.n_kv_head != self.geom.n_kv_head:
            raise ValueError(f"plan for {plan.n_layer}x{plan.n_kv_head} heads and {plan.n_in} cells does not "
                             f"match the cache ({self.geom.n_layer}x{self.geom.n_kv_head}, {n} cells)")
        if _is_noop(plan, kp, cell_pos, reindex, pos):
            self.timings["apply"] = time.perf_counter() - t0
            log.info("compaction of %d cells is the identity: nothing written", n)
            return st if st is not None else _LazyState(self, n)
        delta = (cell_pos[None, None, :] - kp) if reindex else None
        if not ct.on_host:  # CUDA: the numba.cuda kernels on the device memory, undone there on failure
            compact_device(self.ctx.ptr, self.seq_id, self.geom, ct, plan, cell_pos, delta,
                           (rope or self.rope) if reindex else None, restore_state=st, write_state=self.write)
            self.timings["apply"] = time.perf_counter() - t0
            return _LazyState(self, plan.m)
        buf = compact_inplace(self.ctx.ptr, self.seq_id, self.geom, ct, plan, cell_pos, delta,
                              (rope or self.rope) if reindex else None, restore_state=st, write_state=self.write,
                              undo_buf=self._undo_buf)
        if buf is not None and self.reuse_buffers:
            self._undo_buf = buf
        self.timings["apply"] = time.perf_counter() - t0
        return _LazyState(self, plan.m)

    @property
    def rope(self) -> RopeParams:
        """The model's RoPE parameters (read from its GGUF once)."""
        if self._rope is None:
            self._rope = RopeParams.from_model(self.ctx.model)
        return self._rope

    def read_prefix(self, n: int) -> KVState:
        """A state of only the first ``n`` cells of the sequence (blob order), e.g. the document before chat
        turns; the context is not changed."""
        st = self.read()
        if st.n_cells < n:
            raise KVMergeError(f"the cache holds {st.n_cells} cells, fewer than {n}")
        if st.n_cells == n:
            return st
        out = new_state(st, n, st.pos[:n])
        out.k4[...] = st.k4[:, :, :n]
        out.v4[...] = st.v4[:, :, :n]
        return out

    def cell_positions(self) -> np.ndarray:
        """int32[N]: the position of each of the sequence's cells, in blob order."""
        return np.asarray(_lib.seq_cells(self.ctx.ptr, self.seq_id)[1], np.int32)

    def n_cells(self) -> int:
        """Cells the sequence holds now."""
        return len(_lib.seq_cells(self.ctx.ptr, self.seq_id)[0])

    def remove_from(self, p0: int, p1: int = -1) -> None:
        """Remove the sequence's cells at positions in ``[p0, p1)`` (``p1 < 0``: to the end; ``seq_rm``)."""
        if not _lib.memory_seq_rm(self.ctx.ptr, self.seq_id, int(p0), int(p1)):
            raise KVMergeError(f"llama.cpp refused to remove the cells from position {p0}")

    def shift_positions(self, p0: int, p1: int, delta: int) -> None:
        """Move the cells at positions in ``[p0, p1)`` (``p1 < 0``: to the end) by ``delta`` with llama.cpp's
        own ``seq_add`` (keys re-rotated at the next decode; every head of a cell moves alike)."""
        _lib.memory_seq_add(self.ctx.ptr, self.seq_id, int(p0), int(p1), int(delta))

    # --- evidence ------------------------------------------------------------------------------------
    def enable_evidence(self, window: int) -> None:
        """Accumulate evidence from now on: the last ``window`` queries of each decode (0: all)."""
        if window < 0:
            raise ValueError("window must be >= 0 (0 means every query)")
        _lib.evidence_enable(self.ctx.ptr, window)

    def disable_evidence(self) -> None:
        _lib.evidence_enable(self.ctx.ptr, -1)

    def reset_evidence(self) -> None:
        _lib.evidence_reset(self.ctx.ptr)

    def evidence(self, st: KVState | None = None, per_kv_head: bool = True, below: int | None = None) -> np.ndarray:
        """Accumulated evidence of the sequence's cells, in blob order.

        Returns float32[n_layer, n_kv_head, N] (query heads of a GQA group summed) or, with
        ``per_kv_head=False``, float32[n_layer, n_head, N].  ``st`` only fixes N for a consistency check;
        ``below``: only the cells at positions ``< below`` (N counts those).
        """
        slots, pos = _lib.seq_cells(self.ctx.ptr, self.seq_id)
        if below is not None:
            slots = slots[np.asarray(pos) < below]
        if st is not None and len(slots) != st.n_cells:
            raise KVMergeError(f"the cache holds {len(slots)} cells, the state {st.n_cells}: read it again")
        n_head = int(self.ctx.model.info["n_head"])
        n_cells = int(slots.max()) + 1 if len(slots) else 0
        L, Hk = self.geom.n_layer, self.geom.n_kv_head
        out = np.zeros((L, n_head, len(slots)), dtype=np.float32)
        tmp = np.empty((n_head, n_cells), dtype=np.float32)
        for il in range(L):
            if _lib.evidence_get(self.ctx.ptr, il, n_head, n_cells, tmp):
                out[il] = tmp[:, slots]
        if per_kv_head:
            return out.reshape(L, Hk, n_head // Hk, len(slots)).sum(axis=2)
        return out


def _is_noop(plan: Plan, kp: np.ndarray, cell_pos: np.ndarray, reindex: bool, pos_now: np.ndarray) -> bool:
    """True when applying ``plan`` would change nothing: every cell kept in place, no key re-rotated and the
    cells keeping their positions ``pos_now``."""
    return plan.is_identity() and not (reindex and np.any(kp != cell_pos)) and np.array_equal(cell_pos, pos_now)


class _LazyState:
    """What :meth:`KVBridge.compact` returns after compacting in place: the compacted cache as a
    :class:`KVState`, read from llama.cpp (the first ``m`` cells) only when an attribute is first used, so the
    product path, which does not use it, pays no state read."""

    def __init__(self, bridge: KVBridge, m: int) -> None:
        self._bridge, self._m, self._st = bridge, m, None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._st is None:
            self._st = self._bridge.read_prefix(self._m)
        return getattr(self._st, name)

    def __repr__(self) -> str:
        return f"<compacted in place: {self._m} cells>"
