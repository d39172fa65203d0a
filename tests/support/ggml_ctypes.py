"""ctypes access to ggml's own type traits, quantizers and Hadamard code (test-only: the parity oracle of
tests/test_codec.py; the project's C boundary lives in kvmerge_local.bridge).

The ggml libraries are found through LLAMA_CPP_LIB_PATH (a directory holding libggml-base.so and
libggml-cpu.so), else the installed llama_cpp package's ``lib`` directory; the ``ggml`` fixture skips when
neither has them.
"""
from __future__ import annotations

import ctypes as C
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from kvmerge_local import codec
from kvmerge_local.codec import GGML_TYPE_F32

# ----------------------------------------------------------------------------------------------------------------
# ctypes helper for libggml (test-only; the project's C boundary lives in kvmerge_local.bridge)
# ----------------------------------------------------------------------------------------------------------------

def _lib_dir() -> tuple[pathlib.Path | None, str]:
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    cands = []
    if env:
        cands.append(pathlib.Path(env))
    spec = importlib.util.find_spec("llama_cpp")  # does not import (importing would load libllama)
    if spec is not None and spec.origin:
        cands.append(pathlib.Path(spec.origin).parent / "lib")
    for d in cands:
        if (d / "libggml-base.so").exists() and (d / "libggml-cpu.so").exists():
            return d, ""
    return None, (f"libggml-base.so/libggml-cpu.so not found in LLAMA_CPP_LIB_PATH={env!r} nor in the "
                  f"llama_cpp package's lib dir ({[str(c) for c in cands]})")


# typedef void (*ggml_to_float_t)  (const void  * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
# typedef void (*ggml_from_float_t)(const float * GGML_RESTRICT x, void  * GGML_RESTRICT y, int64_t k);
_ROW_FN = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)


class _TypeTraits(C.Structure):
    # struct ggml_type_traits { const char * type_name; int64_t blck_size; int64_t blck_size_interleave;
    #     size_t type_size; bool is_quantized; ggml_to_float_t to_float; ggml_from_float_t from_float_ref; };
    _fields_ = [("type_name", C.c_char_p), ("blck_size", C.c_int64), ("blck_size_interleave", C.c_int64),
                ("type_size", C.c_size_t), ("is_quantized", C.c_bool), ("to_float", C.c_void_p),
                ("from_float_ref", C.c_void_p)]


class _TypeTraitsCpu(C.Structure):
    # struct ggml_type_traits_cpu { ggml_from_float_t from_float; ggml_vec_dot_t vec_dot;
    #     enum ggml_type vec_dot_type; int64_t nrows; };
    _fields_ = [("from_float", C.c_void_p), ("vec_dot", C.c_void_p), ("vec_dot_type", C.c_int),
                ("nrows", C.c_int64)]


