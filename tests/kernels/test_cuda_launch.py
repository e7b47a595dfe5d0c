"""kvlab.kernels.cuda's launch bookkeeping without a GPU: a call that replays the launches of an earlier
call of the same key launches exactly what the checked path launches for it (kernels, grids, every
argument, the addresses of this call's arrays, the call's stream), and a call that fails a check still
fails when its key comes again; every launch of a call goes to the caller's stream (stream=, else the
one its arrays name). The kernels are stand-ins that log their launches; no numba.cuda is loaded."""
import types

import numpy as np
import pytest

import kvlab.kernels.cuda as kc
from kvlab.types import TYPES


class Array:
    """A device array as far as the entry points look: its __cuda_array_interface__."""

    def __init__(self, shape, typestr, ptr, stream=None):
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(ptr, False), strides=None,
                                             version=3)
        if stream is not None:
            self.__cuda_array_interface__["stream"] = stream


class Kernel:
    """A stand-in for a numba dispatcher: kernel[grid, block, stream, shared](*args) logs (name, (grid, block,
    stream, shared), args)."""

    def __init__(self, log, name):
        self.log, self.name = log, name
        self.overloads = types.SimpleNamespace(get=lambda argument_types: self)   # compiled for any

    def __getitem__(self, config):
        return lambda *args: self.log.append((self.name, config, tuple(args)))

    def typeof_pyval(self, a):
        return type(a)


