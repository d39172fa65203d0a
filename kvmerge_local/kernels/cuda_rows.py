"""``numba.cuda`` device kernels on llama.cpp cache tensors: raw moves and swaps, row decode to float32, merge,
encode, the undo's restores.

Used by :mod:`.inplace_cuda` (the in-place apply and key re-rotation); no host logic here.  A layer's tensor
is addressed per (KV head ``h``, cell ``c``, unit ``b``) as ``A[c, h*W + b]`` (rows: one cell per row) or,
with ``trans``, ``A[h*W + b, c]`` (llama.cpp's transposed V: one embedding channel per row).

Exactness (what the tests check against the CPU codecs and the CPU apply kernel):

- float arithmetic uses :func:`_mul`/:func:`_add`/:func:`_sub`, which on a GPU are libdevice's ``*_rn``
  intrinsics: NVVM contracts ``a*b + c`` into an FMA by default, the CPU kernels do not, and one FMA changes
  the last bit.  Under the simulator they are plain float32 NumPy operations.
- f16 loads/stores use the hardware conversion (round-half-even, as F16C and NumPy); merged f16 values are
  saturated to +-65504 first, as :func:`kvmerge_local.kernels.f16.store`.  bf16 goes through uint32 bit
  views of a float32 scratch buffer (integer shifts and ggml's round-half-even), so it needs no bit casts.
- q8_0/q4_0 encode as ggml's **CUDA** backend stores the cache (``quantize_f32_q8_0_block``: ``d = amax/127``,
  ``id = 1/d``, ``roundf``; q4_0 as ``quantize_row_q4_0_ref``), i.e. the codec's ``Q8_VARIANT_REF``.
  Finite inputs only (NaN/inf blocks are not emulated).
"""
from __future__ import annotations

import logging

from numba import config, cuda, float32, int32, uint8, uint32

log = logging.getLogger(__name__)

SIM = bool(config.ENABLE_CUDASIM)
TPB = 64  # threads per block for the 1-D launches

if SIM:  # the simulator runs device functions as Python on NumPy float32 scalars (no contraction)

    @cuda.jit(device=True)
    def _mul(a, b):
        return float32(a) * float32(b)

    @cuda.jit(device=True)
    def _add(a, b):
        return float32(a) + float32(b)

    @cuda.jit(device=True)
    def _sub(a, b):
        return float32(a) - float32(b)

else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(float32(a), float32(b))

    @cuda.jit(device=True)
    def _add(a, b):
        return libdevice.fadd_rn(float32(a), float32(b))

    @cuda.jit(device=True)
    def _sub(a, b):
        return libdevice.fsub_rn(float32(a), float32(b))


