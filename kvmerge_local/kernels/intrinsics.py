"""LLVM intrinsics for the in-place compaction kernels (:mod:`.inplace_swap`), usable inside Numba code.

- ``prefetch(a, i)``: a software prefetch of the cache line holding element ``i`` of a C-contiguous array, for
  reads the hardware prefetcher cannot predict (the per-head gathers: the next slots' sources are known a few
  slots ahead).  LLVM's ``llvm.prefetch`` (read, high locality, data cache): a hint, never a fault, so ``i``
  may be any index of the array's buffer.
- ``compress32_u16(dst, di, src, si, mask)``: 32 uint16 lanes packed by a bit mask (``vpcompressw``), only
  where :data:`HAS_VBMI2`; the transposed V layers of a selection are compacted with it.
"""
from __future__ import annotations

import numba
from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..codec.floats import llvm_host_features

# the intrinsic's name carries the pointer type: opaque pointers ("p0") since LLVM 15, "p0i8" before
_NAME = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def prefetch(typingctx, arr, idx):  # pragma: no cover - compiled
    """Prefetch the line of ``arr.reshape(-1)[idx]`` (``arr``: a C-contiguous array; ``idx``: an integer)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(arr)(context, builder, args[0])
        size = context.get_abi_sizeof(context.get_data_type(arr.dtype))
        i64 = ir.IntType(64)
        off = builder.mul(builder.sext(args[1], i64) if args[1].type.width < 64 else args[1], ir.Constant(i64, size))
        addr = builder.add(builder.ptrtoint(ary.data, i64), off)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        ptr = builder.inttoptr(addr, i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _NAME)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# vpcompressw (AVX-512 VBMI2) on this CPU, and Numba compiling for this CPU (not a NUMBA_CPU_NAME target)
HAS_VBMI2 = "+avx512vbmi2" in llvm_host_features() and numba.config.CPU_NAME is None


@intrinsic
def compress32_u16(typingctx, dst, di, src, si, mask):  # pragma: no cover - compiled
    """Load ``src[si:si + 32]``, pack the elements whose bit ``i`` of ``mask`` (uint32) is set to the front, in
    order, and store all 32 lanes at ``dst[di:di + 32]`` (the lanes after the packed ones are zeros, to be
    overwritten by the next store).  ``dst``, ``src``: C-contiguous 1-D uint16 arrays; ``dst`` may overlap the
    loaded elements (loaded first).  One ``vpcompressw`` into a register: only where :data:`HAS_VBMI2`
    (the compress-*store* form is microcoded and slow on AMD Zen 4)."""
    if not all(isinstance(a, types.Array) and a.dtype == types.uint16 for a in (dst, src)):
        return None
    sig = types.void(dst, di, src, si, mask)

    def codegen(context, builder, signature, args):
        i16, i64 = ir.IntType(16), ir.IntType(64)
        vec, bits = ir.VectorType(i16, 32), ir.VectorType(ir.IntType(1), 32)

        def addr(ary_t, ary, idx):
            a = context.make_array(ary_t)(context, builder, ary)
            i = builder.sext(idx, i64) if idx.type.width < 64 else idx
            return builder.inttoptr(builder.add(builder.ptrtoint(a.data, i64), builder.mul(i, ir.Constant(i64, 2))),
                                    vec.as_pointer())

        v = builder.load(addr(src, args[2], args[3]), align=2)
        mk = builder.bitcast(builder.trunc(args[4], ir.IntType(32)) if args[4].type.width > 32 else args[4], bits)
        fnty = ir.FunctionType(vec, [vec, vec, bits])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.mask.compress.v32i16")
        packed = builder.call(fn, [v, ir.Constant(vec, None), mk])
        builder.store(packed, addr(dst, args[0], args[1]), align=2)
        return context.get_dummy_value()

    return sig, codegen