class Device:
    """What _numba_array gives the dispatcher: here an address only."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __eq__(self, other):
        return isinstance(other, Device) and other.ptr == self.ptr


def direct(kernel, grid, block, shared, numba_args):
    """A stand-in _DirectLaunch: logs what the dispatcher would have been called with."""
    def launch(ptrs, stream):
        it = iter(ptrs)
        kernel.log.append((kernel.name, (grid, block, stream, shared),
                           tuple(Device(next(it)) if isinstance(a, Device) else a for a in numba_args)))
    return launch


@pytest.fixture
def log(monkeypatch):
    launches = []
    kernels = {}

    def k(name):
        return kernels.setdefault(name, Kernel(launches, name))

    values = lambda info: types.SimpleNamespace(**{f: k(f + info.name) for f in  # noqa: E731
                                                   ("quantize", "quantize_any", "dequantize", "dequantize_any")})
    stub = types.SimpleNamespace(SIM=False, TPB=128, VALUE_TPB=256, IDS_CHECKED_IN_KERNEL=4, CHECK_TPB=1024,
                                 resident_tiles=lambda: 2, tiles_per_block=lambda info: 2,
                                 quantize_kernel=lambda info, fl: k(f"q_{info.name}_{fl}"),
                                 dequantize_kernel=lambda info: k(f"d_{info.name}"), rotate_kernel=k("rotate"),
                                 check_rows_kernel=k("check"), value_kernels=values)
    monkeypatch.setattr(kc, "_k", lambda: stub)
    monkeypatch.setattr(kc, "_numba_array", lambda arg: Device(arg.view.ptr))
    monkeypatch.setattr(kc, "_direct_launch", direct)
    monkeypatch.setattr(kc, "_numba_stream", lambda handle: handle)        # the dispatcher logs the handle
    monkeypatch.setattr(kc, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(kc, "_DIRECT", {})
    monkeypatch.setattr(kc, "_PLANS", {})
    monkeypatch.setattr(kc, "_STATE", {"zero_ids": kc._View(1 << 12, (1,), np.dtype(np.int64), "ids"),
                                       "flags": kc._View(2 << 12, (kc.FLAG_WORDS,), np.dtype(np.int32), "flags"),
                                       "flag_words": {},
                                       "refused": kc._View(3 << 12, (1,), np.dtype(np.int32), "refused"),
                                       "refused_host": np.zeros(1, np.int32)})
    return launches


Q4_1, IQ4_NL, F16 = TYPES["q4_1"], TYPES["iq4_nl"], TYPES["f16"]
CALLS = {   # entry point, arrays at base address b (b + offsets keep each array's alignment)
    "quantize": (lambda x, o, **kw: kc.quantize(x, o, Q4_1, 2, **kw),
                 lambda b: (Array((8, 256), "<f4", b), Array((8, 160), "|u1", b + 65536))),
    "quantize, out off 16 bytes": (lambda x, o, **kw: kc.quantize(x, o, Q4_1, 0, **kw),
                                   lambda b: (Array((8, 256), "<f4", b), Array((8, 160), "|u1", b + 65538))),
    "set_rows, ids checked in the kernel": (
        lambda c, i, v, **kw: kc.set_rows(c, i, v, IQ4_NL, 1, **kw),
        lambda b: (Array((16, 144), "|u1", b), Array((3,), "<i8", b + 32768), Array((3, 256), "<f4", b + 65536))),
    "set_rows, ids checked before": (
        lambda c, i, v, **kw: kc.set_rows(c, i, v, IQ4_NL, 1, **kw),
        lambda b: (Array((16, 144), "|u1", b), Array((6,), "<i4", b + 32768), Array((6, 256), "<f4", b + 65536))),
    "set_rows f16": (lambda c, i, v, **kw: kc.set_rows(c, i, v, F16, 1, **kw),
                     lambda b: (Array((16, 512), "|u1", b), Array((3,), "<i8", b + 32768),
                                Array((3, 256), "<f4", b + 65536))),
    "quantize f16, one value a step": (lambda x, o, **kw: kc.quantize(x, o, F16, 1, **kw),
                                       lambda b: (Array((3, 6), "<f4", b + 4), Array((3, 12), "|u1", b + 65538))),
    "rotate_quantize": (lambda x, o, **kw: kc.rotate_quantize(x, o, Q4_1, 0, 64, 0.125, **kw),
                        lambda b: (Array((8, 256), "<f4", b), Array((8, 160), "|u1", b + 65536))),
    "dequantize_unrotate": (lambda r, o, **kw: kc.dequantize_unrotate(r, o, Q4_1, 64, 0.125, **kw),
                            lambda b: (Array((8, 160), "|u1", b), Array((8, 256), "<f4", b + 65536))),
    "dequantize f16, one value a step": (lambda r, o, **kw: kc.dequantize(r, o, F16, **kw),
                                         lambda b: (Array((3, 12), "|u1", b + 2), Array((3, 6), "<f4", b + 65536))),
    "rotate": (lambda x, o, **kw: kc.rotate(x, o, 16, 0.25, **kw),
               lambda b: (Array((8, 256), "<f4", b), Array((8, 256), "<f4", b + 65536))),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_replayed_call_launches_what_the_checked_path_launches(name, log):
    call, arrays = CALLS[name]
    call(*arrays(1 << 20))                     # checked, launched by the dispatcher, recorded
    first = list(log)
    assert len(kc._PLANS) == 1
    log.clear()
    call(*arrays(9 << 20))                     # replayed
    replayed = list(log)
    kc._PLANS.clear()
    log.clear()
    call(*arrays(9 << 20))                     # checked again, through the direct launches
    assert replayed == log
    assert len(first) == len(log) and first != log        # the addresses moved


def test_a_call_that_fails_its_checks_fails_again_with_the_same_key(log):
    x, out = Array((8, 256), "<f4", 1 << 20), Array((8, 7), "|u1", 2 << 20)
    for _ in range(2):
        with pytest.raises(ValueError, match="does not fit"):
            kc.quantize(x, out, Q4_1, 0)
    x, out = CALLS["quantize"][1](1 << 20)
    kc.quantize(x, out, Q4_1, 1)
    with pytest.raises(ValueError, match="flavor_code"):
        kc.quantize(x, out, Q4_1, True)                    # True == 1, but no flavor
    assert len(log) == 1


def with_stream(arrays, stream):
    """The arrays, their __cuda_array_interface__ naming `stream` (the producer's stream, CAI v3)."""
    for a in arrays:
        a.__cuda_array_interface__["stream"] = stream
    return arrays


class TorchLikeStream:
    """A stream object as torch.cuda.Stream is one: its handle in cuda_stream."""

    def __init__(self, handle):
        self.cuda_stream = handle


def streams(log):
    return {config[2] for _, config, _ in log}


@pytest.mark.parametrize("name", CALLS)
def test_every_launch_goes_to_the_callers_stream(name, log):
    """The stream its arrays name (CAI 'stream'), or stream= over it, or the default stream (0): for
    every launch of the call, checked (the dispatcher) and replayed alike, the ids check's too."""
    call, arrays = CALLS[name]
    call(*arrays(1 << 20))                                   # no stream named anywhere
    assert streams(log) == {0}
    for b, (stream, named, want) in enumerate([(None, 0x5000, 0x5000), (0x6000, 0x5000, 0x6000),
                                               (TorchLikeStream(0x7000), None, 0x7000), (None, 2, 2)]):
        log.clear()
        kw = {} if stream is None else {"stream": stream}
        call(*with_stream(arrays((b + 2) << 20), named), **kw)      # replayed: the key has been seen
        assert streams(log) == {want}, (stream, named)
    kc._PLANS.clear()
    kc._DIRECT.clear()
    log.clear()
    call(*arrays(1 << 20), stream=0x8000)                    # checked, through the dispatcher
    assert streams(log) == {0x8000}
    with pytest.raises(TypeError, match="stream: expected a CUDA stream"):
        call(*arrays(1 << 20), stream="0x8000")


def test_the_ids_check_word_is_the_streams_own(log):
    """set_rows with ids checked by a kernel first: the check kernel and the writing kernel of a call
    share a device word, its stream's; a call on another stream (replayed) takes another word, and the
    first stream's calls keep theirs."""
    call, arrays = CALLS["set_rows, ids checked before"]

    def words(stream):
        log.clear()
        call(*arrays(1 << 20), stream=stream)
        (check, _, check_args), (write, _, write_args) = log
        assert (check, write) == ("check", "q_iq4_nl_1")
        assert check_args[2] == write_args[-2]            # flag: check_rows_kernel's out, rows_refused's in
        return check_args[2]

    a, b = words(0x5000), words(0x6000)
    assert a != b
    assert words(0x5000) == a and words(0x6000) == b
    assert len(kc._PLANS) == 1                            # one key: the word is not part of it


def test_a_large_tile_call_prefetches_a_wave_ahead(log, monkeypatch):
    """The tile kernels get ahead = the CUDA blocks the GPU holds (here 2) times the direction's fraction
    (_PREFETCH: dequantize 0.5, quantize 0 by default) when more tiles than that follow, else 0 (none)."""
    def aheads(rows):
        log.clear()
        kc.quantize(Array((rows, 4096), "<f4", 1 << 24), Array((rows, 2560), "|u1", 2 << 24), Q4_1, 0)
        kc.dequantize(Array((rows, 2560), "|u1", 2 << 24), Array((rows, 4096), "<f4", 1 << 24), Q4_1)
        (_, (q_grid, *_), q_args), (_, (d_grid, *_), d_args) = log
        assert (q_grid, d_grid) == (-(-rows // 2), rows)   # a tile (128 blocks) per row; quantize: 2 a CUDA block
        return q_args[9], d_args[-1]

    assert aheads(1) == (0, 0) and aheads(2) == (0, 1) and aheads(3) == (0, 1)
    for read, write, want in [(0.0, 0.0, (0, 0)), (1.0, 1.0, (2, 2)), (0.5, 1.0, (2, 1)), (0.25, 0.5, (1, 0))]:
        monkeypatch.setattr(kc, "_PREFETCH", {"read": read, "write": write})
        kc._PLANS.clear()                                  # the recorded launches hold the distance
        assert aheads(3) == want, (read, write)
