"""quantize / dequantize / set_rows: the public entry points, dispatching to one kernel pair per type.

The bytes in ``QTensor.raw`` are exactly ggml's: a row of n values is
``n // block_size`` block structs laid end to end (ggml_row_size), so a raw
array can be written into a GGUF file or a llama.cpp state file as is.
"""
from dataclasses import dataclass

import numpy as np

from kvlab._threads import kernel_lock
from kvlab._xp import (cuda_empty, cuda_layout, cuda_rows, is_cuda, is_torch, out_buffer, size_of, to_numpy,
                       wrap_like)
from kvlab.kernels.scalar import rcp_approx_table
from kvlab.types import TYPES, flavor_code, type_info


@dataclass(frozen=True)
class QTensor:
    """A tensor stored in a ggml type: `raw` holds ggml's bytes, one row per leading index.

    Frozen and checked on construction: raw is uint8 of shape (*shape[:-1], row_bytes) for `type`, so
    the kernels, which have no bounds checks, never read or write past it. The entry points check raw
    again (an array can be resized in place).
    """
    raw: object          # uint8, (*shape[:-1], row_bytes); numpy array or torch tensor (CPU or CUDA)
    type: str
    shape: tuple         # the logical float shape, ints
    flavor: str = "ref"  # which ggml code path wrote the bytes

    def __post_init__(self):
        info = type_info(self.type)
        flavor_code(self.flavor)
        shape = int_shape(self.shape, "QTensor")
        _check_row_len(shape, info)
        object.__setattr__(self, "type", info.name)   # frozen: the canonical name, ints for the shape
        object.__setattr__(self, "shape", shape)
        check_raw(self.raw, info, shape, "QTensor")

    @classmethod
    def from_raw(cls, raw, type: str, shape, flavor: str = "ref") -> "QTensor":
        """Wrap bytes written by ggml (e.g. read from a GGUF tensor or a llama.cpp state file)."""
        return cls(raw, type, shape, flavor)

    @property
    def info(self):
        return TYPES[self.type]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.info.row_bytes(self.shape[-1])

    @property
    def is_cuda(self) -> bool:
        return is_cuda(self.raw)

    def dequantize(self):
        return dequantize(self)

    def __repr__(self):
        where = "cuda" if self.is_cuda else "cpu"
        return f"QTensor(type={self.type}, shape={self.shape}, flavor={self.flavor}, {self.nbytes} bytes, {where})"


