"""Fast Walsh-Hadamard transform: x @ H_n on every n-chunk of a row, O(n log n).

H_n is llama.cpp's orthonormal Sylvester matrix (ggml_gen_hadamard): the
unnormalized butterflies below compute x @ (sqrt(n) * H_n) exactly in the order
of the Sylvester recursion, then one multiply by H_n[0, 0] scales it.
"""
from numba import njit, prange


@njit(cache=True, inline="always")
def fwht_chunk(v, scale):
    """In place: v <- (v @ sylvester(n)) * scale, n = v.size a power of two (float32)."""
    n = v.size
    h = 1
    while h < n:
        for start in range(0, n, 2 * h):
            for i in range(start, start + h):
                a = v[i]
                b = v[i + h]
                v[i] = a + b
                v[i + h] = a - b
        h *= 2
    for i in range(n):
        v[i] = v[i] * scale


@njit(parallel=True, cache=True)
def rotate_rows(x, out, scale):
    """x, out: (n_chunks, n) float32; out[c] = x[c] @ H_n with H_n[0, 0] == scale."""
    for c in prange(x.shape[0]):
        row = out[c]
        for i in range(x.shape[1]):
            row[i] = x[c, i]
        fwht_chunk(row, scale)
