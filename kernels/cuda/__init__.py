"""kvlab.kernels.cuda: the GPU twins of kvlab.kernels' quantizers (Numba CUDA), same bytes.

Importing this package needs no GPU; the first call of an entry point compiles the kernels
(cached on disk, ``cache=True``). Arrays are anything with ``__cuda_array_interface__`` (numba
device arrays, torch CUDA tensors, CuPy), C-contiguous, and are used in place (zero copy):

    quantize(x, out, info, flavor_code)           x (rows, cols) float32 -> out (rows, row_bytes) uint8
    dequantize(raw, out, info)                    raw (rows, row_bytes) uint8 -> out (rows, cols) float32
    set_rows(cache, row_ids, values, info, flavor_code)
        cache (n_cache_rows, row_bytes) uint8; values (n, cols) float32; row_ids (n,) int32/int64:
        cache[row_ids[k]] <- quantize(values[k])          (ggml_set_rows, as llama.cpp writes K/V)
    rotate_quantize(x, out, info, flavor_code, n, scale, row_ids=None)
        quantize(x @ H_n per n-chunk of each row) without writing the rotated floats anywhere;
        with row_ids, out is a cache and rows land as in set_rows
    dequantize_unrotate(raw, out, info, n, scale) out = dequantize(raw) @ H_n per n-chunk
    rotate(x, out, n, scale)                      out = x @ H_n per n-chunk, x and out (rows, cols) float32
info is the type's kvlab.types.TypeInfo (kvlab.TYPES[name]: the kernels sit below the type table, as
ggml-cuda below ggml's type_traits), row_bytes = info.row_bytes(cols) (ggml_row_size); n is a power of
two dividing cols, at most 4096 (32 .. 4096 for the fused kernels). 16-byte aligned arrays take the fast
paths (torch's and numba's allocations are); others are handled, slower.
``flavor_code`` is kvlab.types.flavor_code(): 0 ref, 1 cpu, 2 cuda; ``scale`` is H_n[0, 0]
(kvlab.rotation.hadamard_scale(n)).
"""
import numpy as np


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
    if (dtype is not None and d.dtype != np.dtype(dtype)) or d.ndim != ndim or not d.is_c_contiguous():
        raise ValueError(f"{what}: expected a C-contiguous {ndim}-D {np.dtype(dtype or d.dtype)} array, "
                         f"got {d.ndim}-D {d.dtype}{'' if d.is_c_contiguous() else ' (not contiguous)'}")
    return d


def _check_info(info):
    # the kernels sit below kvlab.types: the caller looks its TypeInfo up (kvlab.TYPES[name])
    if not hasattr(info, "gpu_codec"):
        raise TypeError(f"expected a kvlab.types.TypeInfo (kvlab.TYPES[name]), got {type(info).__name__}")


def _flat(d):
    return d.reshape(d.size)                 # (rows * cols,)


def _aligned(d, width):
    """The array's first byte sits on a multiple of width (the simulator's numpy arrays: always)."""
    iface = getattr(d, "__cuda_array_interface__", None)
    return iface is None or iface["data"][0] % width == 0


def _check_value_alignment(d, info, what):
    if not _aligned(d, info.type_size):
        raise ValueError(f"{what}: {info.name} values must start on a {info.type_size}-byte boundary")


_NO_ROWS = []


def _no_rows():
    """A 1-element device array standing for 'no row_ids' (made once: a copy per call costs ~0.1 ms)."""
    if not _NO_ROWS:
        from numba import cuda
        _NO_ROWS.append(cuda.to_device(np.zeros(1, np.int64)))
    return _NO_ROWS[0]


def _row_ids(row_ids, n_rows, n_cache_rows):
    ids = _dev(row_ids, "row_ids", None, 1)
    if ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"row_ids: expected int32 or int64, got {ids.dtype}")
    if ids.shape[0] != n_rows:
        raise ValueError(f"row_ids: {ids.shape[0]} ids for {n_rows} rows")
    host = ids.copy_to_host()   # the kernels store through the ids unchecked: check them here
    if host.size and (host.min() < 0 or host.max() >= n_cache_rows):
        raise ValueError(f"row_ids: ids must lie in [0, {n_cache_rows}) (the cache's rows), "
                         f"got [{host.min()}, {host.max()}]")
    return ids