def int_shape(shape, what: str) -> tuple:
    """shape as a tuple of non-negative Python ints: a float (even 64.0) or a bool is refused, not truncated."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{what}: shape must be a sequence of integers, got {shape!r}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"{what}: shape must hold integers, got {shape!r}")
        if d < 0:
            raise ValueError(f"{what}: shape must not be negative, got {shape!r}")
    return tuple(int(d) for d in dims)


def _dtype_and_shape(raw, what: str):
    """(dtype name, shape) of the real buffer: numpy array, torch tensor or CUDA array."""
    if isinstance(raw, np.ma.MaskedArray):
        raise TypeError(f"{what}: raw is a masked array; ggml bytes have no mask")
    if is_torch(raw):
        return str(raw.dtype).removeprefix("torch."), tuple(raw.shape)
    if isinstance(raw, np.ndarray) or hasattr(raw, "copy_to_host"):   # numpy, numba device arrays
        return np.dtype(raw.dtype).name, tuple(raw.shape)
    if hasattr(raw, "__cuda_array_interface__"):
        iface = raw.__cuda_array_interface__
        return np.dtype(iface["typestr"]).name, tuple(iface["shape"])
    raise TypeError(f"{what}: raw must be a uint8 numpy array or torch tensor, got {type(raw).__name__}")


def check_raw(raw, info, shape: tuple, what: str) -> None:
    """raw really holds the bytes of `shape` values of type `info`: uint8, (*shape[:-1], row_bytes)."""
    dtype, got = _dtype_and_shape(raw, what)
    if dtype != "uint8":
        raise TypeError(f"{what}: raw must be uint8 (ggml's bytes), got {dtype}")
    expected = shape[:-1] + (info.row_bytes(shape[-1]),)
    if got != expected:
        raise ValueError(f"{what}: raw has shape {got}, but {info.name} values of shape {shape} "
                         f"need {expected} ({info.type_size} bytes per {info.block_size} values)")


def check_head_dim(head_dim: int, type_names, what: str) -> None:
    """Each head's row holds whole blocks of every type: a block straddling two heads is a layout llama.cpp
    refuses (its per-head views of the cache assert ggml_row_size's `ne % block_size == 0`)."""
    if isinstance(head_dim, (bool, np.bool_)) or not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
        raise ValueError(f"{what}: head_dim must be a positive integer, got {head_dim!r}")
    for name in type_names:
        info = type_info(name)
        if head_dim % info.block_size:
            raise ValueError(f"{what}: head_dim {head_dim} is not a multiple of {info.name}'s block size "
                             f"{info.block_size} (a block would straddle two heads; llama.cpp refuses this)")


def _check_row_len(shape, info) -> None:
    if len(shape) == 0:
        raise ValueError("expected at least one dimension (the row of values to quantize)")
    if shape[-1] % info.block_size:
        raise ValueError(f"{info.name}: the last dimension ({shape[-1]}) must be a multiple of the block "
                         f"size {info.block_size}")


def _kernel_views(info, values: np.ndarray, data: np.ndarray):
    """The 2-D views a kernel pair takes: whole blocks for block types; whole rows for f32/f16/bf16,
    because ggml-cpu converts a row's body with F16C and its tail in software (NaN payloads differ)."""
    if info.is_quantized:
        return (values.reshape(-1, info.block_size),      # (n_blocks, block_size)
                data.reshape(-1, info.type_size))         # (n_blocks, type_size)
    return (values.reshape(-1, values.shape[-1]),         # (n_rows, row_len)
            data.reshape(-1, data.shape[-1]))             # (n_rows, row_bytes)


def _as_float32(x):
    """float16 / bfloat16 / float64 numpy arrays and torch tensors as float32, others as they are.

    ggml's set_rows takes f32 and f16 sources and converts f16 to f32 first: exact, as it is for bf16.
    float64 (which ggml never sees) is rounded to nearest float32 once, before any quantization.
    """
    if is_torch(x):
        return x.float() if x.dtype.is_floating_point else x   # no copy when already float32
    if isinstance(x, np.ndarray) and (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):  # ml_dtypes' bf16: kind V
        return x.astype(np.float32, copy=False)
    return x


def quantize(x, type: str, flavor: str = "ref", out=None) -> QTensor:
    """Quantize x along its last dimension into ggml type `type`, as the `flavor` code path does.

    x: numpy array or torch tensor (CPU, or CUDA for the GPU kernels), last dim a multiple of the type's
    block size; float32, or float16 / bfloat16 / float64, which are converted to float32 first (as ggml's
    set_rows converts an f16 source). `type` in any case (`Q8_0` is q8_0). Returns a QTensor whose raw
    bytes live where x lives.
    out: the caller's buffer for the bytes (uint8, (*x.shape[:-1], row_bytes), C-contiguous, where x lives,
    not overlapping it), written in place and held by the result as its raw: no allocation per call.
    """
    info = type_info(type)
    type = info.name
    code = flavor_code(flavor)
    if not (isinstance(x, np.ndarray) or is_torch(x) or is_cuda(x)):
        raise TypeError(f"quantize: expected a float32 numpy array or torch tensor, got {x.__class__.__name__}")
    x = _as_float32(x)
    shape = tuple(int(s) for s in x.shape)
    _check_row_len(shape, info)
    raw_shape = shape[:-1] + (info.row_bytes(shape[-1]),)
    if is_cuda(x):
        from kvlab.kernels import cuda as gpu
        rows = cuda_rows(x, np.float32, f"quantize(x, {type!r})")                  # (n_rows, row_len)
        raw = cuda_empty(raw_shape, np.uint8, x) if out is None else out_buffer(out, np.uint8, raw_shape, rows,
                                                                                 "quantize(out=)")
        if size_of(raw):
            gpu.quantize(rows, cuda_rows(raw, np.uint8, "raw"), info, code)         # (n_rows, row_bytes)
        return QTensor(raw, type, shape, flavor)
    xs = to_numpy(x, np.float32, f"quantize(x, {type!r})")
    raw = np.empty(raw_shape, dtype=np.uint8) if out is None else out_buffer(out, np.uint8, raw_shape, xs,
                                                                             "quantize(out=)")
    # made before the kernel: right after a parallel region its worker threads still spin, and Python work
    # then runs ~10x slower where they share the cores (2 threads on 2 cores: 0.1 ms a call)
    result = QTensor(wrap_like(raw, x) if out is None else out, type, shape, flavor)
    if xs.size:
        values, data = _kernel_views(info, xs, raw)
        # the cuda flavor divides with the GPU's rcp.approx, reproduced from a measured table
        with kernel_lock():
            info.quantize_row(values, data, code, rcp_approx_table())
    return result


def dequantize(q: QTensor, out=None):
    """float32 values of a QTensor (ggml's to_float), same shape and device as its raw bytes.
    out: the caller's float32 buffer of q.shape (C-contiguous, where q.raw lives, not overlapping it),
    written in place and returned: no allocation per call."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize: expected a QTensor (from kvlab.quantize or QTensor.from_raw), "
                        f"got {type(q).__name__}")
    info = q.info
    check_raw(q.raw, info, q.shape, "dequantize(q)")   # the buffer as it is now, not as it was wrapped
    if q.is_cuda:
        from kvlab.kernels import cuda as gpu
        raw = cuda_rows(q.raw, np.uint8, "dequantize(q.raw)")                      # (n_rows, row_bytes)
        values = cuda_empty(q.shape, np.float32, q.raw) if out is None else \
            out_buffer(out, np.float32, q.shape, raw, "dequantize(out=)")
        if size_of(values):
            gpu.dequantize(raw, cuda_rows(values, np.float32, "out"), info)         # (n_rows, row_len)
        return values
    raw = to_numpy(q.raw, np.uint8, "dequantize(q.raw)")
    values = np.empty(q.shape, dtype=np.float32) if out is None else \
        out_buffer(out, np.float32, q.shape, raw, "dequantize(out=)")
    if values.size:
        data_values, data = _kernel_views(info, values, raw)
        with kernel_lock():
            info.dequantize_row(data, data_values)
    return wrap_like(values, q.raw) if out is None else out


def empty_cache(n_rows: int, row_len: int, type: str, flavor: str = "ref", like_x=None) -> QTensor:
    """A zero-filled cache of n_rows rows (ggml ne = [row_len, n_rows]), as llama.cpp allocates it."""
    info = type_info(type)
    n_rows, row_len = int_shape((n_rows, row_len), "empty_cache")
    _check_row_len((row_len,), info)
    raw = np.zeros((n_rows, info.row_bytes(row_len)), dtype=np.uint8)
    return QTensor(wrap_like(raw, like_x) if like_x is not None else raw, info.name, (n_rows, row_len), flavor)


def _row_ids(row_ids, n_rows: int) -> np.ndarray:
    """row_ids as a host int64 array, each id in [0, n_rows) and written once."""
    ids = np.asarray(row_ids.cpu() if is_torch(row_ids) else row_ids)
    if ids.ndim == 1 and ids.size == 0:
        return ids.astype(np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"set_rows: row_ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= n_rows:
        raise ValueError(f"set_rows: row ids must lie in [0, {n_rows}), got [{ids.min()}, {ids.max()}]")
    if np.unique(ids).size != ids.size:
        # ggml writes rows in parallel: which of two writes to one row lands is undefined there
        raise ValueError("set_rows: row ids must be distinct (a row written twice has no defined value)")
    return ids.astype(np.int64)


def _host_view(raw) -> np.ndarray:
    """A numpy array sharing raw's memory, strided or not (never a copy): set_rows writes through it."""
    view = raw.detach().numpy() if is_torch(raw) else raw
    if not view.flags.writeable:
        raise ValueError("set_rows: the cache's raw bytes are read-only")
    return view


def _check_gpu_cache(raw) -> None:
    """The CUDA kernels write a C-contiguous (n_rows, row_bytes) cache in place; a strided one is refused."""
    contiguous = raw.is_contiguous() if is_torch(raw) else cuda_layout(raw)[2]
    if len(raw.shape) != 2 or not contiguous:
        raise ValueError("set_rows: a GPU cache must be a C-contiguous 2-D (n_rows, row_bytes) array, as "
                         "llama.cpp's per-layer cache (a strided view would be written into a copy)")


def set_rows(cache: QTensor, row_ids, values) -> QTensor:
    """ggml_set_rows: quantize values[i] into row row_ids[i] of the cache, in the cache's type and flavor.

    cache: (..., n_rows, row_len) (ggml ne = [row_len, n_rows, ...]); values: (..., n, row_len) float32
    (or f16/bf16/f64, converted first); row_ids: (n,) distinct integers in [0, n_rows). Returns the
    cache, written in place: into the caller's buffer even when it is a strided view (a head slice of
    a bigger cache, a Fortran-order array); on the GPU a strided cache is refused.
    """
    if not isinstance(cache, QTensor):
        raise TypeError(f"set_rows: expected a QTensor cache, got {type(cache).__name__}")
    if not (isinstance(values, np.ndarray) or is_torch(values) or is_cuda(values)):
        raise TypeError(f"set_rows: values must be a numpy array or torch tensor, got {type(values).__name__}")
    check_raw(cache.raw, cache.info, cache.shape, "set_rows(cache)")
    if len(cache.shape) < 2:
        raise ValueError(f"set_rows: the cache needs a row dimension, got shape {cache.shape}")
    if is_cuda(values) != cache.is_cuda:
        where = lambda gpu: "on the GPU" if gpu else "on the CPU"
        raise TypeError(f"set_rows: values are {where(is_cuda(values))} but the cache is {where(cache.is_cuda)}")
    n_rows, row_len = cache.shape[-2], cache.shape[-1]
    ids = _row_ids(row_ids, n_rows)
    vshape = tuple(values.shape)
    if len(vshape) < 2 or vshape[-1] != row_len or vshape[-2] != ids.size or vshape[:-2] != cache.shape[:-2]:
        raise ValueError(f"set_rows: values of shape {vshape} do not fit {ids.size} rows of a cache of "
                         f"shape {cache.shape}")
    if cache.is_cuda:
        _check_gpu_cache(cache.raw)
        from kvlab.kernels import cuda as gpu
        if is_torch(cache.raw):
            import torch
            dev_ids = torch.as_tensor(ids, device=cache.raw.device)
        else:
            from numba import cuda
            dev_ids = cuda.to_device(ids)
        gpu.set_rows(cache.raw, dev_ids, cuda_rows(_as_float32(values), np.float32, "set_rows(values)"),
                     cache.info, flavor_code(cache.flavor))
        return cache
    q = quantize(values, cache.type, cache.flavor)
    _host_view(cache.raw)[..., ids, :] = to_numpy(q.raw, np.uint8, "q.raw")
    return cache
