"""quantize / dequantize / set_rows: the public entry points, dispatching to one kernel pair per type.

The bytes in ``QTensor.raw`` are exactly ggml's: a row of n values is
``n // block_size`` block structs laid end to end (ggml_row_size), so a raw
array can be written into a GGUF file or a llama.cpp state file as is.
"""
from dataclasses import dataclass

import numpy as np

from kvlab._xp import cuda_empty, cuda_rows, is_cuda, is_torch, to_numpy, wrap_like
from kvlab.kernels.scalar import rcp_approx_table
from kvlab.types import TYPES, flavor_code, type_info


@dataclass
class QTensor:
    """A tensor stored in a ggml type: `raw` holds ggml's bytes, one row per leading index."""
    raw: object          # uint8, (*shape[:-1], row_bytes); numpy array or torch tensor
    type: str
    shape: tuple         # the logical float shape
    flavor: str = "ref"  # which ggml code path wrote the bytes

    @classmethod
    def from_raw(cls, raw, type: str, shape, flavor: str = "ref") -> "QTensor":
        """Wrap bytes written by ggml (e.g. read from a GGUF tensor or a llama.cpp state file)."""
        info = type_info(type)
        flavor_code(flavor)
        shape = tuple(int(s) for s in shape)
        _check_row_len(shape, info)
        expected = shape[:-1] + (info.row_bytes(shape[-1]),)
        if not is_cuda(raw):
            to_numpy(raw, np.uint8, "QTensor.from_raw(raw)")  # kind and dtype checks
        got = tuple(raw.shape)
        if got != expected:
            raise ValueError(f"QTensor.from_raw: raw has shape {got}, but {type} values of shape {shape} "
                             f"need {expected} ({info.type_size} bytes per {info.block_size} values)")
        return cls(raw, info.name, shape, flavor)

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


def quantize(x, type: str, flavor: str = "ref") -> QTensor:
    """Quantize x along its last dimension into ggml type `type`, as the `flavor` code path does.

    x: numpy array or torch tensor (CPU, or CUDA for the GPU kernels), last dim a multiple of the type's
    block size; float32, or float16 / bfloat16 / float64, which are converted to float32 first (as ggml's
    set_rows converts an f16 source). `type` in any case (`Q8_0` is q8_0). Returns a QTensor whose raw
    bytes live where x lives.
    """
    info = type_info(type)
    type = info.name
    code = flavor_code(flavor)
    if not (isinstance(x, np.ndarray) or is_torch(x) or is_cuda(x)):
        raise TypeError(f"quantize: expected a float32 numpy array or torch tensor, got {x.__class__.__name__}")
    x = _as_float32(x)
    shape = tuple(int(s) for s in x.shape)
    _check_row_len(shape, info)
    if is_cuda(x):
        from kvlab.kernels import cuda as gpu
        raw = cuda_empty(shape[:-1] + (info.row_bytes(shape[-1]),), np.uint8, x)
        if raw.size:
            gpu.quantize(cuda_rows(x, np.float32, f"quantize(x, {type!r})"),   # (n_rows, row_len)
                         cuda_rows(raw, np.uint8, "raw"), info, code)          # (n_rows, row_bytes)
        return QTensor(raw, type, shape, flavor)
    xs = to_numpy(x, np.float32, f"quantize(x, {type!r})")
    raw = np.empty(shape[:-1] + (info.row_bytes(shape[-1]),), dtype=np.uint8)
    if xs.size:
        values, data = _kernel_views(info, xs, raw)
        # the cuda flavor divides with the GPU's rcp.approx, reproduced from a measured table
        info.quantize_row(values, data, code, rcp_approx_table())
    return QTensor(wrap_like(raw, x), type, shape, flavor)


def dequantize(q: QTensor):
    """float32 values of a QTensor (ggml's to_float), same shape and device as its raw bytes."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize: expected a QTensor (from kvlab.quantize or QTensor.from_raw), "
                        f"got {type(q).__name__}")
    info = q.info
    if q.is_cuda:
        from kvlab.kernels import cuda as gpu
        out = cuda_empty(q.shape, np.float32, q.raw)
        if out.size:
            gpu.dequantize(cuda_rows(q.raw, np.uint8, "dequantize(q.raw)"),    # (n_rows, row_bytes)
                           cuda_rows(out, np.float32, "out"), info)            # (n_rows, row_len)
        return out
    raw = to_numpy(q.raw, np.uint8, "dequantize(q.raw)")
    out = np.empty(q.shape, dtype=np.float32)
    if out.size:
        values, data = _kernel_views(info, out, raw)
        info.dequantize_row(data, values)
    return wrap_like(out, q.raw)


def empty_cache(n_rows: int, row_len: int, type: str, flavor: str = "ref", like_x=None) -> QTensor:
    """A zero-filled cache of n_rows rows (ggml ne = [row_len, n_rows]), as llama.cpp allocates it."""
    info = type_info(type)
    _check_row_len((row_len,), info)
    raw = np.zeros((n_rows, info.row_bytes(row_len)), dtype=np.uint8)
    return QTensor(wrap_like(raw, like_x) if like_x is not None else raw, info.name, (n_rows, row_len), flavor)


def set_rows(cache: QTensor, row_ids, values) -> QTensor:
    """ggml_set_rows: quantize values[i] into row row_ids[i] of the cache, in the cache's type and flavor.

    cache: (..., n_rows, row_len) (ggml ne = [row_len, n_rows, ...]); values: (..., n, row_len) float32;
    row_ids: (n,) integers in [0, n_rows). Returns the cache, written in place.
    """
    if not isinstance(cache, QTensor):
        raise TypeError(f"set_rows: expected a QTensor cache, got {type(cache).__name__}")
    ids = np.asarray(row_ids.cpu() if is_torch(row_ids) else row_ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"set_rows: row_ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    n_rows, row_len = cache.shape[-2], cache.shape[-1]
    vshape = tuple(values.shape)
    if vshape[-1] != row_len or vshape[-2] != ids.size or vshape[:-2] != cache.shape[:-2]:
        raise ValueError(f"set_rows: values of shape {vshape} do not fit {ids.size} rows of a cache of "
                         f"shape {cache.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise ValueError(f"set_rows: row ids must lie in [0, {n_rows}), got [{ids.min()}, {ids.max()}]")
    if cache.is_cuda:
        if cache.raw.ndim != 2:
            raise ValueError("set_rows: a GPU cache must be 2-D (n_rows, row_bytes), as llama.cpp's per-layer cache")
        from kvlab.kernels import cuda as gpu
        if is_torch(cache.raw):
            import torch
            dev_ids = torch.as_tensor(ids.astype(np.int64), device=cache.raw.device)
        else:
            from numba import cuda
            dev_ids = cuda.to_device(ids.astype(np.int64))
        gpu.set_rows(cache.raw, dev_ids, cuda_rows(_as_float32(values), np.float32, "set_rows(values)"),
                     cache.info, flavor_code(cache.flavor))
        return cache
    q = quantize(values, cache.type, cache.flavor)
    to_numpy(cache.raw, np.uint8, "set_rows(cache.raw)")[..., ids, :] = to_numpy(q.raw, np.uint8, "q.raw")
    return cache
