"""The boundary of the kernels (issue 16): a QTensor always describes its real buffer, set_rows writes into
the caller's buffer or refuses, and nothing reaches a kernel (which has no bounds checks) unchecked."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import kvlab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _values(rows, cols=64, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("raw,type_name,shape,exc,match", [
    (np.zeros((1, 68), np.uint8), "q8_0", (1, 32), ValueError, r"need \(1, 34\)"),    # wrote past its output
    (np.zeros((1, 17), np.uint8), "q8_0", (1, 32), ValueError, r"need \(1, 34\)"),    # read past its input
    (np.zeros((4, 36), np.uint8), "q4_0", (4, 64.9), TypeError, "integers"),          # truncated to 64 before
    (np.zeros((4, 36), np.uint8), "q4_0", (4.0, 64), TypeError, "integers"),
    (np.zeros((4, 36), np.uint8), "q4_0", (True, 64), TypeError, "integers"),
    (np.zeros((4, 36), np.uint8), "q4_0", (-4, 64), ValueError, "negative"),
    (np.zeros((4, 36), np.uint8), "q4_0", 64, TypeError, "sequence of integers"),
    (np.zeros((4, 36), np.int8), "q4_0", (4, 64), TypeError, "uint8"),
    (np.zeros((4, 9), np.float32), "q4_0", (4, 64), TypeError, "uint8"),
    (torch.zeros((4, 36), dtype=torch.int16), "q4_0", (4, 64), TypeError, "uint8"),
    (np.ma.masked_array(np.zeros((4, 36), np.uint8)), "q4_0", (4, 64), TypeError, "masked"),
    ([0] * 36, "q4_0", (1, 64), TypeError, "numpy array or torch tensor"),
    (np.zeros((4, 36), np.uint8), "q4_0", (4, 48), ValueError, "multiple of the block size"),
    (np.zeros((4, 36), np.uint8), "q4_9", (4, 64), ValueError, "unknown KV type"),
])
def test_qtensor_is_checked_on_construction(raw, type_name, shape, exc, match):
    for make in (kvlab.QTensor, kvlab.QTensor.from_raw):
        with pytest.raises(exc, match=match):
            make(raw, type_name, shape)


def test_qtensor_is_frozen_and_keeps_ints():
    q = kvlab.quantize(_values(2), "q4_0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.shape = (2, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.raw = np.zeros((2, 72), np.uint8)
    wrapped = kvlab.QTensor(q.raw, "Q4_0", (np.int64(2), np.int32(64)))
    assert wrapped.type == "q4_0" and wrapped.shape == (2, 64) and all(type(d) is int for d in wrapped.shape)
    with pytest.raises(ValueError, match="need"):
        dataclasses.replace(q, shape=(2, 128))        # replace re-runs the checks


def test_entry_points_check_the_buffer_as_it_is_now():
    q = kvlab.QTensor(np.zeros((4, 36), np.uint8), "q4_0", (4, 64))
    q.raw.resize((2, 36), refcheck=False)               # the array shrank after it was wrapped
    with pytest.raises(ValueError, match=r"raw has shape \(2, 36\)"):
        kvlab.dequantize(q)
    with pytest.raises(ValueError, match=r"raw has shape \(2, 36\)"):
        kvlab.set_rows(q, np.array([3]), _values(1))
    t = kvlab.quantize(torch.from_numpy(_values(4)), "q8_0")
    t.raw.resize_(1, 68)
    with pytest.raises(ValueError, match=r"raw has shape \(1, 68\)"):
        kvlab.dequantize(t)


def test_corrupted_qtensor_into_the_kernels_fails_cleanly_in_a_subprocess():
    """Bypassing the frozen dataclass is still caught before the kernel: a crash would fail the test."""
    script = textwrap.dedent("""
        import numpy as np, kvlab
        q = kvlab.quantize(np.ones((1, 32), np.float32), "q8_0")
        object.__setattr__(q, "raw", np.zeros((1, 68), np.uint8))   # what dequantize overran before
        try:
            kvlab.dequantize(q)
        except ValueError as e:
            print("refused:", e)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("refused:") and "need (1, 34)" in res.stdout
    assert "Traceback" not in res.stderr


def _strided_caches(type_name):
    """(cache, numpy view of its bytes) pairs whose raw is not C-contiguous, each in a bigger buffer."""
    info = kvlab.TYPES[type_name]
    rb = info.row_bytes(64)
    big = np.zeros((6, 2 * rb), np.uint8)                       # 2 heads per row: the cache is head 1
    fortran = np.asfortranarray(np.zeros((6, rb), np.uint8))
    reversed_rows = np.zeros((6, rb), np.uint8)[::-1]           # negative strides
    tbig = torch.zeros((6, 2 * rb), dtype=torch.uint8)
    return [(big[:, rb:], big), (fortran, fortran), (reversed_rows, reversed_rows.base), (tbig[:, rb:], tbig.numpy())]


