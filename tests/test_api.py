"""The public API's contract: shapes, kinds (numpy/torch) and clear errors on bad input."""
import numpy as np
import pytest
import torch

import kvlab


def test_types_registry():
    assert list(kvlab.TYPES) == ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    bpw = {name: info.bits_per_weight for name, info in kvlab.TYPES.items()}
    assert bpw == {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0,
                   "iq4_nl": 4.5, "q5_0": 5.5, "q5_1": 6.0}
    assert [n for n, t in kvlab.TYPES.items() if t.is_quantized] == ["q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


@pytest.mark.parametrize("type_name", list(kvlab.TYPES))
def test_quantize_shapes_and_kinds(type_name):
    info = kvlab.TYPES[type_name]
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    q = kvlab.quantize(x, type_name)
    assert q.raw.dtype == np.uint8 and q.raw.shape == (2, 3, 64 // info.block_size * info.type_size)
    assert q.shape == x.shape and q.type == type_name and q.flavor == "ref"
    y = kvlab.dequantize(q)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    qt = kvlab.quantize(torch.from_numpy(x), type_name)
    assert isinstance(qt.raw, torch.Tensor) and qt.raw.dtype == torch.uint8
    assert qt.raw.numpy().tobytes() == q.raw.tobytes()
    yt = kvlab.dequantize(qt)
    assert isinstance(yt, torch.Tensor) and yt.numpy().tobytes() == y.tobytes()
    again = kvlab.QTensor.from_raw(q.raw, type_name, x.shape)
    assert kvlab.dequantize(again).tobytes() == y.tobytes()


def test_non_contiguous_input_gives_the_same_bytes():
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    assert kvlab.quantize(x.T, "q4_0").raw.tobytes() == kvlab.quantize(np.ascontiguousarray(x.T), "q4_0").raw.tobytes()


def test_set_rows_writes_the_rows_quantize_writes():
    rng = np.random.default_rng(2)
    cache = kvlab.empty_cache(10, 128, "q8_0")
    values = rng.standard_normal((3, 128)).astype(np.float32)
    kvlab.set_rows(cache, np.array([7, 2, 5]), values)
    expected = kvlab.quantize(values, "q8_0").raw
    assert cache.raw[[7, 2, 5]].tobytes() == expected.tobytes()
    assert not cache.raw[[0, 1, 3, 4, 6, 8, 9]].any()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: kvlab.quantize(np.zeros((2, 48), np.float32), "q4_0"), ValueError, "multiple of the block size 32"),
    (lambda: kvlab.quantize(np.zeros((2, 64), np.float32), "q4_2"), ValueError, "unknown KV type 'q4_2'"),
    (lambda: kvlab.quantize(np.zeros((2, 64), np.float32), "q4_0", flavor="avx"), ValueError, "unknown flavor 'avx'"),
    (lambda: kvlab.quantize(np.zeros((2, 64), np.int32), "q8_0"), TypeError, "expected dtype float32"),
    (lambda: kvlab.quantize([1.0] * 32, "q8_0"), TypeError, "numpy array or torch tensor, got list"),
    (lambda: kvlab.quantize(np.zeros((), np.float32), "q8_0"), ValueError, "at least one dimension"),
    (lambda: kvlab.dequantize(np.zeros(34, np.uint8)), TypeError, "expected a QTensor"),
    (lambda: kvlab.QTensor.from_raw(np.zeros((2, 33), np.uint8), "q8_0", (2, 32)), ValueError, "need \\(2, 34\\)"),
    (lambda: kvlab.set_rows(kvlab.empty_cache(4, 32, "q8_0"), np.array([4]), np.zeros((1, 32), np.float32)),
     ValueError, "row ids must lie in"),
    (lambda: kvlab.set_rows(kvlab.empty_cache(4, 32, "q8_0"), np.array([0.5]), np.zeros((1, 32), np.float32)),
     TypeError, "1-D integer"),
    (lambda: kvlab.set_rows(kvlab.empty_cache(4, 32, "q8_0"), np.array([1]), np.zeros((1, 64), np.float32)),
     ValueError, "do not fit"),
])
def test_bad_input_gets_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cuda_tensor_without_gpu_gives_a_clear_error():
    class FakeCudaArray:
        __cuda_array_interface__ = {"shape": (2, 32), "typestr": "<f4", "data": (0, False), "version": 3}
        shape = (2, 32)
    with pytest.raises((RuntimeError, ImportError), match="(?i)cuda|gpu"):
        kvlab.quantize(FakeCudaArray(), "q8_0")
