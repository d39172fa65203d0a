"""The exact undo of compaction in place on a CUDA cache (``numba.cuda``): no copy of the cache, no state read.

:func:`kvmerge_local.kernels.inplace_cuda.apply_inplace_cuda` applies a plan as the CPU path does
(:mod:`.inplace_swap`): per (layer, K or V tensor, head), with ``cf[h, j]`` the source cell of copy slot ``j``
(-1: merged), the slots fall in three kinds (:func:`kvmerge_local.kernels.inplace.swap_plans`, shared with the
CPU path):

- *identity* ``cf == j``: nothing moves;
- *swap* ``cf > j`` and no other copy slot of the head reads that cell: cell ``j``'s head segment and cell
  ``cf``'s are **exchanged**, in ascending ``j`` (``cuda_rows.swap_in_order``: one thread per (head, unit)
  column walks the slots; each column ends by setting its ``done`` flag);
- *late*: merges, copies from a cell ``< j``, copies of a cell several slots read.  Their values are computed
  from the untouched cache first (merge sources decoded to float32, copy sources staged raw); after the swaps
  the late slots' current segments are saved (``saved``), a ``mark`` kernel sets ``stage = 2``, then the late
  values are written.

:class:`DeviceUndo` puts a tensor back with kernels on the same stream, last tensor first: the saved late
segments (only when ``stage >= 2``: the save ran), then the swaps again in descending ``j`` on the columns
whose ``done`` flag is set.  The kernels read those flags on the device, so no host sync is needed and a
failure between two launches restores exactly what ran.  Device memory it holds until dropped: per tensor
``int8[H * W]`` flags, the plan's ``fw`` ``int32[H, m]`` and ``(head, slot)`` ``int32`` lists, and
``saved`` ``[n_late, W]`` raw units (``W``: a head's units, uint16 for rows, the element for transposed V) --
**nothing for a selection plan**, a few rows for merges.

:class:`DeviceKeySnapshot` is the device's :class:`~kvmerge_local.bridge.inplace.KeySnapshot`: before the keys
are re-rotated (not exactly invertible), the head segments that will be rotated (``idx >= 0``) are copied on
the device (``uint16[n_rotated, head_bytes / 2]`` per layer: the compacted keys at most), and written back on
restore -- before :meth:`DeviceUndo.restore`.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..codec.types import row_bytes
from . import cuda_rows as K


def _launch(kernel, n, *args):
    kernel[K.blocks(n), K.TPB](*args)


class _Unit:
    """One tensor's record: ``raw`` (device units), ``trans``, ``W``, ``fw`` (device int32[H, m]), the late slots
    ``lh``/``lj`` (device int32[n_late]), ``saved`` (device ``[n_late, W]`` of ``raw``'s dtype), ``done``
    (device int8[H * W]), ``stage`` (device int64[1]); ``a``/``host``: the device array and, for a host tensor
    (tests), the host array it is copied back to."""

    def __init__(self, raw, trans: bool, W: int, fw: np.ndarray, lh: np.ndarray, lj: np.ndarray, a, host) -> None:
        self.raw, self.trans, self.W, self.a, self.host = raw, trans, W, a, host
        self.H = fw.shape[0]
        self.fw = cuda.to_device(np.ascontiguousarray(fw, np.int32))
        self.n_late = len(lh)
        self.lh = cuda.to_device(np.ascontiguousarray(lh, np.int32))
        self.lj = cuda.to_device(np.ascontiguousarray(lj, np.int32))
        self.saved = cuda.device_array((max(self.n_late, 1), W), raw.dtype)
        self.done = cuda.to_device(np.zeros(self.H * W, np.int8))
        self.stage = cuda.to_device(np.zeros(1, np.int64))

    def swap(self) -> None:
        """The swaps (each column sets its ``done`` flag)."""
        _launch(K.swap_in_order, self.H * self.W, self.raw, self.trans, self.W, self.fw, self.done)

    def save_late(self) -> None:
        """Save the late slots' current segments, then ``stage = 2``; call before writing them."""
        if self.n_late:
            _launch(K.stage_raw, self.n_late * self.W, self.raw, self.trans, self.W, self.lh, self.lj, self.saved,
                    True)
            _launch(K.mark, 1, self.stage, 2)

    def restore(self) -> None:
        if self.n_late:
            _launch(K.restore_if, self.n_late * self.W, self.raw, self.trans, self.W, self.lh, self.lj,
                    self.saved, self.stage, 2)
        _launch(K.unswap_in_order, self.H * self.W, self.raw, self.trans, self.W, self.fw, self.done)
        if self.host is not None:
            self.a.copy_to_host(self.host)


class DeviceUndo:
    """How to put a CUDA cache back after :func:`~.inplace_cuda.apply_inplace_cuda` (see the module docstring):
    the tensors' records, in the order they were applied."""

    def __init__(self) -> None:
        self.units: list[_Unit] = []

    def record(self, raw, trans: bool, W: int, fw: np.ndarray, lh: np.ndarray, lj: np.ndarray, a=None,
               host=None) -> _Unit:
        """A tensor about to be permuted: its record (before any of its kernels is launched)."""
        u = _Unit(raw, trans, W, fw, lh, lj, a, host)
        self.units.append(u)
        return u

    def restore(self) -> None:
        """Undo every recorded tensor, the last first (kernels on the default stream; synchronize after)."""
        while self.units:
            self.units.pop().restore()


class DeviceKeySnapshot:
    """The head segments of K that ``idx`` (int[L, H, n], -1: not rotated) will re-rotate, copied on the device
    before :func:`~.inplace_cuda.rerotate_inplace_cuda`; :meth:`restore` writes them back.  ``k_layers``:
    device arrays ``uint8[kv_size, k_row_bytes]`` (the cache's own), ``head_dim`` the elements per head."""

    def __init__(self, k_layers, idx: np.ndarray, k_type: int, head_dim: int) -> None:
        W = row_bytes(k_type, head_dim) // 2
        self.units, self.W = [], W
        self.stage = cuda.to_device(np.zeros(1, np.int64))
        for l, a in enumerate(k_layers):
            if not getattr(a, "__cuda_ndarray__", False):
                raise ValueError("a key snapshot needs the layers as device arrays")
            h, c = np.nonzero(np.asarray(idx[l]) >= 0)
            if not len(h):
                continue
            raw = a.view(np.uint16)
            sh, sc = cuda.to_device(h.astype(np.int32)), cuda.to_device(c.astype(np.int32))
            R = cuda.device_array((len(h), W), np.uint16)
            _launch(K.stage_raw, len(h) * W, raw, False, W, sh, sc, R, True)
            self.units.append((raw, sh, sc, R))
        _launch(K.mark, 1, self.stage, 1)

    def restore(self) -> None:
        for raw, sh, sc, R in self.units:
            _launch(K.restore_if, R.shape[0] * self.W, raw, False, self.W, sh, sc, R, self.stage, 1)
        self.units = []
