"""kvlab.kernels.cuda.flash_decode's host side without a GPU: every launch goes to the caller's stream (the
one its arrays name, as every kvlab.kernels.cuda call picks it), and importing device arrays waits for
nothing. The kernels and numba.cuda's allocations are stand-ins that log; no kernel is compiled."""
import types

import numpy as np
import pytest

import kvlab.kernels.cuda as kc
from kvlab.kernels.cuda import flash_decode as fd
from kvlab.types import TYPES


class Array:
    """A device array as far as the host side looks: shape, byte strides, reshape, its interface."""

    def __init__(self, shape, typestr, ptr, stream=None):
        self.shape, self.dtype = tuple(shape), np.dtype(typestr)
        self.strides = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) * self.dtype.itemsize
                             for i in range(len(self.shape)))
        self.__cuda_array_interface__ = dict(shape=self.shape, typestr=typestr, data=(ptr, False), strides=None,
                                             version=3, stream=stream)

    def reshape(self, *shape):
        iface = self.__cuda_array_interface__
        return Array(shape, iface["typestr"], iface["data"][0], iface["stream"])


class Kernel:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, config):
        return lambda *args: self.log.append((self.name, config))


@pytest.fixture
def launches(monkeypatch):
    log = []
    imported = []
    monkeypatch.setattr(fd, "SIM", False)
    monkeypatch.setattr(fd, "partials_kernel", lambda *a: Kernel(log, "partials"))
    monkeypatch.setattr(fd, "combine_kernel", lambda *a: Kernel(log, "combine"))
    monkeypatch.setattr(kc, "_numba_stream", lambda handle: f"stream {handle:#x}")
    fake_cuda = types.SimpleNamespace(
        get_current_device=lambda: types.SimpleNamespace(MULTIPROCESSOR_COUNT=132),
        device_array=lambda shape, dtype: Array(shape, np.dtype(dtype).str, 1 << 30),
        to_device=lambda a: Array(a.shape, a.dtype.str, 1 << 31),
        as_cuda_array=lambda a, sync=True: imported.append(sync) or a)
    monkeypatch.setattr("numba.cuda.get_current_device", fake_cuda.get_current_device)
    monkeypatch.setattr("numba.cuda.device_array", fake_cuda.device_array)
    monkeypatch.setattr("numba.cuda.to_device", fake_cuda.to_device)
    monkeypatch.setattr("numba.cuda.as_cuda_array", fake_cuda.as_cuda_array)
    return log, imported


@pytest.mark.parametrize("stream, want", [(None, 0), (0x5000, 0x5000)])
def test_launches_go_to_the_stream_the_arrays_name(launches, stream, want):
    log, imported = launches
    q4 = TYPES["q4_0"]
    q = Array((1, 32, 128), "<f4", 1 << 20, stream)
    k = Array((1, 8, 4096, q4.row_bytes(128)), "|u1", 1 << 24, stream)
    v = Array((1, 8, 4096, q4.row_bytes(128)), "|u1", 1 << 26, stream)
    fd.flash_decode(q, k, v, q4.ggml_type, q4.ggml_type, None, 0.088)
    assert [name for name, _ in log] == ["partials", "combine"]                  # split over the context
    assert {config[2] for _, config in log} == {f"stream {want:#x}"}
    assert imported and not any(imported)                                         # as_cuda_array(sync=False)
