"""kvlab.kernels.cuda.flash_decode's host side without a GPU: every launch goes to the caller's stream (the
one its arrays name, as every kvlab.kernels.cuda call picks it), importing device arrays waits for nothing,
and a later call of the same key replays the first one's launches (kvlab.kernels.cuda's _call): exactly
what the checked path launches for it, with its own addresses and context length, allocating only its
output and reusing its stream's scratch. The kernels, numba.cuda's allocations and the direct launch are stand-ins that
log; no kernel is compiled."""
import itertools
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import kvlab.kernels.cuda as kc
from kvlab.kernels.cuda import flash_decode as fd
from kvlab.types import TYPES

Q4, F16 = TYPES["q4_0"], TYPES["f16"]


class Array:
    """A device array as far as the host side looks: its __cuda_array_interface__ (strides None: C order),
    shape, size, reshape."""

    def __init__(self, shape, typestr, ptr, stream=None, strides=None):
        self.shape, self.size = tuple(shape), int(np.prod(shape))
        self.__cuda_array_interface__ = dict(shape=self.shape, typestr=typestr, data=(ptr, False), strides=strides,
                                             version=3, stream=stream)

    def reshape(self, *shape):
        iface = self.__cuda_array_interface__
        return Array(shape, iface["typestr"], iface["data"][0], iface["stream"])


def described(args, ptrs=None):
    """A launch's arguments with arrays as (shape, typestr, address); ptrs: the direct launch's addresses."""
    it = iter(ptrs or ())
    return tuple(("array", a.shape, a.__cuda_array_interface__["typestr"],
                  next(it) if ptrs is not None else a.__cuda_array_interface__["data"][0])
                 if isinstance(a, Array) else a for a in args)


class Kernel:
    """A numba dispatcher stand-in: kernel[grid, block, stream, shared](*args) logs (name, config, args), and
    the names of the pre-launch callbacks its configuration was given (pre_launch)."""

    def __init__(self, log, name):
        self.log, self.name, self.pre_launch = log, name, []
        self.overloads = types.SimpleNamespace(get=lambda argument_types: self)   # compiled for any

    def __getitem__(self, config):
        def launch(*args):
            self.pre_launch += [getattr(f, "__qualname__", "") for f in launch.pre_launch_callbacks]
            self.log.append((self.name, config, described(args)))
        launch.pre_launch_callbacks = []
        return launch

    def typeof_pyval(self, a):
        return type(a)


