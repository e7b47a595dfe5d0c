"""Numba kernels, shipped as ``kvlab.kernels``.

One module per ggml type (``q4_0.py`` holds q4_0's block layout, its quantize and
its dequantize, as ``ggml-quants.c`` keeps ``block_q4_0`` beside
``quantize_row_q4_0_ref``), plus shared float helpers (``fp.py``) and the fast
Walsh-Hadamard transform (``hadamard.py``).
"""
