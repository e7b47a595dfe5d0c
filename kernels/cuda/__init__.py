"""kvlab.kernels.cuda: the GPU twins of kvlab.kernels' quantizers (Numba CUDA), same bytes.

Importing this package needs no GPU; the first call of an entry point compiles the kernels
(cached on disk, ``cache=True``). Arrays are anything with ``__cuda_array_interface__`` (numba
device arrays, torch CUDA tensors, CuPy), C-contiguous, and are used in place (zero copy):

    quantize(x, out, type_name, flavor_code)
        quantized types: x (n_blocks, 32) float32, out (n_blocks, type_size) uint8
        f32/f16/bf16:    x (rows, cols) float32,   out (rows, cols * type_size) uint8
    dequantize(raw, out, type_name)                       the reverse shapes, out float32
    set_rows(cache, row_ids, values, type_name, flavor_code)
        cache (n_cache_rows, row_bytes) uint8; values (n, cols) float32; row_ids (n,) int32/int64:
        cache[row_ids[k]] <- quantize(values[k])          (ggml_set_rows, as llama.cpp writes K/V)
    rotate_quantize(x, out, type_name, flavor_code, n, scale, row_ids=None)
        quantize(x @ H_n per n-chunk of each row), x (rows, cols) float32, out (rows, row_bytes);
        with row_ids, out is a cache and rows land as in set_rows
    dequantize_unrotate(raw, out, type_name, n, scale)    out (rows, cols) = dequantize(raw) @ H_n
``flavor_code`` is kvlab.types.flavor_code(): 0 ref, 1 cpu, 2 cuda; ``scale`` is H_n[0, 0]
(kvlab.rotation.hadamard_scale(n)). numpy 2.5 dropped np.row_stack, which numba-cuda 0.30.4
still calls when it compiles: an alias is set here, before the first compile.
"""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

_THREADS = 256