class _InitParams(C.Structure):
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class Ggml:
    """Minimal ctypes view of libggml-base + libggml-cpu."""

    def __init__(self, d: pathlib.Path):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.base = C.CDLL(str(d / "libggml-base.so"), mode=C.RTLD_GLOBAL)
        self.cpu = C.CDLL(str(d / "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
        b, c = self.base, self.cpu
        # GGML_API const struct ggml_type_traits * ggml_get_type_traits(enum ggml_type type);
        b.ggml_get_type_traits.argtypes, b.ggml_get_type_traits.restype = [C.c_int], C.POINTER(_TypeTraits)
        # GGML_BACKEND_API const struct ggml_type_traits_cpu * ggml_get_type_traits_cpu(enum ggml_type type);
        c.ggml_get_type_traits_cpu.argtypes = [C.c_int]
        c.ggml_get_type_traits_cpu.restype = C.POINTER(_TypeTraitsCpu)
        # GGML_BACKEND_API void ggml_cpu_init(void);
        c.ggml_cpu_init.argtypes, c.ggml_cpu_init.restype = [], None
        # GGML_API size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start,
        #                                     int64_t nrows, int64_t n_per_row, const float * imatrix);
        b.ggml_quantize_chunk.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64,
                                          C.c_void_p]
        b.ggml_quantize_chunk.restype = C.c_size_t
        # GGML_API const char * ggml_type_name(enum ggml_type type);
        b.ggml_type_name.argtypes, b.ggml_type_name.restype = [C.c_int], C.c_char_p
        # GGML_API size_t ggml_row_size(enum ggml_type type, int64_t ne);
        b.ggml_row_size.argtypes, b.ggml_row_size.restype = [C.c_int, C.c_int64], C.c_size_t
        # GGML_API struct ggml_context * ggml_init(struct ggml_init_params params);
        b.ggml_init.argtypes, b.ggml_init.restype = [_InitParams], C.c_void_p
        # GGML_API void ggml_free(struct ggml_context * ctx);
        b.ggml_free.argtypes, b.ggml_free.restype = [C.c_void_p], None
        # GGML_API struct ggml_tensor * ggml_new_tensor_2d(struct ggml_context * ctx, enum ggml_type type,
        #                                                  int64_t ne0, int64_t ne1);
        b.ggml_new_tensor_2d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64]
        b.ggml_new_tensor_2d.restype = C.c_void_p
        # GGML_API struct ggml_tensor * ggml_mul_mat(struct ggml_context * ctx, struct ggml_tensor * a,
        #                                            struct ggml_tensor * b);
        b.ggml_mul_mat.argtypes, b.ggml_mul_mat.restype = [C.c_void_p, C.c_void_p, C.c_void_p], C.c_void_p
        # GGML_API void ggml_mul_mat_set_hint(struct ggml_tensor * a, enum ggml_op_hint hint);
        b.ggml_mul_mat_set_hint.argtypes, b.ggml_mul_mat_set_hint.restype = [C.c_void_p, C.c_int], None
        # GGML_API struct ggml_cgraph * ggml_new_graph(struct ggml_context * ctx);
        b.ggml_new_graph.argtypes, b.ggml_new_graph.restype = [C.c_void_p], C.c_void_p
        # GGML_API void ggml_build_forward_expand(struct ggml_cgraph * cgraph, struct ggml_tensor * tensor);
        b.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
        b.ggml_build_forward_expand.restype = None
        # GGML_API void * ggml_get_data(const struct ggml_tensor * tensor);
        b.ggml_get_data.argtypes, b.ggml_get_data.restype = [C.c_void_p], C.c_void_p
        # GGML_BACKEND_API enum ggml_status ggml_graph_compute_with_ctx(struct ggml_context * ctx,
        #                                                              struct ggml_cgraph * cgraph, int n_threads);
        c.ggml_graph_compute_with_ctx.argtypes = [C.c_void_p, C.c_void_p, C.c_int]
        c.ggml_graph_compute_with_ctx.restype = C.c_int
        c.ggml_cpu_init()

    def _fn(self, addr) -> _ROW_FN:
        assert addr, "NULL function pointer in ggml type traits"
        return _ROW_FN(addr)

    def to_float(self, type_id: int, raw: np.ndarray, n_elems: int) -> np.ndarray:
        """ggml_get_type_traits(type)->to_float on each row: uint8[n, row_bytes] -> float32[n, n_elems]."""
        raw = np.ascontiguousarray(raw)
        out = np.empty((raw.shape[0], n_elems), np.float32)
        self._fn(self.base.ggml_get_type_traits(type_id).contents.to_float)(
            raw.ctypes.data, out.ctypes.data, raw.shape[0] * n_elems)
        return out

    def from_float_cpu(self, type_id: int, x: np.ndarray) -> np.ndarray:
        """ggml_get_type_traits_cpu(type)->from_float row by row (what ggml_set_rows/ggml_cpy call)."""
        x = np.ascontiguousarray(x, np.float32)
        rb = self.base.ggml_row_size(type_id, x.shape[1])
        out = np.zeros((x.shape[0], rb), np.uint8)
        fn = self._fn(self.cpu.ggml_get_type_traits_cpu(type_id).contents.from_float)
        for r in range(x.shape[0]):
            fn(x[r].ctypes.data, out[r].ctypes.data, x.shape[1])
        return out

    def quantize_chunk(self, type_id: int, x: np.ndarray) -> np.ndarray:
        """ggml_quantize_chunk (the reference quantizers in ggml-quants.c)."""
        x = np.ascontiguousarray(x, np.float32)
        rb = self.base.ggml_row_size(type_id, x.shape[1])
        out = np.zeros((x.shape[0], rb), np.uint8)
        n = self.base.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == out.nbytes
        return out

    def mul_mat_hadamard(self, x: np.ndarray, nrot: int, hint: bool) -> np.ndarray:
        """Run llama_mul_mat_hadamard's graph on the CPU backend: mul_mat(H, x viewed as [nrot, N]) (+hint)."""
        x = np.ascontiguousarray(x, np.float32)
        n_chunks = x.size // nrot
        ctx = self.base.ggml_init(_InitParams(64 * 1024 * 1024 + 4 * (x.size * 2 + nrot * nrot), None, False))
        assert ctx
        try:
            rot = self.base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, nrot, nrot)
            src = self.base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, nrot, n_chunks)
            h = codec.hadamard_matrix(nrot)
            C.memmove(self.base.ggml_get_data(rot), h.ctypes.data, h.nbytes)
            C.memmove(self.base.ggml_get_data(src), x.ctypes.data, x.nbytes)
            res = self.base.ggml_mul_mat(ctx, rot, src)
            if hint:
                self.base.ggml_mul_mat_set_hint(res, 1)  # GGML_HINT_SRC0_IS_HADAMARD = 1
            gf = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(gf, res)
            assert self.cpu.ggml_graph_compute_with_ctx(ctx, gf, 1) == 0
            out = np.empty(x.shape, np.float32)
            C.memmove(out.ctypes.data, self.base.ggml_get_data(res), out.nbytes)
            return out
        finally:
            self.base.ggml_free(ctx)


_GGML: Ggml | None = None


@pytest.fixture(scope="module")
def ggml() -> Ggml:
    global _GGML
    d, why = _lib_dir()
    if d is None:
        pytest.skip(why)
    if _GGML is None:
        _GGML = Ggml(d)
    return _GGML

