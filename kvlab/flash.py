"""flash_decode: one query row per head attending over a K/V cache held only as ggml bytes.

The decode step of llama.cpp's flash_attn_ext, reading the cache rows directly (no float copy of the
cache is ever made): CPU (Numba, kvlab.kernels.flash_decode: ggml-cpu's numerics) or CUDA (Numba CUDA,
kvlab.kernels.cuda.flash_decode: ggml-cuda's vector kernel numerics), chosen by where the bytes live.

    out = flash_decode(q, k_raw, v_raw, "q4_0", "q4_0", rotation=plan)

q: (B, H, Dk) float (the model's dtype is converted to float32 first); k_raw: (B, Hkv, L, Dk row bytes),
v_raw: (B, Hkv, L, Dv row bytes) uint8, one ggml row per (sequence, KV head, token) -- a llama.cpp cache
row holds all KV heads of a token, and ggml's blocks never straddle heads, so these are its bytes cut per
head. H a multiple of Hkv (query head h reads KV head h // (H / Hkv), ggml's broadcast). mask: None or
(B, L) bool (True = attend). Rotation as llama.cpp's build_attn: Q rotated with H_k before the kernel,
the output rotated back with H_v after. Returns (B, H, Dv) float32, where q lives.
"""
import numba
import numpy as np

from kvlab._threads import kernel_lock
from kvlab._xp import is_cuda, is_torch
from kvlab.quant import dequantize, quantize
from kvlab.rotation import rotate
from kvlab.types import type_info

# ggml_get_type_traits_cpu(t)->vec_dot_type: the type ggml-cpu converts Q to before K.Q (an f32 K cache is
# cast to f16 by llama.cpp's build_attn_mha first)
CPU_VEC_DOT_TYPE = {"f32": "f16", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q8_0",
                    "q5_0": "q8_0", "iq4_nl": "q8_0", "q4_1": "q8_1", "q5_1": "q8_1"}


def head_dim(raw, type_name: str, what: str) -> int:
    """Values per row of a (..., row_bytes) uint8 cache of type_name."""
    info = type_info(type_name)
    row_bytes = int(raw.shape[-1])
    if row_bytes % info.type_size:
        raise ValueError(f"{what}: rows of {row_bytes} bytes are not whole {info.name} blocks "
                         f"({info.type_size} bytes each)")
    return row_bytes // info.type_size * info.block_size


def check_inputs(q, k_raw, v_raw, type_k: str, type_v: str, mask):
    """Shapes and dtypes, before any kernel runs (kernels have no bounds checks)."""
    for what, raw in (("k_raw", k_raw), ("v_raw", v_raw)):
        if len(raw.shape) != 4 or str(raw.dtype).split(".")[-1] != "uint8":
            raise ValueError(f"flash_decode: {what} must be uint8 (B, Hkv, L, row_bytes), "
                             f"got {raw.dtype} of shape {tuple(raw.shape)}")
    if len(q.shape) != 3:
        raise ValueError(f"flash_decode: q must be (B, H, head_dim), got shape {tuple(q.shape)}")
    dk, dv = head_dim(k_raw, type_k, "k_raw"), head_dim(v_raw, type_v, "v_raw")
    b, h, d = (int(s) for s in q.shape)
    if tuple(k_raw.shape[:3]) != tuple(v_raw.shape[:3]) or int(k_raw.shape[0]) != b:
        raise ValueError(f"flash_decode: k_raw {tuple(k_raw.shape)} and v_raw {tuple(v_raw.shape)} must share "
                         f"(B, Hkv, L) with B = q's {b}")
    if d != dk:
        raise ValueError(f"flash_decode: q head_dim {d} differs from K's {dk}")
    if h % int(k_raw.shape[1]):
        raise ValueError(f"flash_decode: n_head {h} is not a multiple of n_head_kv {int(k_raw.shape[1])}")
    if mask is not None and tuple(mask.shape) != (b, int(k_raw.shape[2])):
        raise ValueError(f"flash_decode: mask must be (B, L) = {(b, int(k_raw.shape[2]))}, got {tuple(mask.shape)}")
    return dk, dv


