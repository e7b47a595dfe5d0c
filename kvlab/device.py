"""Where the error math runs: numpy on the CPU (the default), or torch on a device (a GPU).

The attention math (kvlab.accuracy.attention, kvlab.accuracy.sweep, kvlab.accuracy.depth) is written once against the array
operations numpy and torch share by name: ``xp.matmul``, ``xp.exp``, ``xp.where``, ``xp.amax``,
``x.sum(axis=..., keepdims=...)``, ``x.swapaxes``, ``x.reshape`` and Python-float scalars (which
keep float32 math float32 in both, NEP 50). This module holds the few places where they differ:
dtype casts, copies between host and device, and choosing the device. Quantization needs nothing
here: kvlab.quantize / dequantize / rotate already route CUDA tensors to kvlab.kernels.cuda.
"""
import importlib.util

import numpy as np

from kvlab._xp import is_torch


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


def namespace(x):
    """The module whose functions apply to x: numpy, or torch for a tensor."""
    if is_torch(x):
        import torch
        return torch
    return np


def place_of(x):
    """Where x lives, as resolve_device gives it: None for numpy, else its torch.device."""
    return x.device if is_torch(x) else None


def to_device(a: np.ndarray, place):
    """A numpy array as it lives on `place` (None: the array itself)."""
    if place is None:
        return a
    import torch
    return torch.as_tensor(np.ascontiguousarray(a), device=place)


def like(a: np.ndarray, x):
    """A numpy constant on x's device with x's dtype (numpy stays numpy)."""
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