def _scalar_grid(n):
    from .ops import SIM
    threads = 32 if SIM else _THREADS
    return (max(1, min(1024, (n + threads - 1) // threads)), threads)


def _k():
    from . import kernels        # numba.cuda loads here, not at `import kvlab`
    return kernels


def _dev(a, what, dtype, ndim):
    from numba import cuda
    if hasattr(a, "copy_to_host"):          # already a numba device array (or the simulator's)
        d = a
    elif hasattr(a, "__cuda_array_interface__"):
        d = cuda.as_cuda_array(a)
    else:
        raise TypeError(f"{what}: expected a CUDA array (__cuda_array_interface__), got {type(a).__name__}")
    if d.dtype != np.dtype(dtype) or d.ndim != ndim or not d.is_c_contiguous():
        raise ValueError(f"{what}: expected a C-contiguous {ndim}-D {np.dtype(dtype)} array, "
                         f"got {d.ndim}-D {d.dtype}{'' if d.is_c_contiguous() else ' (not contiguous)'}")
    return d


def _info(type_name):
    from kvlab.types import type_info
    return type_info(type_name)


def _rows_as_blocks(d, info, what):
    """(rows, cols) -> (rows * cols / 32, 32) view, or (rows, row_bytes) -> (blocks, type_size)."""
    if d.shape[1] % (32 if d.dtype == np.float32 else info.type_size):
        raise ValueError(f"{what}: the last dimension ({d.shape[1]}) must hold whole {info.name} blocks")
    per = 32 if d.dtype == np.float32 else info.type_size
    return d.reshape(d.shape[0] * d.shape[1] // per, per)       # (n_blocks, 32 | type_size)


def _scalar_view(d, info):
    # (rows, cols * type_size) uint8 -> (rows, cols) float32 / uint16 bits
    return d.view(np.float32 if info.name == "f32" else np.uint16)


def _no_rows():
    from numba import cuda
    return cuda.to_device(np.full(1, -1, np.int64))


def _launch_blocks(n_blocks):
    k = _k()
    return (max(1, (n_blocks + k.TPB - 1) // k.TPB), k.TPB)


def quantize(x, out, type_name, flavor_code):
    _write(x, out, type_name, flavor_code, None)


def set_rows(cache, row_ids, values, type_name, flavor_code):
    ids = _dev(row_ids, "row_ids", row_ids.dtype if hasattr(row_ids, "dtype") else np.int64, 1)
    if ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"row_ids: expected int32 or int64, got {ids.dtype}")
    _write(values, cache, type_name, flavor_code, ids)


def _write(x, out, type_name, flavor_code, row_ids):
    info = _info(type_name)
    k = _k()
    xd = _dev(x, "x", np.float32, 2)
    od = _dev(out, "out", np.uint8, 2)
    if row_ids is not None and row_ids.shape[0] != xd.shape[0]:
        raise ValueError(f"row_ids: {row_ids.shape[0]} ids for {xd.shape[0]} rows")
    if row_ids is None and od.shape[0] * od.shape[1] != xd.shape[0] * info.row_bytes(xd.shape[1]) // (
            1 if info.is_quantized else 1):
        raise ValueError(f"out: {tuple(od.shape)} bytes do not fit {type_name} of x {tuple(xd.shape)}")
    if not info.is_quantized:
        ids = row_ids if row_ids is not None else _no_rows()
        k.scalar_quantize_kernel[_scalar_grid(xd.size)](k.SCALAR_CODES[type_name], xd, _scalar_view(od, info),
                                                flavor_code, ids)
        return
    xb = _rows_as_blocks(xd, info, "x")
    yb = _rows_as_blocks(od, info, "out")
    ids, bpr = (_no_rows(), 0) if row_ids is None else (row_ids, xd.shape[1] // 32)
    k.quantize_kernel[_launch_blocks(xb.shape[0])](k.QUANT_CODES[type_name], xb, yb, flavor_code, ids, bpr)


def dequantize(raw, out, type_name):
    info = _info(type_name)
    k = _k()
    rd = _dev(raw, "raw", np.uint8, 2)
    od = _dev(out, "out", np.float32, 2)
    if not info.is_quantized:
        k.scalar_dequantize_kernel[_scalar_grid(od.size)](k.SCALAR_CODES[type_name], _scalar_view(rd, info), od)
        return
    yb = _rows_as_blocks(rd, info, "raw")
    k.dequantize_kernel[_launch_blocks(yb.shape[0])](k.QUANT_CODES[type_name], yb, _rows_as_blocks(od, info, "out"))


def _check_rotation(cols, n, type_name):
    info = _info(type_name)
    if not info.is_quantized:
        raise ValueError(f"fused rotation kernels take a quantized type, got {type_name}")
    if n not in (32, 64, 128, 256, 512, 1024, 2048, 4096) or cols % n:
        raise ValueError(f"rotation size {n}: expected a power of two from 32 to 4096 dividing {cols}")
    return info


def rotate_quantize(x, out, type_name, flavor_code, n, scale, row_ids=None):
    xd = _dev(x, "x", np.float32, 2)
    info = _check_rotation(xd.shape[1], n, type_name)
    k = _k()
    xb = _rows_as_blocks(xd, info, "x")
    yb = _rows_as_blocks(_dev(out, "out", np.uint8, 2), info, "out")
    ids, bpr = (_no_rows(), 0) if row_ids is None else (_dev(row_ids, "row_ids", row_ids.dtype, 1), xd.shape[1] // 32)
    k.rotate_quantize_kernel[_launch_blocks(xb.shape[0])](k.QUANT_CODES[type_name], xb, yb, flavor_code, n,
                                                          np.float32(scale), ids, bpr)


def dequantize_unrotate(raw, out, type_name, n, scale):
    od = _dev(out, "out", np.float32, 2)
    info = _check_rotation(od.shape[1], n, type_name)
    k = _k()
    yb = _rows_as_blocks(_dev(raw, "raw", np.uint8, 2), info, "raw")
    k.dequantize_unrotate_kernel[_launch_blocks(yb.shape[0])](k.QUANT_CODES[type_name], yb,
                                                              _rows_as_blocks(od, info, "out"), n, np.float32(scale))