def cpu_query(q: np.ndarray, type_k: str):
    """Q (R, D) float32 in K's vec_dot_type, as ggml-cpu's q_to_vec_dot (from_float) writes it.

    Returns (qq int8 (R, D), qd (R, D/32), qs (R, D/32), qf (R, D)): q8_0/q8_1 quants, scales and
    q8_1's block sums (both as ggml's fp16, widened), or the f32/f16/bf16 values (others empty).
    """
    kind = CPU_VEC_DOT_TYPE[type_k]
    r, d = q.shape
    if kind in ("f16", "bf16"):
        qf = dequantize(quantize(q, kind, "cpu"))
        return np.zeros((r, 0), np.int8), np.zeros((r, 0), np.float32), np.zeros((r, 0), np.float32), qf
    # ggml-cpu's x86 quantize_row_q8_0 and q8_1 write the same d and qs: kvlab's q8_0 "cpu" flavor
    blocks = quantize(q, "q8_0", "cpu").raw.reshape(r, d // 32, 34)          # (R, D/32, block bytes)
    qd = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)   # (R, D/32)
    qq = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(r, d)     # (R, D)
    qs = np.zeros((r, 0), np.float32)
    if kind == "q8_1":
        # y.s = fp16(d * sum(q)) with d = amax / 127 in float32 (before its fp16 rounding)
        amax = np.abs(q.reshape(r, d // 32, 32)).max(axis=-1)                  # (R, D/32)
        sums = qq.reshape(r, d // 32, 32).astype(np.int32).sum(axis=-1).astype(np.float32)
        qs = ((amax / np.float32(127)) * sums).astype(np.float16).astype(np.float32)
    return qq, qd, qs, np.zeros((r, 0), np.float32)


def flash_decode(q, k_raw, v_raw, type_k: str, type_v: str, mask=None, scale: float | None = None,
                 rotation=None):
    """See the module docstring. scale: the softmax scale (default 1/sqrt(head_dim)); rotation: a
    kvlab.RotationPlan (or None): its k rotates Q, its v un-rotates the output."""
    type_k, type_v = type_info(type_k).name, type_info(type_v).name
    dk, _ = check_inputs(q, k_raw, v_raw, type_k, type_v, mask)
    scale = np.float32(1) / np.sqrt(np.float32(dk)) if scale is None else np.float32(scale)   # 1.0f/sqrtf(D)
    rot_k, rot_v = (rotation.k, rotation.v) if rotation is not None else (None, None)
    if is_cuda(q) or is_cuda(k_raw):
        from kvlab.kernels.cuda import flash_decode as gpu
        q32 = q.float() if is_torch(q) else q
        out = gpu.flash_decode(rotate(q32, rot_k) if rot_k else q32, k_raw, v_raw, type_info(type_k).ggml_type,
                               type_info(type_v).ggml_type, mask, scale)
        return rotate(out, rot_v) if rot_v else out
    out = _cpu(q, k_raw, v_raw, type_k, type_v, mask, scale, rot_k)
    out = rotate(out, rot_v) if rot_v else out
    if is_torch(q):
        import torch
        return torch.from_numpy(out)
    return out


def _cpu(q, k_raw, v_raw, type_k, type_v, mask, scale, rot_k):
    from kvlab.kernels.flash_decode import flash_decode as kernel
    q32 = (q.detach().float().numpy() if is_torch(q) else np.asarray(q, np.float32))
    q32 = np.ascontiguousarray(rotate(q32, rot_k) if rot_k else q32)
    b, h, dk = q32.shape
    k = k_raw.numpy() if is_torch(k_raw) else k_raw
    v = v_raw.numpy() if is_torch(v_raw) else v_raw
    if mask is None:
        add = np.zeros((b, 0), np.float32)
    else:
        keep = mask.numpy() if is_torch(mask) else np.asarray(mask)
        add = np.where(keep, np.float32(0), np.float32(-np.inf)).astype(np.float32)   # (B, L)
    qq, qd, qs, qf = cpu_query(q32.reshape(b * h, dk), type_k)
    dv = head_dim(v, type_v, "v_raw")
    out = np.empty((b, h, dv), np.float32)
    with kernel_lock():
        kernel(qq, qd, qs, qf, k, v, type_info(type_k).ggml_type, type_info(type_v).ggml_type, dk, add, scale, out,
               numba.get_num_threads())
    return out
