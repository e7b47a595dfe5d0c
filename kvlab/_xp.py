"""numpy / torch interop: take either, compute on numpy views, hand back the caller's kind.

No copies where the input is already a contiguous float32 CPU array or tensor.
"""
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
    if x.dtype != dtype:
        hint = f" (use x.astype(np.{np.dtype(dtype).name}))" if x.dtype.kind == "f" else ""
        raise TypeError(f"{what}: expected dtype {np.dtype(dtype).name}, got {x.dtype}{hint}")
    return np.ascontiguousarray(x)


def like(out: np.ndarray, template):
    """Return `out` as the same kind (numpy or torch) as `template`, sharing memory."""
    if is_torch(template):
        import torch
        return torch.from_numpy(out)
    return out


def _torch_dtype(dtype):
    import torch
    return {np.float32: torch.float32, np.uint8: torch.uint8, np.float64: torch.float64}[np.dtype(dtype).type]


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


def cuda_empty(shape, dtype, template):
    """An uninitialised GPU array of the template's kind (torch tensor on its device, else numba)."""
    if is_torch(template):
        import torch
        return torch.empty(shape, dtype=_torch_dtype(dtype), device=template.device)
    from numba import cuda
    return cuda.device_array(shape, dtype=dtype)