def blocks(n: int) -> int:
    """Blocks of :data:`TPB` threads covering ``n`` work items (at least one)."""
    return max(1, (n + TPB - 1) // TPB)


# --- raw moves (copies: exact for every type) -----------------------------------------------------------------

@cuda.jit(device=True)
def _ix(trans, W, h, c, b):
    """Index of unit b of head h of cell c: ``(c, h*W + b)``, or ``(h*W + b, c)`` when transposed."""
    return (h * W + b, c) if trans else (c, h * W + b)


@cuda.jit(device=True)
def _item(t, n):
    """Work item t of ``[rows, n]`` as (row, column)."""
    r = t // n
    return r, t - r * n


@cuda.jit
def stage_raw(A, trans, W, sh, sc, R, load):
    """Raw staging: with ``load``, ``R[s, b]`` = unit b of head ``sh[s]`` of cell ``sc[s]`` (before anything is
    written); else the reverse, into slot ``sc[s]``."""
    t = cuda.grid(1)
    if t >= R.shape[0] * W:
        return
    s, b = _item(t, W)
    if load:
        R[s, b] = A[_ix(trans, W, sh[s], sc[s], b)]
    else:
        A[_ix(trans, W, sh[s], sc[s], b)] = R[s, b]


# --- decode rows (head h of cell c) to float32 ----------------------------------------------------------------

@cuda.jit
def gather_float(E, trans, d, nh, nc, X):
    """``X[r, e]`` = element e of head ``nh[r]`` of cell ``nc[r]``; E float16 or float32 elements."""
    t = cuda.grid(1)
    if t >= X.shape[0] * d:
        return
    r, e = _item(t, d)
    X[r, e] = float32(E[_ix(trans, d, nh[r], nc[r], e)])


@cuda.jit
def gather_bf16(E, trans, d, nh, nc, Xu):
    """bf16 bits (uint16 ``E``) -> float32 bits in ``Xu`` (a uint32 view of the float32 scratch)."""
    t = cuda.grid(1)
    if t >= Xu.shape[0] * d:
        return
    r, e = _item(t, d)
    Xu[r, e] = uint32(E[_ix(trans, d, nh[r], nc[r], e)]) << uint32(16)


@cuda.jit
def gather_q(B, S, hb, q4, nh, nc, X):
    """Dequantize q8_0 (``q4`` False, 34-byte blocks) or q4_0 (18-byte blocks) elements: ``B`` uint8 rows,
    ``S`` their float16 view (block scales); ``value = code * d`` in float32 as ggml's ``to_float``."""
    d = X.shape[1]
    t = cuda.grid(1)
    if t >= X.shape[0] * d:
        return
    r, e = _item(t, d)
    c = nc[r]
    blk, i = _item(e, 32)
    if q4:
        off = nh[r] * hb + blk * 18
        byte = int32(B[c, off + 2 + (i % 16)])
        code = (byte & 15) - 8 if i < 16 else (byte >> 4) - 8
    else:
        off = nh[r] * hb + blk * 34
        code = int32(B[c, off + 2 + i])
        if code >= 128:
            code -= 256
    X[r, e] = _mul(float32(code), float32(S[c, off // 2]))


# --- merge into scratch -----------------------------------------------------------------------------------------

@cuda.jit
def merge_rows(X, xrow, t0, offsets, l, w, mh, mj, Y):
    """``Y[r, e] = sum_t w[t] * X[xrow[t - t0], e]`` over the non-zero-weight sources of slot ``mj[r]`` of head
    ``mh[r]`` in layer ``l``, in source order, the first one initializing the sum (as the CPU kernel)."""
    d = Y.shape[1]
    t = cuda.grid(1)
    if t >= Y.shape[0] * d:
        return
    r, e = _item(t, d)
    h, j = mh[r], mj[r]
    acc = float32(0.0)
    first = True
    for s in range(offsets[l, h, j], offsets[l, h, j + 1]):
        ws = w[s]
        if ws != 0.0:
            p = _mul(ws, X[xrow[s - t0], e])
            if first:
                acc = p
                first = False
            else:
                acc = _add(acc, p)
    Y[r, e] = acc


# --- encode scratch rows into slots -----------------------------------------------------------------------------

@cuda.jit
def write_float(E, trans, d, mh, mj, Y, hi):
    """Element e of head ``mh[r]`` of slot ``mj[r]`` = ``Y[r, e]`` (saturated to +-hi when hi > 0; f16)."""
    t = cuda.grid(1)
    if t >= Y.shape[0] * d:
        return
    r, e = _item(t, d)
    v = Y[r, e]
    if hi > 0:
        if v > hi:
            v = hi
        elif v < -hi:
            v = -hi
    E[_ix(trans, d, mh[r], mj[r], e)] = v


@cuda.jit
def write_bf16(E, trans, d, mh, mj, Yu):
    """bf16 bits from float32 bits ``Yu`` (round-half-even; NaN -> ``(u >> 16) | 64``, as ggml)."""
    t = cuda.grid(1)
    if t >= Yu.shape[0] * d:
        return
    r, e = _item(t, d)
    u = uint32(Yu[r, e])
    if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000):
        bits = (u >> uint32(16)) | uint32(64)
    else:
        bits = (u + (uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1)))) >> uint32(16)
    E[_ix(trans, d, mh[r], mj[r], e)] = bits


@cuda.jit
def write_q(B, S, hb, q4, mh, mj, Y):
    """Quantize ``Y[r]`` into head ``mh[r]`` of slot ``mj[r]``: thread = one 32-element block."""
    nblk = Y.shape[1] // 32
    t = cuda.grid(1)
    if t >= Y.shape[0] * nblk:
        return
    r, blk = _item(t, nblk)
    j = mj[r]
    x0 = blk * 32
    zero = float32(0.0)
    if q4:
        off = mh[r] * hb + blk * 18
        amax = zero
        mx = zero
        for i in range(32):
            v = Y[r, x0 + i]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        dd = float32(mx / float32(-8.0))
        idv = float32(float32(1.0) / dd) if dd != zero else zero
        S[j, off // 2] = dd
        for i in range(16):
            lo = int32(_add(_mul(Y[r, x0 + i], idv), float32(8.5)))
            hi = int32(_add(_mul(Y[r, x0 + 16 + i], idv), float32(8.5)))
            if lo > 15:  # (no min(): it does not type for int32 on the CUDA target)
                lo = 15
            if hi > 15:
                hi = 15
            B[j, off + 2 + i] = uint8((lo | (hi << 4)) & 0xFF)
    else:
        off = mh[r] * hb + blk * 34
        amax = zero
        for i in range(32):
            a = abs(Y[r, x0 + i])
            if a > amax:
                amax = a
        dd = float32(amax / float32(127.0))
        idv = float32(float32(1.0) / dd) if dd != zero else zero
        S[j, off // 2] = dd
        for i in range(32):
            v = _mul(Y[r, x0 + i], idv)
            tv = float32(int32(v))  # truncation toward zero (|v| <= ~127.5)
            fr = _sub(v, tv)
            if fr >= float32(0.5):
                tv = _add(tv, float32(1.0))
            elif fr <= float32(-0.5):
                tv = _sub(tv, float32(1.0))
            B[j, off + 2 + i] = uint8(int32(tv) & 0xFF)


# --- RoPE -------------------------------------------------------------------------------------------------------

@cuda.jit
def rope_rows(X, ridx, cos_t, sin_t, neox):
    """Rotate float32 rows ``X[r]`` by table row ``ridx[r]`` (pairs ``(i, i+half)`` with neox, else
    ``(2i, 2i+1)``): ``x0*cos - x1*sin, x0*sin + x1*cos`` in float32, as :mod:`.rope`'s CPU kernel."""
    half = cos_t.shape[1]
    t = cuda.grid(1)
    if t >= X.shape[0] * half:
        return
    r, i = _item(t, half)
    k = ridx[r]
    cs, sn = cos_t[k, i], sin_t[k, i]
    a = i if neox else 2 * i
    b = i + half if neox else 2 * i + 1
    x0, x1 = X[r, a], X[r, b]
    X[r, a] = _sub(_mul(x0, cs), _mul(x1, sn))
    X[r, b] = _add(_mul(x0, sn), _mul(x1, cs))


@cuda.jit
def fwht_rows(X, nrot, scale):
    """In place, per contiguous chunk of ``nrot`` elements of each row: scale, then radix-2 butterflies
    ``(u+v, u-v)`` for len = 1, 2, 4, ... (ggml's ``ggml_compute_forward_fwht``; its own inverse).
    Thread = one chunk (sequential butterflies; chunks are 64..256 elements)."""
    nch = X.shape[1] // nrot
    t = cuda.grid(1)
    if t >= X.shape[0] * nch:
        return
    r, o = _item(t, nch)
    o *= nrot
    for j in range(nrot):
        X[r, o + j] = _mul(X[r, o + j], scale)
    ln = 1
    while ln < nrot:
        for i in range(0, nrot, 2 * ln):
            for j in range(ln):
                u = X[r, o + i + j]
                v = X[r, o + i + ln + j]
                X[r, o + i + j] = _add(u, v)
                X[r, o + i + ln + j] = _sub(u, v)
        ln *= 2


# --- permutation apply and its undo (kernels.cuda_undo) ---------------------------------------------------------

@cuda.jit(device=True)
def _walk(A, trans, W, fw, h, b, reverse):
    """Unit b of head h: exchange slot j with cell ``fw[h, j]`` for every ``fw[h, j] >= 0``, in ascending j
    (descending: ``reverse``, which undoes the ascending walk)."""
    m = fw.shape[1]
    for q in range(m):
        j = m - 1 - q if reverse else q
        c = fw[h, j]
        if c >= 0:
            x = A[_ix(trans, W, h, j, b)]
            A[_ix(trans, W, h, j, b)] = A[_ix(trans, W, h, c, b)]
            A[_ix(trans, W, h, c, b)] = x


@cuda.jit
def swap_in_order(A, trans, W, fw, done):
    """Exchange slots with the cells they take, in place: thread = (head h, unit b); ``fw[h, j]`` = the cell slot
    j exchanges with (``> j``, read by no other slot), or -1.  Ascending j; then ``done[t] = 1`` (int8[H * W]:
    this thread's column is permuted -- what :func:`unswap_in_order` checks)."""
    t = cuda.grid(1)
    if t >= fw.shape[0] * W:
        return
    h, b = _item(t, W)
    _walk(A, trans, W, fw, h, b, False)
    done[t] = 1


@cuda.jit
def unswap_in_order(A, trans, W, fw, done):
    """Undo :func:`swap_in_order` on the columns it permuted (``done[t] == 1``, reset to 0): the same exchanges
    in descending j."""
    t = cuda.grid(1)
    if t >= fw.shape[0] * W or done[t] == 0:
        return
    h, b = _item(t, W)
    _walk(A, trans, W, fw, h, b, True)
    done[t] = 0


@cuda.jit
def mark(stage, v):
    """``stage[0] = v`` (int64[1]): launched after a kernel on the same stream, it records that it ran."""
    if cuda.grid(1) == 0:
        stage[0] = v


@cuda.jit
def restore_if(A, trans, W, sh, sc, R, stage, v):
    """Unit b of head ``sh[s]`` of cell ``sc[s]`` = ``R[s, b]`` (a saved segment put back), only when
    ``stage[0] >= v`` (the save ran)."""
    t = cuda.grid(1)
    if t >= R.shape[0] * W or stage[0] < v:
        return
    s, b = _item(t, W)
    A[_ix(trans, W, sh[s], sc[s], b)] = R[s, b]
