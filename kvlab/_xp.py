"""Array interop: numpy and torch, on the CPU or a GPU, in one place.

Two jobs:
- The public entry points (kvlab.quantize, dequantize, rotate, set_rows) take either kind and hand back
  the caller's kind: ``to_numpy`` gives a C-contiguous numpy view (no copy where the input already is a
  contiguous CPU array or tensor of the dtype), ``wrap_like`` wraps the numpy result as the caller's kind
  (sharing memory); GPU arrays go to kvlab.kernels.cuda as device views (``cuda_rows``, ``cuda_empty``).
- The attention math (kvlab.accuracy) is written once against the array operations numpy and torch share
  by name (``xp.matmul``, ``xp.exp``, ``x.sum(axis=..., keepdims=...)``, ``x.swapaxes``, Python-float
  scalars, which keep float32 math float32 in both, NEP 50) and runs on numpy on the CPU or torch on a
  device: ``namespace``, ``cast``, ``copy_like``, ``to_device``, ``to_host`` and ``resolve_device`` hold the
  few places where the two differ.
torch is never imported just to ask whether something is a tensor.
"""
import importlib.util
import sys

import numpy as np


def is_torch(x) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return torch is not None and isinstance(x, torch.Tensor)


def is_cuda(x) -> bool:
    """A GPU array: a CUDA torch tensor, anything exposing __cuda_array_interface__, or a numba device
    array (the CUDA simulator's have no interface but copy_to_host)."""
    if is_torch(x):
        return x.is_cuda
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _torch_dtype(dtype):
    import torch
    return {np.float32: torch.float32, np.uint8: torch.uint8, np.float64: torch.float64}[np.dtype(dtype).type]


# ---- the public entry points: numpy views in, the caller's kind out ---------------------------------

def to_numpy(x, dtype, what: str):
    """A C-contiguous numpy view of x (numpy array or CPU torch tensor) of exactly `dtype`."""
    if is_torch(x):
        if x.is_cuda:
            raise TypeError(f"{what}: expected a CPU tensor here, got one on {x.device}")
        x = x.detach()
        if x.dtype != _torch_dtype(dtype):
            raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {x.dtype}")
        return x.contiguous().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{what}: a masked array's mask would be ignored; pass x.filled(...) or x.data")
    if x.dtype != dtype:
        hint = f" (use x.astype(np.{np.dtype(dtype).name}))" if x.dtype.kind == "f" else ""
        raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {x.dtype}{hint}")
    return np.ascontiguousarray(x)


def wrap_like(out: np.ndarray, template):
    """`out` as the same kind (numpy or torch) as `template`, sharing memory: no copy."""
    if is_torch(template):
        import torch
        return torch.from_numpy(out)
    return out


def cuda_rows(x, dtype, what: str):
    """A GPU array as a C-contiguous (rows, last_dim) device view (torch tensor or numba array)."""
    if is_torch(x):
        if x.dtype != _torch_dtype(dtype):
            raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {x.dtype}")
        x = x.detach().contiguous()
        return x.view(-1, x.shape[-1]) if x.dim() else x.view(1, 1)
    from numba import cuda
    d = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
    if d.dtype != np.dtype(dtype):
        raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {d.dtype}")
    if not d.is_c_contiguous():
        raise ValueError(f"{what}: a GPU array must be C-contiguous here")
    return d.reshape(-1, tuple(d.shape)[-1])  # tuple(): the simulator's shape has no negative index


def out_buffer(out, dtype, shape: tuple, source, what: str):
    """The caller's `out` as the kernels will write it, or an error before anything is written: where
    `source` lives (host: numpy array or CPU torch tensor, returned as a numpy view; GPU: an array on the
    same device, returned as it is), exactly `dtype` and `shape`, C-contiguous and writable (a copy would
    leave the caller's buffer unwritten), and not overlapping `source` (the kernels read it while writing)."""
    where = "GPU" if is_cuda(source) else "host"
    if is_cuda(out) != is_cuda(source) or not (is_torch(out) or isinstance(out, np.ndarray) or is_cuda(out)):
        raise TypeError(f"{what}: expected a {where} array like the input, got {_describe(out)}")
    if isinstance(out, np.ma.MaskedArray):
        raise TypeError(f"{what}: a masked array; pass a plain numpy array")
    if is_torch(out):
        if out.dtype != _torch_dtype(dtype):
            raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {out.dtype}")
        if is_torch(source) and out.device != source.device:
            raise ValueError(f"{what}: on {out.device}, the input on {source.device}")
        contiguous, writable, got = out.is_contiguous(), True, tuple(out.shape)
    elif isinstance(out, np.ndarray):
        if out.dtype != dtype:
            raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {out.dtype}")
        contiguous, writable, got = out.flags.c_contiguous, out.flags.writeable, out.shape
    else:
        dt, got, contiguous, writable = cuda_layout(out)
        if dt != np.dtype(dtype):
            raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {dt}")
    if tuple(got) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(got)}")
    if not contiguous:
        raise ValueError(f"{what}: must be C-contiguous (kvlab writes the caller's buffer, never a copy of it)")
    if not writable:
        raise ValueError(f"{what}: the array is read-only")
    if _overlap(out, source):
        raise ValueError(f"{what}: shares memory with the input, which the kernels read while writing")
    return out if is_cuda(out) else (out.detach().numpy() if is_torch(out) else out)


