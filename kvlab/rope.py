"""RoPE as ggml_rope_ext computes it (ggml-cpu/ops.cpp rope_f32, no YaRN scaling: freq_scale 1, ext_factor 0).

Value pair i of the first n_rot values of a head turns by theta = pos * base**(-2i/n_rot):
- mode "normal" (0; Llama in ggml): the pair is (2i, 2i+1);
- mode "neox" (2, GGML_ROPE_TYPE_NEOX; Qwen, and Llama in Hugging Face's rotate-half form): (i, i + n_rot/2).
Values past n_rot pass through. The angles are float64 from numpy (the same on every device and rank) and
the rotation runs in float64; the result comes back in x's dtype, so one call gives the same bits wherever
x lives (numpy, or torch on any device): kvlab.split.sharded, kvlab.tp and kvlab.accuracy all call it.
"""
import numpy as np

from kvlab import _xp

MODES = ("normal", "neox")


def rope(x, positions, base: float, mode: str = "normal", n_rot: int | None = None):
    """x (..., D) numpy or torch; positions: numpy ints or floats broadcasting against x[..., 0] (one per
    token: (T,) for x (H, T, D), (T, 1) for x (1, T, H, D), a scalar for one token)."""
    if mode not in MODES:
        raise ValueError(f"unknown rope mode {mode!r}: expected one of {', '.join(MODES)}")
    n_rot = n_rot or x.shape[-1]
    if n_rot % 2 or n_rot > x.shape[-1]:
        raise ValueError(f"n_rot must be even and at most the head size {x.shape[-1]}, got {n_rot}")
    theta = np.asarray(positions, np.float64)[..., None] * base ** (-np.arange(0, n_rot, 2) / n_rot)  # (..., n_rot/2)
    x64 = _xp.cast(x, "float64")
    cos, sin = _xp.copy_like(np.cos(theta), x64), _xp.copy_like(np.sin(theta), x64)
    xp = _xp.namespace(x)
    if mode == "normal":
        a, b = x64[..., 0:n_rot:2], x64[..., 1:n_rot:2]
        turned = xp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)  # (..., n_rot/2, 2)
        turned = turned.reshape(*turned.shape[:-2], n_rot)                  # interleaved back: (..., n_rot)
    else:
        a, b = x64[..., :n_rot // 2], x64[..., n_rot // 2:n_rot]
        turned = xp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)  # (..., n_rot)
    if n_rot < x.shape[-1]:
        turned = xp.concatenate([turned, x64[..., n_rot:]], axis=-1)
    return _xp.cast(turned, str(x.dtype).removeprefix("torch."))