def _tiles(n_values):
    k = _k()
    return (max(1, -(-n_values // (k.TPB * 32))), k.TPB)


def _steps(n_steps):
    k = _k()
    return (max(1, min(1 << 16, -(-n_steps // k.VALUE_TPB))), k.VALUE_TPB)


def _value_bits(d, info):
    return d.view(np.uint32 if info.type_size == 4 else np.uint16)      # (rows, cols) value bits


def quantize(x, out, info, flavor_code):
    _write(x, out, info, flavor_code, None, 0, np.float32(0))


def set_rows(cache, row_ids, values, info, flavor_code):
    _write(values, cache, info, flavor_code, row_ids, 0, np.float32(0))


def rotate_quantize(x, out, info, flavor_code, n, scale, row_ids=None):
    xd = _dev(x, "x", np.float32, 2)
    _check_rotation(xd.shape[1], n, info)
    _write(xd, out, info, flavor_code, row_ids, n, scale)


def _write(x, out, info, flavor_code, row_ids, n, scale):
    """quantize / set_rows / rotate_quantize: x (rows, cols) float32 -> rows of out (or of row_ids)."""
    _check_info(info)
    if flavor_code not in (0, 1, 2) or isinstance(flavor_code, bool):
        raise ValueError(f"flavor_code: expected 0 (ref), 1 (cpu) or 2 (cuda), got {flavor_code!r}")
    k = _k()
    xd = _dev(x, "x", np.float32, 2)
    od = _dev(out, "out", np.uint8, 2)
    rows, cols = xd.shape
    if cols % info.block_size:
        raise ValueError(f"x: the last dimension ({cols}) must hold whole {info.name} blocks")
    row_bytes = info.row_bytes(cols)
    if od.shape[1] != row_bytes or (row_ids is None and od.shape[0] != rows):
        raise ValueError(f"out: {tuple(od.shape)} does not fit {info.name} rows of x {tuple(xd.shape)}"
                         f" ({row_bytes} bytes per row)")
    ids = _no_rows() if row_ids is None else _row_ids(row_ids, rows, od.shape[0])
    if xd.size == 0:
        return
    remap = 0 if row_ids is None else row_bytes
    if not info.is_quantized:
        _check_value_alignment(od, info, "out")
        if cols % 4 == 0 and _aligned(xd, 16) and _aligned(od, 16):
            k.value_kernels(info).quantize[_steps(xd.size // 4)](
                _flat(xd), _flat(od), flavor_code, xd.size // 4, cols, ids, row_ids is not None)
        else:
            k.value_kernels(info).quantize_any[_steps(xd.size)](xd, _value_bits(od, info), flavor_code,
                                                                ids, row_ids is not None)
        return
    width = 16 if remap == 0 and _aligned(od, 16) else 4 if remap % 4 == 0 and _aligned(od, 4) else 1
    k.quantize_kernel(info, int(flavor_code))[_tiles(xd.size)](_flat(xd), _flat(od), xd.size // 32,
                                                               _aligned(xd, 16), width, ids, remap, n,
                                                               np.float32(scale))


def dequantize(raw, out, info):
    _read(raw, out, info, 0, np.float32(0))


def dequantize_unrotate(raw, out, info, n, scale):
    od = _dev(out, "out", np.float32, 2)
    _check_rotation(od.shape[1], n, info)
    _read(raw, od, info, n, scale)


def _read(raw, out, info, n, scale):
    _check_info(info)
    k = _k()
    rd = _dev(raw, "raw", np.uint8, 2)
    od = _dev(out, "out", np.float32, 2)
    rows, cols = od.shape
    if cols % info.block_size or rd.shape != (rows, info.row_bytes(cols)):
        raise ValueError(f"raw: {tuple(rd.shape)} does not hold {info.name} rows of out {tuple(od.shape)}")
    if od.size == 0:
        return
    if not info.is_quantized:
        _check_value_alignment(rd, info, "raw")
        if cols % 4 == 0 and _aligned(rd, 16) and _aligned(od, 16):
            k.value_kernels(info).dequantize[_steps(od.size // 4)](_flat(rd), _flat(od), od.size // 4)
        else:
            k.value_kernels(info).dequantize_any[_steps(od.size)](_value_bits(rd, info), od)
        return
    k.dequantize_kernel(info)[_tiles(od.size)](_flat(rd), _flat(od), od.size // 32, _aligned(rd, 16),
                                               _aligned(od, 16), n, np.float32(scale))


def _check_rotation(cols, n, info):
    _check_info(info)
    if not info.is_quantized:
        raise ValueError(f"fused rotation kernels take a quantized type, got {info.name}")
    _check_size(cols, n, 32)


def _check_size(cols, n, smallest):
    largest = _k().TPB * 32
    if not isinstance(n, (int, np.integer)) or n < smallest or n > largest or n & (n - 1) or cols % n:
        raise ValueError(f"rotation size {n}: expected a power of two from {smallest} to {largest} "
                         f"dividing the row length {cols}")


def rotate(x, out, n, scale):
    """out = x @ H_n on every n-chunk of each row (H_n[0, 0] == scale); x, out (rows, cols) float32."""
    xd = _dev(x, "x", np.float32, 2)
    od = _dev(out, "out", np.float32, 2)
    if od.shape != xd.shape:
        raise ValueError(f"out: shape {tuple(od.shape)} differs from x's {tuple(xd.shape)}")
    _check_size(xd.shape[1], n, 1)
    if xd.size:
        _k().rotate_kernel[_tiles(xd.size)](_flat(xd), _flat(od), xd.size, _aligned(xd, 16) and _aligned(od, 16),
                                            n, np.float32(scale))
