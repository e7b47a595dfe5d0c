"""llama.cpp's Hadamard rotation of Q/K/V (PR #21038): the matrix, the transform and the gate.

Q and K are rotated with the K matrix, V with the V matrix before it is stored,
and the attention output is rotated back with the V matrix (H @ H = I), so the
rotation changes only what the quantizer sees (src/llama-graph.cpp, build_attn).
"""
from dataclasses import dataclass
import os

import numpy as np

from kvlab._threads import kernel_lock
from kvlab._xp import cuda_empty, cuda_rows, is_cuda, to_numpy, wrap_like
from kvlab.types import type_info


def _check_size(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1 or (int(n) & (int(n) - 1)):
        raise ValueError(f"rotation size must be a power of two (64, 128, 256, ...), got {n!r}")
    return int(n)


def hadamard_scale(n: int) -> np.float32:
    """H_n[0, 0] as ggml_gen_hadamard computes it: `1.0 / sqrtf(n)` in double, stored as float."""
    return np.float32(1.0 / np.float64(np.sqrt(np.float32(n))))


def hadamard(n: int) -> np.ndarray:
    """(n, n) float32, byte-identical to llama.cpp's ggml_gen_hadamard (symmetric, H @ H = I)."""
    n = _check_size(n)
    h = np.array([[hadamard_scale(n)]], dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])  # Sylvester: the same sign pattern the C loop writes
    return h


def rotate(x, n: int):
    """x @ H_n applied to each n-chunk of the last dimension (fast Walsh-Hadamard, float32).

    Equal to ``x @ hadamard(n)`` (chunkwise) up to float32 rounding: per chunk the relative L2
    error is at most (log2(n) + 1) * 2**-24 (one rounding per butterfly stage and the final scale).
    x: float32 numpy array or torch tensor, last dim a multiple of n. Same kind and shape out.
    """
    n = _check_size(n)
    shape = tuple(x.shape)
    if not shape or shape[-1] % n:
        raise ValueError(f"rotate: the last dimension ({shape[-1] if shape else None}) must be a multiple "
                         f"of the rotation size {n}")
    if is_cuda(x):
        from kvlab.kernels import cuda as gpu
        out = cuda_empty(shape, np.float32, x)
        if out.size:
            gpu.rotate(cuda_rows(x, np.float32, "rotate(x)"), cuda_rows(out, np.float32, "out"),  # (rows, cols)
                       n, hadamard_scale(n))
        return out
    from kvlab.kernels.hadamard import rotate_rows
    xs = to_numpy(x, np.float32, "rotate(x)")
    out = np.empty(shape, dtype=np.float32)
    if xs.size:
        with kernel_lock():
            rotate_rows(xs.reshape(-1, n), out.reshape(-1, n), hadamard_scale(n))  # (n_chunks, n)
    return wrap_like(out, x)


@dataclass(frozen=True)
class RotationPlan:
    """Which rotations llama.cpp applies for a cache (None = not rotated)."""
    k: int | None   # size of the K matrix (also applied to Q)
    v: int | None   # size of the V matrix (also un-rotates the attention output)

    @property
    def any(self) -> bool:
        return self.k is not None or self.v is not None


def _env_disabled() -> bool:
    # atoi semantics: "0", "", "abc" -> off; "1", "2" -> on
    value = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "").strip()
    digits = ""
    for ch in value.lstrip("+-"):
        if not ch.isdigit():
            break
        digits += ch
    return bool(digits) and int(digits) != 0


def rotation_plan(type_k: str, type_v: str, head_dim_k: int, head_dim_v: int | None = None,
                  disable: bool | None = None) -> RotationPlan:
    """The gate and sizes of llama_kv_cache (src/llama-kv-cache.cpp, attn_rot_k/attn_rot_v).

    K is rotated when its type is quantized and head_dim_k % 64 == 0, with the largest power of two
    >= 64 dividing head_dim_k; V likewise with a fixed 64 ("smaller rotation matrices for V seem
    beneficial"). `disable=None` reads LLAMA_ATTN_ROT_DISABLE as llama.cpp does (atoi != 0).
    """
    head_dim_v = head_dim_k if head_dim_v is None else head_dim_v
    for name, hd in (("head_dim_k", head_dim_k), ("head_dim_v", head_dim_v)):
        if not isinstance(hd, (int, np.integer)) or hd < 1:
            raise ValueError(f"rotation_plan: {name} must be a positive integer, got {hd!r}")
    if disable is None:
        disable = _env_disabled()
    k = v = None
    if not disable and type_info(type_k).is_quantized and head_dim_k % 64 == 0:
        k = 64
        while head_dim_k % (2 * k) == 0:
            k *= 2
    if not disable and type_info(type_v).is_quantized and head_dim_v % 64 == 0:
        v = 64
    return RotationPlan(k, v)
