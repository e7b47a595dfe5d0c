"""Numba kernels, shipped as ``kvlab.kernels``.

One module per ggml type (``q4_0.py`` holds q4_0's block layout, its quantize and
its dequantize, as ``ggml-quants.c`` keeps ``block_q4_0`` beside
``quantize_row_q4_0_ref``), the scalar helpers they share (``fp.py``: float bits and
half/bfloat16 conversions; ``scalar.py``: C casts, CUDA fast-math emulation, block
searches), the fast Walsh-Hadamard transform (``hadamard.py``), and their GPU twins
(``cuda/``); ``numba_cache.py`` keys numba's disk cache of them by every kernel source.
``kvlab.types.TYPES`` ties each type to its kernels, as ggml's type_traits do.

The flavor enum below is the one every kernel, CPU and GPU, takes: the index of the ggml
code path whose bytes it writes.
"""
FLAVORS = ("ref", "cpu", "cuda")   # quantize_row_*_ref, ggml-cpu's from_float on x86-64, ggml-cuda's set_rows
REF, CPU, CUDA = range(len(FLAVORS))
QK = 32                            # values in a block of every quantized type (ggml's QK8_0 .. QK4_NL)

from numba.core import caching as _caching  # noqa: E402  (after the constants the kernel modules import)

from .numba_cache import register  # noqa: E402

register(_caching)                   # the disk cache keyed by every kernel source, not a kernel's own file