def cuda_layout(x):
    """(dtype, shape, C-contiguous, writable) of a GPU array that is not a torch tensor, read from its own
    description (the __cuda_array_interface__, or the CUDA simulator's numpy array underneath): no numba
    call, so no stream sync. Contiguity as numpy's flags have it (a dimension of size 1 has any stride)."""
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is None:
        a = x._ary
        return a.dtype, tuple(a.shape), a.flags.c_contiguous, a.flags.writeable
    dt, shape, strides = np.dtype(iface["typestr"]), tuple(iface["shape"]), iface.get("strides")
    step, contiguous = dt.itemsize, True
    for n, st in zip(shape[::-1], (strides or ())[::-1]):
        contiguous &= n == 1 or st == step
        step *= n
    return dt, shape, contiguous, not iface["data"][1]       # data: (pointer, read-only flag)


def _describe(x) -> str:
    if is_torch(x):
        return f"a torch tensor on {x.device}"
    return "a GPU array" if is_cuda(x) else type(x).__name__


def _host_memory(x):
    """The numpy array holding x's memory (a host array, a CPU torch tensor, a CUDA-simulator array), or None."""
    if is_torch(x):
        return None if x.is_cuda else x.detach().numpy()
    return x if isinstance(x, np.ndarray) else getattr(x, "_ary", None)


def _gpu_span(x):
    """(first byte address, end address) of a GPU array's memory (torch tensor or __cuda_array_interface__)."""
    if is_torch(x):
        last = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))       # the farthest element
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()
    iface = x.__cuda_array_interface__
    lo = iface["data"][0]
    return lo, lo + int(np.prod(iface["shape"], dtype=np.int64)) * np.dtype(iface["typestr"]).itemsize


def _overlap(a, b) -> bool:
    """Whether two arrays' memory meets: exactly on the host (and the CUDA simulator), by extent on a GPU."""
    if size_of(a) == 0 or size_of(b) == 0:
        return False
    ha, hb = _host_memory(a), _host_memory(b)
    if ha is not None and hb is not None:
        return bool(np.shares_memory(ha, hb))
    (a0, a1), (b0, b1) = _gpu_span(a), _gpu_span(b)
    return a0 < b1 and b0 < a1


def size_of(x) -> int:
    """Number of elements of a numpy array, torch tensor or GPU array (torch's .size is a method)."""
    return int(x.numel()) if is_torch(x) else int(np.prod(tuple(x.shape), dtype=np.int64))


def cuda_empty(shape, dtype, template):
    """An uninitialised GPU array of the template's kind (torch tensor on its device, else numba)."""
    if is_torch(template):
        import torch
        return torch.empty(shape, dtype=_torch_dtype(dtype), device=template.device)
    from numba import cuda
    return cuda.device_array(shape, dtype=dtype)


# ---- where the math runs: numpy on the CPU, or torch on a device -----------------------------------

def resolve_device(device="auto"):
    """None for numpy on the CPU, or the torch.device to run on.

    "auto": the GPU when torch is installed and sees one, else the CPU; "cpu": numpy (Numba
    kernels); "cuda", "cuda:1": that GPU; a torch.device object runs the torch math there (a
    torch.device("cpu") runs the GPU code path on the CPU, which is how the tests check it).
    """
    if device is None or device == "cpu":
        return None
    if not isinstance(device, str):  # a torch.device
        return device
    if device == "auto":
        if importlib.util.find_spec("torch") is None:
            return None
        import torch
        return torch.device("cuda") if torch.cuda.is_available() else None
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU here (use --device cpu or auto)")
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")


def device_label(place) -> str:
    """How a table names where it was computed: "cpu" (numpy), "cuda:0", or "torch-cpu"."""
    if place is None:
        return "cpu"
    if place.type == "cpu":
        return "torch-cpu"
    return f"{place.type}:{place.index or 0}"


def place_of(x):
    """Where x lives, as resolve_device gives it: None for numpy, else its torch.device."""
    return x.device if is_torch(x) else None


def namespace(x):
    """The module whose functions apply to x: numpy, or torch for a tensor."""
    if is_torch(x):
        import torch
        return torch
    return np


def to_device(a: np.ndarray, place):
    """A numpy array as it lives on `place` (None: the array itself)."""
    if place is None:
        return a
    import torch
    return torch.as_tensor(np.ascontiguousarray(a), device=place)


def copy_like(a: np.ndarray, x):
    """A copy of the numpy constant `a` on x's device with x's dtype (numpy stays numpy)."""
    if is_torch(x):
        import torch
        return torch.as_tensor(a, device=x.device).to(x.dtype)
    return a.astype(x.dtype)


def to_host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def cast(x, dtype: str):
    """x in "float16", "bfloat16" (torch only), "float32" or "float64"."""
    if is_torch(x):
        import torch
        return x.to(getattr(torch, dtype))
    return x.astype(dtype)


def contiguous(x):
    return x.contiguous() if is_torch(x) else np.ascontiguousarray(x)
