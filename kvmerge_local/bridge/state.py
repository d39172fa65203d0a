"""Parse and build llama.cpp sequence-state blobs (``llama_state_seq_get_data``) as zero-copy NumPy views.

Layout of one sequence of a plain llama model (unified cache, pinned llama.cpp; docs/LLAMA_CPP.md)::

    u32 magic 0xaf143cd8 | i32 seq_id | u32 n_stream
    per stream: u32 cell_count (stream skipped when 0)
        per cell: i32 pos | u32 n_seq_id (=1) | i32 seq_id
        u32 v_trans | u32 n_layer
        per layer K: i32 type | u64 row_bytes | cell_count rows of [head0 | head1 | ...]
        per layer V, v_trans=0: i32 type | u64 row_bytes | rows
        per layer V, v_trans=1: i32 type | u32 el_bytes | u32 n_embd_v_gqa | [n_embd_v_gqa, cell_count]

Every layer of a llama model has the same K/V widths, so the per-layer blocks sit at a regular stride
and the whole cache is one strided 4-D view per tensor: ``k4[l, h, i, :]`` is head ``h`` of cell ``i``
in layer ``l``.  Float caches (f32, f16, bf16) are viewed in their element type (bf16 as uint16);
quantized ones (q8_0, q4_0) as ``uint8[..., head_bytes]`` blocks.  This module never imports llama_cpp.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..codec.types import TYPE_IDS, TYPES  # noqa: F401 - the one ggml type table (TYPE_IDS: bridge.context)
from ..codec.types import row_bytes as codec_row_bytes
from ..errors import UnsupportedCacheError

log = logging.getLogger(__name__)

STATE_MAGIC = 0xAF143CD8


def _label(type_id: int) -> str:
    """A type's name for messages, also for ids the codec does not support."""
    return TYPES[type_id].name if type_id in TYPES else f"ggml type {type_id}"


def row_bytes(type_id: int, n_elems: int) -> int:
    """Bytes of a row of ``n_elems`` elements (``ggml_row_size``); UnsupportedCacheError when not whole blocks."""
    try:
        return codec_row_bytes(type_id, n_elems)
    except ValueError as e:
        raise UnsupportedCacheError(str(e)) from None


@dataclass(frozen=True)
class KVGeometry:
    """What the blob does not say: the model's KV head count and head size."""

    n_layer: int
    n_kv_head: int
    head_dim: int

    @property
    def n_embd_kv(self) -> int:
        return self.n_kv_head * self.head_dim

    def bytes_per_cell(self, k_type: int, v_type: int) -> int:
        """Bytes one cell takes in every layer's K and V rows of ggml types ``k_type``/``v_type``."""
        return self.n_layer * (row_bytes(k_type, self.n_embd_kv) + row_bytes(v_type, self.n_embd_kv))


