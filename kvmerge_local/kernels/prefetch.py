"""``prefetch(a, i)``: a software prefetch of the cache line holding element ``i`` of a C-contiguous array,
for Numba kernels whose reads the hardware prefetcher cannot predict (the in-place compaction's per-head
gathers: the next slots' sources are known a few slots ahead).

It is LLVM's ``llvm.prefetch`` (read, high locality, data cache): a hint, never a fault, so ``i`` may be any
index of the array's buffer.  In Python (not compiled) it does nothing.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


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
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