@pytest.mark.parametrize("type_name", ["q4_0", "f16"])
def test_set_rows_writes_into_a_strided_cache_in_place(type_name):
    values = _values(3, seed=4)
    want = kvlab.quantize(values, type_name).raw
    for raw, owner in _strided_caches(type_name):
        before = np.array(owner)
        cache = kvlab.QTensor(raw, type_name, (6, 64))
        assert kvlab.set_rows(cache, np.array([5, 0, 2]), values) is cache
        got = raw.numpy() if isinstance(raw, torch.Tensor) else raw
        assert got[[5, 0, 2]].tobytes() == want.tobytes()           # the caller's buffer holds the rows
        assert not got[[1, 3, 4]].any()
        assert (np.array(owner) != before).any()                   # ... written through the view, not a copy


def test_set_rows_refuses_what_it_cannot_write():
    cache = kvlab.empty_cache(4, 32, "q8_0")
    with pytest.raises(ValueError, match="distinct"):
        kvlab.set_rows(cache, np.array([1, 1]), _values(2, 32))
    ro = np.zeros((4, 34), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kvlab.set_rows(kvlab.QTensor(ro, "q8_0", (4, 32)), np.array([1]), _values(1, 32))
    with pytest.raises(ValueError, match="row dimension"):
        kvlab.set_rows(kvlab.QTensor(np.zeros(34, np.uint8), "q8_0", (32,)), np.array([0]), _values(1, 32))
    with pytest.raises(TypeError, match="values must be"):
        kvlab.set_rows(cache, np.array([0]), [[0.0] * 32])
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        kvlab.set_rows(cache, torch.tensor([-1]), _values(1, 32))
    assert not cache.raw.any()
    kvlab.set_rows(cache, [], np.zeros((0, 32), np.float32))      # nothing to write is fine


@pytest.mark.parametrize("type_name", ["q4_0", "iq4_nl", "bf16"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_out_is_the_callers_buffer(type_name, kind):
    """quantize(out=) / dequantize(out=) write the caller's buffer in place and hand it back: the same bytes
    and values as the allocating calls."""
    x = _values(3, seed=5)
    q = kvlab.quantize(x, type_name)
    make = (lambda a: a) if kind == "numpy" else torch.from_numpy
    raw, values = make(np.full(q.raw.shape, 0xAB, np.uint8)), make(np.full(x.shape, np.nan, np.float32))
    assert kvlab.quantize(make(x), type_name, out=raw).raw is raw
    assert np.asarray(raw).tobytes() == q.raw.tobytes()
    assert kvlab.dequantize(kvlab.QTensor(make(q.raw), type_name, x.shape), out=values) is values
    assert np.array_equal(np.asarray(values), kvlab.dequantize(q), equal_nan=True)


GPU = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                         reason="needs a CUDA GPU (torch.cuda); the simulator's twin is in tests/kernels/test_cuda_sim.py")


@GPU
@pytest.mark.parametrize("type_name", ["q4_0", "q8_0", "iq4_nl", "q5_1", "f16", "bf16"])
def test_out_on_the_gpu_is_the_callers_buffer(type_name):
    """The same on a real GPU with torch CUDA tensors: written in place, handed back, the CPU kernels' bytes
    (cuda flavor) and values; a second call into the same buffers (the replayed launch) too."""
    x = _values(5, 256, seed=7)
    want = kvlab.quantize(x, type_name, "cuda")
    dev = torch.from_numpy(x).cuda()
    raw = torch.full(tuple(want.raw.shape), 0xAB, dtype=torch.uint8, device="cuda")
    values = torch.full(x.shape, float("nan"), device="cuda")
    for _ in range(2):
        assert kvlab.quantize(dev, type_name, "cuda", out=raw).raw is raw
        q = kvlab.QTensor(raw, type_name, x.shape, "cuda")
        assert kvlab.dequantize(q, out=values) is values
        torch.cuda.synchronize()
        assert raw.cpu().numpy().tobytes() == want.raw.tobytes()
        assert values.cpu().numpy().view(np.uint32).tobytes() == kvlab.dequantize(want).view(np.uint32).tobytes()


@GPU
def test_out_on_the_gpu_refused_before_anything_is_written():
    x = torch.from_numpy(_values(2, seed=8)).cuda()
    q = kvlab.quantize(x, "q8_0", "cuda")
    wide = torch.zeros((2, 128), device="cuda")
    for out, exc, match in [(torch.zeros((2, 64), dtype=torch.float64, device="cuda"), TypeError, "dtype float32"),
                            (torch.zeros((2, 32), device="cuda"), ValueError, "shape"),
                            (wide[:, ::2], ValueError, "C-contiguous"),
                            (torch.zeros((2, 64)), TypeError, "GPU array"),
                            (np.zeros((2, 64), np.float32), TypeError, "GPU array")]:
        with pytest.raises(exc, match=match):
            kvlab.dequantize(q, out=out)
    xs = torch.zeros((2, 64), device="cuda")          # bytes written over the values being read: refused
    with pytest.raises(ValueError, match="shares memory"):
        kvlab.quantize(xs, "q8_0", out=xs.view(torch.uint8).reshape(-1)[:2 * 68].reshape(2, 68))
    torch.cuda.synchronize()
    assert not wide.any() and not xs.any()


def test_out_refused_before_anything_is_written():
    x = _values(2, seed=6)
    q = kvlab.quantize(x, "q8_0")
    ro = np.zeros(x.shape, np.float32)
    ro.flags.writeable = False
    wide = np.zeros((2, 128), np.float32)
    for out, exc, match in [(np.zeros(x.shape, np.float64), TypeError, "dtype float32"),
                            (np.zeros((2, 32), np.float32), ValueError, "shape"),
                            (wide[:, ::2], ValueError, "C-contiguous"),
                            (ro, ValueError, "read-only"),
                            (x.tolist(), TypeError, "host array"),
                            (q.raw.view(np.float32)[:, :8].reshape(2, 8), ValueError, "shape")]:
        with pytest.raises(exc, match=match):
            kvlab.dequantize(q, out=out)
    assert not wide.any()
    xs = np.zeros((2, 64), np.float32)             # bytes written over the values being read: refused
    with pytest.raises(ValueError, match="shares memory"):
        kvlab.quantize(xs, "q8_0", out=xs.view(np.uint8).reshape(-1)[:2 * 68].reshape(2, 68))
    assert not xs.any()


SIM_SCRIPT = textwrap.dedent(r"""
    import numpy as np
    from numba import cuda
    import kvlab, kvlab.kernels.cuda as kc
    out = []
    def refused(what, fn, exc=ValueError):
        try:
            fn()
            out.append(f"{what}: NOT REFUSED")
        except exc as e:
            out.append(f"{what}: refused")
    v = np.ones((2, 64), np.float32)
    Q40 = kvlab.TYPES["q4_0"]
    cache = cuda.to_device(np.zeros((4, 36), np.uint8))
    refused("low-level set_rows id 4 of 4", lambda: kc.set_rows(cache, cuda.to_device(np.array([0, 4])),
                                                                cuda.to_device(v), Q40, 0))
    refused("low-level set_rows id -1", lambda: kc.set_rows(cache, cuda.to_device(np.array([-1, 0])),
                                                            cuda.to_device(v), Q40, 0))
    refused("low-level flavor 7", lambda: kc.quantize(cuda.to_device(v), cuda.to_device(np.zeros((2, 36), np.uint8)),
                                                      Q40, 7))
    wide = cuda.to_device(np.zeros((4, 72), np.uint8))
    head = kvlab.QTensor(wide[:, 36:], "q4_0", (4, 64))
    refused("strided device cache", lambda: kvlab.set_rows(head, np.array([0, 1]), cuda.to_device(v)))
    refused("device QTensor of the wrong shape", lambda: kvlab.QTensor(cuda.to_device(np.zeros((4, 35), np.uint8)),
                                                                       "q4_0", (4, 64)))
    refused("host values into a device cache", lambda: kvlab.set_rows(kvlab.QTensor(cache, "q4_0", (4, 64)),
                                                                      np.array([0, 1]), v), TypeError)
    dq = kvlab.quantize(cuda.to_device(v), "q4_0")
    refused("dequantize(out=) on the host for a device QTensor", lambda: kvlab.dequantize(dq, out=np.zeros((2, 64),
                                                                                            np.float32)), TypeError)
    refused("dequantize(out=) of the wrong dtype", lambda: kvlab.dequantize(dq, out=cuda.to_device(np.zeros((2, 64)))),
            TypeError)
    refused("quantize(out=) of the wrong shape", lambda: kvlab.quantize(cuda.to_device(v), "q4_0",
                                                                       out=cuda.to_device(np.zeros((2, 35), np.uint8))))
    kc.set_rows(cache, cuda.to_device(np.array([3, 0])), cuda.to_device(v), Q40, 0)
    host = cache.copy_to_host()
    ok = host[3].tobytes() == kvlab.quantize(v[:1], "q4_0").raw.tobytes() and not host[1:3].any()
    out.append("in-range set_rows: " + ("written" if ok else "WRONG"))
    print("\n".join(out))
""")


def test_gpu_entry_points_check_before_launch_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", SIM_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 10 and all(l.endswith(("refused", "written")) for l in lines), res.stdout