class KVState:
    """One sequence's KV cache as views into a state blob (``uint8[n_bytes]``, owned or borrowed).

    Attributes (``N = n_cells``):
        blob: uint8[n_bytes] -- the bytes ``llama_state_seq_set_data`` accepts.
        pos: int32[N] -- cell positions (a view into the blob; writable when the blob is).
        k4, v4: [n_layer, n_kv_head, N, head_dim] in the stored float dtype, or
            uint8[n_layer, n_kv_head, N, head_bytes] for quantized types (strided views).
        k_type, v_type: ggml type ids; v_trans: V stored transposed (flash attention off).
    """

    def __init__(self, blob: np.ndarray, geom: KVGeometry, seq_id: int, n_cells: int, k_type: int,
                 v_type: int, v_trans: bool, pos_off: int, k_off: int, v_off: int) -> None:
        self.blob, self.geom, self.seq_id, self.n_cells = blob, geom, seq_id, n_cells
        self.k_type, self.v_type, self.v_trans = k_type, v_type, v_trans
        self._k_off, self._v_off = k_off, v_off
        N, L, H, d = n_cells, geom.n_layer, geom.n_kv_head, geom.head_dim
        self.pos = np.ndarray((N,), dtype=np.int32, buffer=blob, offset=pos_off, strides=(12,))
        self.k_row_bytes = row_bytes(k_type, geom.n_embd_kv)
        self.k4 = self._row_view(k_off, k_type, self.k_row_bytes)
        if v_trans:
            el = TYPES[v_type].block_bytes
            lstride = 12 + geom.n_embd_kv * N * el
            self.v4 = np.ndarray((L, H, N, d), dtype=TYPES[v_type].view, buffer=blob, offset=v_off + 12,
                                 strides=(lstride, d * N * el, el, N * el))
            self.v_row_bytes = geom.n_embd_kv * el
        else:
            self.v_row_bytes = row_bytes(v_type, geom.n_embd_kv)
            self.v4 = self._row_view(v_off, v_type, self.v_row_bytes)

    def _row_view(self, off: int, type_id: int, rb: int) -> np.ndarray:
        N, L, H, d = self.n_cells, self.geom.n_layer, self.geom.n_kv_head, self.geom.head_dim
        t = TYPES[type_id]
        lstride = 12 + N * rb
        if t.view is not None:
            es = t.block_bytes
            return np.ndarray((L, H, N, d), dtype=t.view, buffer=self.blob, offset=off + 12,
                              strides=(lstride, d * es, rb, es))
        hb = d // t.block * t.block_bytes
        return np.ndarray((L, H, N, hb), dtype=np.uint8, buffer=self.blob, offset=off + 12,
                          strides=(lstride, hb, rb, 1))

    # --- mlx-lm style cache contract ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of K and V data (what the cells cost in the cache, without headers)."""
        return self.geom.n_layer * self.n_cells * (self.k_row_bytes + self.v_row_bytes)

    @property
    def state(self) -> np.ndarray:
        """The raw blob (``uint8[n_bytes]``), loadable with ``llama_state_seq_set_data``."""
        return self.blob

    @property
    def quantized(self) -> bool:
        return TYPES[self.k_type].view is None or TYPES[self.v_type].view is None

    def k(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s keys: [n_kv_head, n_cells, head_dim] (stored dtype; view)."""
        return self.k4[layer]

    def v(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s values: [n_kv_head, n_cells, head_dim] (stored dtype; view)."""
        return self.v4[layer]

    def copy(self) -> KVState:
        """A deep copy (its own blob)."""
        return parse_state(self.blob.copy(), self.geom)

    def __repr__(self) -> str:
        return (f"KVState(seq={self.seq_id}, cells={self.n_cells}, layers={self.geom.n_layer}, "
                f"kv_heads={self.geom.n_kv_head}, head_dim={self.geom.head_dim}, "
                f"k={_label(self.k_type)}, v={_label(self.v_type)}, v_trans={self.v_trans}, "
                f"nbytes={self.nbytes})")


def _u32(b: np.ndarray, off: int) -> int:
    return int(b[off:off + 4].view(np.uint32)[0])


def _i32(b: np.ndarray, off: int) -> int:
    return int(b[off:off + 4].view(np.int32)[0])


def _u64(b: np.ndarray, off: int) -> int:
    return int(b[off:off + 8].view(np.uint64)[0])


def parse_state(blob: np.ndarray, geom: KVGeometry) -> KVState:
    """Parse a sequence state blob (``uint8[n_bytes]``) into zero-copy views.

    Raises UnsupportedCacheError for anything but one non-empty stream of a plain llama KV cache with
    known types and ``geom``'s widths in every layer.
    """
    b = blob
    if b.dtype != np.uint8 or b.ndim != 1:
        raise ValueError("blob must be uint8[n_bytes]")
    if b.nbytes < 12 or _u32(b, 0) != STATE_MAGIC:
        raise UnsupportedCacheError("not a llama.cpp sequence state (bad magic)")
    seq_id, n_stream, off = _i32(b, 4), _u32(b, 8), 12
    found = None
    for s in range(n_stream):
        n = _u32(b, off)
        off += 4
        if n == 0:
            continue
        if found is not None:
            raise UnsupportedCacheError("the state holds cells in several streams (several sequences); "
                                        "use a unified KV cache with one sequence")
        found = (s, n, off)
        off = _skip_stream(b, off, n, geom)
    if found is None:
        raise UnsupportedCacheError(f"sequence {seq_id} has no cells")
    _, n, cell_off = found
    cells = np.ndarray((n, 3), dtype=np.int32, buffer=b, offset=cell_off)
    if np.any(cells[:, 1] != 1):
        raise UnsupportedCacheError("cells shared by several sequences are not supported")
    doff = cell_off + 12 * n
    v_trans, n_layer = _u32(b, doff), _u32(b, doff + 4)
    if n_layer != geom.n_layer:
        raise UnsupportedCacheError(f"state has {n_layer} layers, the model {geom.n_layer}")
    k_off = doff + 8
    k_type = _i32(b, k_off)
    v_off = k_off + n_layer * (12 + n * _u64(b, k_off + 4))
    if v_off + 12 > b.nbytes:
        raise UnsupportedCacheError("state blob is truncated")
    v_type = _i32(b, v_off)
    for t in (k_type, v_type):
        if t not in TYPES:
            raise UnsupportedCacheError(f"KV cache type {_label(t)} is not supported "
                                        f"(use one of {', '.join(TYPE_IDS)})")
    v_block = 12 + (_u32(b, v_off + 4) * _u32(b, v_off + 8) * n if v_trans else n * _u64(b, v_off + 4))
    if v_off + n_layer * v_block > b.nbytes:
        raise UnsupportedCacheError("state blob is truncated")
    st = KVState(b, geom, seq_id, n, k_type, v_type, bool(v_trans), cell_off, k_off, v_off)
    _check_layers(b, st)
    return st


def _skip_stream(b: np.ndarray, off: int, n: int, geom: KVGeometry) -> int:
    """Offset just past one stream's cells and data (used only to detect several streams)."""
    off += 12 * n
    v_trans, n_layer = _u32(b, off), _u32(b, off + 4)
    off += 8
    for _ in range(n_layer):
        off += 12 + n * _u64(b, off + 4)
    for _ in range(n_layer):
        if v_trans:
            off += 12 + _u32(b, off + 4) * _u32(b, off + 8) * n
        else:
            off += 12 + n * _u64(b, off + 4)
    return off


def _check_layers(b: np.ndarray, st: KVState) -> None:
    """Every layer must carry the same type and width (so the 4-D views are exact)."""
    L, N = st.geom.n_layer, st.n_cells
    for l in range(L):
        ko = st._k_off + l * (12 + N * st.k_row_bytes)
        if _i32(b, ko) != st.k_type or _u64(b, ko + 4) != st.k_row_bytes:
            raise UnsupportedCacheError(f"layer {l} K type/width differs (per-layer KV widths are unsupported)")
        if st.v_trans:
            vo = st._v_off + l * (12 + st.geom.n_embd_kv * N * TYPES[st.v_type].block_bytes)
            ok = _i32(b, vo) == st.v_type and _u32(b, vo + 8) == st.geom.n_embd_kv
        else:
            vo = st._v_off + l * (12 + N * st.v_row_bytes)
            ok = _i32(b, vo) == st.v_type and _u64(b, vo + 4) == st.v_row_bytes
        if not ok:
            raise UnsupportedCacheError(f"layer {l} V type/width differs (per-layer KV widths are unsupported)")


def new_state(like: KVState, n_cells: int, pos: np.ndarray | None = None, out: np.ndarray | None = None) -> KVState:
    """A fresh blob with ``like``'s types and layout and ``n_cells`` cells; headers written, K/V data uninitialized.

    ``pos``: int32[n_cells] cell positions (written when given).  The K/V views of the result are
    writable, so kernels fill the new blob in place (no intermediate arrays).  ``out``: a uint8 buffer to
    build the blob in when it is large enough (no fresh allocation and first-touch page faults).
    """
    g, N = like.geom, n_cells
    rk = like.k_row_bytes
    vblock = 12 + (g.n_embd_kv * N * TYPES[like.v_type].block_bytes if like.v_trans else N * like.v_row_bytes)
    size = 12 + 4 + 12 * N + 8 + g.n_layer * (12 + N * rk) + g.n_layer * vblock
    b = out[:size] if out is not None and out.dtype == np.uint8 and out.nbytes >= size else np.empty(size, np.uint8)
    b[0:4].view(np.uint32)[0] = STATE_MAGIC
    b[4:8].view(np.int32)[0] = like.seq_id
    b[8:12].view(np.uint32)[0] = 1
    b[12:16].view(np.uint32)[0] = N
    cells = np.ndarray((N, 3), dtype=np.int32, buffer=b, offset=16)
    cells[:, 1] = 1
    cells[:, 2] = like.seq_id
    if pos is not None:
        cells[:, 0] = pos
    doff = 16 + 12 * N
    b[doff:doff + 4].view(np.uint32)[0] = int(like.v_trans)
    b[doff + 4:doff + 8].view(np.uint32)[0] = g.n_layer
    k_off = doff + 8
    for l in range(g.n_layer):
        o = k_off + l * (12 + N * rk)
        b[o:o + 4].view(np.int32)[0] = like.k_type
        b[o + 4:o + 12].view(np.uint64)[0] = rk
    v_off = k_off + g.n_layer * (12 + N * rk)
    for l in range(g.n_layer):
        o = v_off + l * vblock
        b[o:o + 4].view(np.int32)[0] = like.v_type
        if like.v_trans:
            b[o + 4:o + 8].view(np.uint32)[0] = TYPES[like.v_type].block_bytes
            b[o + 8:o + 12].view(np.uint32)[0] = g.n_embd_kv
        else:
            b[o + 4:o + 12].view(np.uint64)[0] = like.v_row_bytes
    return KVState(b, g, like.seq_id, N, like.k_type, like.v_type, like.v_trans, 16, k_off, v_off)


def float_views(st: KVState) -> tuple[np.ndarray, np.ndarray]:
    """K and V as arrays the methods accept: ``[n_layer, n_kv_head, N, head_dim]`` float16/float32.

    f16/f32 caches: the state's own views (no copy).  bf16 and quantized K is converted layer by layer
    into one float16 array (quantized keys stay in their Hadamard-rotated basis: cosines, distances and
    weighted sums do not change under an orthonormal rotation).  The planners read values only for their
    shape, so a bf16/quantized V is passed as a zero-stride float16 view instead of being converted.
    """
    from .. import codec  # noqa: PLC0415 - Numba compiles on first use

    L, H, N = st.geom.n_layer, st.geom.n_kv_head, st.n_cells
    d = st.geom.head_dim

    def convert(a: np.ndarray, t: int) -> np.ndarray:
        out = np.empty((L, H, N, d), np.float16)
        for l in range(L):
            if a.dtype == np.uint16:
                out[l] = codec.bf16_bits_to_f32_array(a[l])
            else:
                out[l] = codec.dequantize_rows(np.ascontiguousarray(a[l]).reshape(H * N, -1), t).reshape(H, N, d)
        return out

    k = st.k4 if st.k4.dtype in (np.float16, np.float32) else convert(st.k4, st.k_type)
    v = st.v4 if st.v4.dtype in (np.float16, np.float32) else np.broadcast_to(np.zeros(1, np.float16), (L, H, N, d))
    return k, v
