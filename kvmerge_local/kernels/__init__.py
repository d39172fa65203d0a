"""Numba kernels (CPU, and ``numba.cuda`` twins in ``cuda``) behind the methods and the bridge; NumPy in, NumPy out.

Floor 2 of the layout (docs: README "Architecture"): kernels import only ``codec`` (f16 conversions) and ``plan``,
never the methods, the bridge or llama.cpp.  Caches are ``[n_layer, n_kv_head, N, head_dim]`` arrays of float16
(passed as ``uint16`` bits, see ``f16``) or float32, any strides; evidence is float32 ``[n_layer, n_kv_head, N]``.

- ``f16`` -- element loads/stores on f16 bits or float32; ``strided`` -- flat views of strided caches.
- ``similarity`` -- adjacent-key cosine, 1-D pooling; ``select`` -- top-k with protected cells.
- ``cluster`` -- KVMerger's merging sets; ``merge`` -- Gaussian merge weights and CaM's value merges (plans).
- ``apply`` -- apply a :class:`~kvmerge_local.plan.Plan` to a cache; ``cuda`` -- GPU twins;
  ``reference`` -- slow NumPy versions for the parity tests.

Nothing is imported here: each module compiles on first use.
"""