@pytest.fixture
def fake(monkeypatch):
    """(launches log, sync flags of every array import, allocations log)."""
    log, imported, allocated = [], [], []
    kernels = {}
    addresses = itertools.count(1 << 40, 1 << 24)

    def direct(kernel, grid, block, shared, numba_args):
        def launch(ptrs, stream, scalars=()):       # scalars: (position, value) set by this launch
            args = list(numba_args)
            for pos, x in scalars:
                args[pos] = x
            kernel.log.append((kernel.name, (grid, block, f"stream {stream:#x}", shared), described(args, ptrs)))
        return launch

    def device_array(shape, dtype):
        allocated.append(shape)
        return Array(shape if isinstance(shape, tuple) else (shape,), np.dtype(dtype).str, next(addresses))

    def as_cuda_array(a, sync=True):
        imported.append(sync)
        iface = a.__cuda_array_interface__
        return Array(iface["shape"], iface["typestr"], iface["data"][0], iface.get("stream"), iface.get("strides"))

    monkeypatch.setattr(fd, "SIM", False)
    monkeypatch.setattr(fd, "partials_kernel", lambda *a: kernels.setdefault("partials", Kernel(log, "partials")))
    monkeypatch.setattr(fd, "combine_kernel", lambda *a: kernels.setdefault("combine", Kernel(log, "combine")))
    monkeypatch.setattr(fd, "_sm_count", lambda: 132)
    monkeypatch.setattr(fd, "_shared_optin", lambda: 227 * 1024)                # an H100's / H200's
    monkeypatch.setattr(fd, "_SCRATCH", {})
    monkeypatch.setattr(kc, "_numba_stream", lambda handle: f"stream {handle:#x}")
    monkeypatch.setattr(kc, "_direct_launch", direct)
    monkeypatch.setattr(kc, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(kc, "_DIRECT", {})
    monkeypatch.setattr(kc, "_PLANS", {})
    monkeypatch.setattr("numba.cuda.device_array", device_array)
    monkeypatch.setattr("numba.cuda.to_device", lambda a: device_array(a.shape, a.dtype))
    monkeypatch.setattr("numba.cuda.as_cuda_array", as_cuda_array)
    return log, imported, allocated


def arrays(base, info=Q4, n_kv=4096, capacity=None, stream=None, batch=1, masked=False):
    """(q, k_raw, v_raw, mask) at addresses from base: a Llama-3-8B layer (32 heads, 8 KV heads, D 128);
    capacity: the rows sit in a longer buffer (L = n_kv of capacity rows)."""
    rb = info.row_bytes(128)
    strides = None if capacity is None else (8 * capacity * rb, capacity * rb, rb, 1)
    q = Array((batch, 32, 128), "<f4", base, stream)
    k = Array((batch, 8, n_kv, rb), "|u1", base + (1 << 30), stream, strides)
    v = Array((batch, 8, n_kv, rb), "|u1", base + (2 << 30), stream, strides)
    mask = Array((batch, n_kv), "|b1", base + (3 << 30), stream) if masked else None
    return q, k, v, mask


def call(q, k, v, mask, info=Q4, splits=None):
    return fd.flash_decode(q, k, v, info.ggml_type, info.ggml_type, mask, 0.088, splits)


@pytest.mark.parametrize("stream, want", [(None, 0), (0x5000, 0x5000)])
def test_launches_go_to_the_stream_the_arrays_name(fake, stream, want):
    log, imported, _ = fake
    for _ in range(2):                                                        # checked, then replayed
        call(*arrays(1 << 32, stream=stream))
    assert [name for name, _, _ in log] == ["partials", "combine"] * 2        # split over the context
    assert {config[2] for _, config, _ in log} == {f"stream {want:#x}"}
    assert imported and not any(imported)                                     # no import syncs a stream


CASES = {"q4_0, split": dict(), "f16, one split (no combine)": dict(info=F16, splits=1),
         "masked, 2 sequences": dict(batch=2, masked=True),
         "rows in a longer buffer": dict(capacity=5000), "f16 rows in a longer buffer": dict(info=F16, capacity=4100)}


@pytest.mark.parametrize("case", CASES)
def test_a_replayed_call_launches_what_the_checked_path_launches(fake, case):
    log, _, _ = fake
    kw = dict(CASES[case])
    splits = kw.pop("splits", None)
    info = kw.get("info", Q4)
    call(*arrays(1 << 32, **kw), info=info, splits=splits)                   # checked, dispatcher, recorded
    first = list(log)
    assert len(kc._PLANS) == 1
    log.clear()
    call(*arrays(9 << 32, **kw), info=info, splits=splits)                   # replayed
    replayed = list(log)
    kc._PLANS.clear()
    log.clear()
    call(*arrays(9 << 32, **kw), info=info, splits=splits)                   # checked again, direct launches
    assert [(n, c) for n, c, _ in replayed] == [(n, c) for n, c, _ in log]
    assert [strip_scratch(a) for _, _, a in replayed] == [strip_scratch(a) for _, _, a in log]
    assert len(first) == len(log) and first != log                           # the addresses moved


def test_another_context_length_replays_with_its_own(fake):
    """L is not part of the key (the rows are read as their buffer's span, L is a value the replay sets)
    while the split count stays: 4000 and 4050 rows are 32 tiles each."""
    log, _, _ = fake
    call(*arrays(1 << 32, n_kv=4000, capacity=5000))
    log.clear()
    call(*arrays(1 << 32, n_kv=4050, capacity=5000))                          # replayed
    assert len(kc._PLANS) == 1
    replayed = list(log)
    kc._PLANS.clear()
    log.clear()
    call(*arrays(1 << 32, n_kv=4050, capacity=5000))                          # checked
    assert [strip_scratch(a) for _, _, a in replayed] == [strip_scratch(a) for _, _, a in log]
    assert 4050 in replayed[0][2] and 4000 not in replayed[0][2]


def strip_scratch(args):
    """A launch's arguments without the addresses of fd's own allocations (scratch, output, the no-mask
    array: from 1 << 40 here), which a new allocation moves."""
    return tuple(a[:3] if isinstance(a, tuple) and a[:1] == ("array",) and a[3] >= 1 << 40 else a for a in args)


def test_replay_allocates_only_the_output_and_reuses_the_stream_scratch(fake):
    log, _, allocated = fake
    call(*arrays(1 << 32, stream=0x5000))
    allocated.clear()
    log.clear()
    call(*arrays(5 << 32, stream=0x5000))
    call(*arrays(7 << 32, stream=0x5000))
    assert len(allocated) == 2                                                # one output per call
    partials = [a for name, _, a in log if name == "partials"]
    scratch = [(a[-2][3], a[-1][3]) for a in partials]                        # parts, meta addresses
    assert scratch[0] == scratch[1]
    allocated.clear()
    log.clear()
    call(*arrays(5 << 32, stream=0x6000))                                     # another stream: its own
    assert len(allocated) == 3                                                # parts, meta, output
    other = [a for name, _, a in log if name == "partials"][0]
    assert {other[-2][3], other[-1][3]}.isdisjoint(scratch[0])


def test_a_new_shape_is_checked_again(fake):
    log, _, _ = fake
    call(*arrays(1 << 32, capacity=5000))
    with pytest.raises(ValueError, match="C-contiguous"):                     # rows past the capacity
        q, k, v, _ = arrays(1 << 32, n_kv=4096)
        k.__cuda_array_interface__["strides"] = (8 * 100 * 18 * 4, 100 * 18 * 4, 72, 1)
        call(q, k, v, None)


def test_every_kernel_the_geometry_picks_is_generated():
    """The kernels are written out (unroll.unrolled) per type, head size and G; the simulator runs its own
    loop twin of that, so only this builds what a GPU compiles. Every V type x head size x G that
    cols_per_block picks (K q4_0), and every K type x K-groups variant (V f16), 64..256: at D 64 one batch
    holds all V steps (no later batches: an empty written-out loop, which once failed to generate)."""
    if fd.SIM:
        pytest.skip("the simulator replaces the written-out loops")
    types_ = [t.ggml_type for t in TYPES.values()]
    built = 0
    for d in (64, 128, 256):
        for tv in types_:
            for g in sorted({fd.cols_per_block(r, d, tv) for r in (1, 2, 4, 8)}):
                assert callable(fd.partials_kernel(Q4.ggml_type, tv, d, g))
                built += 1
        for tk, kg in itertools.product(types_, (0, 1, 2, 4)):
            assert callable(fd.partials_kernel(tk, F16.ggml_type, d, 4, (*fd.VARIANT[:2], kg, *fd.VARIANT[3:])))
            built += 1
    assert built >= 3 * (9 + 36)


@pytest.mark.parametrize("name, setting", [("KVLAB_FD_STAGE_V", "2"), ("KVLAB_FD_STAGE_V", "yes"),
                                           ("KVLAB_FD_PREFETCH", "-3"), ("KVLAB_FD_PREFETCH", "ahead")])
def test_a_bad_measuring_knob_is_refused_when_the_kernel_loads(name, setting):
    """The flash-decoding kernel's measuring knobs (V rows staged: 0 or 1; the L2 prefetch mode: -2 .. 16)
    stop the import with the variable named, not a bare int() traceback or a silent choice."""
    env = {**os.environ, name: setting}
    res = subprocess.run([sys.executable, "-c", "import kvlab.kernels.cuda.flash_decode"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode != 0
    assert f"{name}={setting!r}: expected one of" in res.stderr


def test_f16_v_rows_launch_with_their_dynamic_shared_memory(fake):
    """f16 V rows staged in dynamic shared memory (32 KB a block at D 128, beyond the 48 KB of static): the
    dispatcher's launch asks for them and first allows the kernel them (a pre-launch callback: CUDA refuses
    a launch above 48 KB otherwise); the replay's direct launch asks for the same bytes; q4_0 asks for none."""
    log, _, _ = fake
    assert fd.layout(F16.ggml_type, F16.ggml_type, 128, 4)["DYN_BYTES"] == 128 * 256
    for base in (1 << 32, 5 << 32):                                         # checked, then replayed
        call(*arrays(base, info=F16), info=F16)
    partials = [config for name, config, _ in log if name == "partials"]
    assert [c[3] for c in partials] == [128 * 256] * 2
    assert fd.partials_kernel().pre_launch == ["_configured.<locals>.<lambda>"]
    log.clear()
    call(*arrays(1 << 32), info=Q4)
    assert {config[3] for _, config, _ in log} == {0}


def test_staged_v_needs_room_for_its_dynamic_shared_memory():
    """Where a GPU allows a block less than 48 KB of static + the V tile (sm_75: 64 KB), the f16 V rows are
    read from global memory: the launch's variant has V staging off and asks for no dynamic shared memory."""
    f16 = F16.ggml_type
    assert fd.launch_variant(f16, f16, 128, 4, fd.VARIANT, 227 * 1024) == (fd.VARIANT, 32768)
    variant, shared = fd.launch_variant(f16, f16, 128, 4, fd.VARIANT, 64 * 1024)
    assert shared == 0 and variant[3] is False
    assert fd.layout(f16, f16, 128, 4, variant)["DYN_BYTES"] == 0
    assert fd.launch_variant(Q4.ggml_type, Q4.ggml_type, 128, 8, fd.VARIANT, 64 * 1024) == (fd.VARIANT, 0)
