"""The host side of bench/fa_cuda_ggml.py (ggml-cuda's vector kernel against kvlab's CUDA flash_decode),
on the CPU: the ctypes signatures against the C prototypes of tools/cuda_golden/fattn_harness.cu, the
byte strides handed to the kernel, and the measures the comparison reports. The kernels themselves run
only on the GPU machine (the bench)."""
import ctypes
import importlib.util
import re

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

HARNESS = ROOT / "tools" / "cuda_golden" / "fattn_harness.cu"
C_TYPES = {"int": ctypes.c_int, "float": ctypes.c_float, "int64_t": ctypes.c_int64}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fa_cuda_ggml", ROOT / "bench" / "fa_cuda_ggml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def c_argtypes(name: str) -> list:
    """The ctypes types of the parameters of the extern "C" function `name` in the harness."""
    params = re.search(rf"\bint {name}\(([^)]*)\)\s*{{", HARNESS.read_text()).group(1)
    types = []
    for param in params.split(","):
        words = param.replace("*", " * ").split()
        types.append(ctypes.c_void_p if "*" in words else C_TYPES[words[-2]])
    return types


@pytest.mark.parametrize("name, attr", [("fattn_vec", "VEC_ARGTYPES"), ("fattn_set_rows", "SET_ROWS_ARGTYPES"),
                                        ("fattn_parallel_blocks", "SPLITS_ARGTYPES"),
                                        ("fattn_vec_time", "VEC_TIME_ARGTYPES")])
def test_ctypes_signatures_match_the_harness(bench, name, attr):
    assert getattr(bench, attr) == c_argtypes(name)


def test_ggml_strides_of_a_cache_view(bench):
    buf = torch.zeros((2, 3, 16, 18), dtype=torch.uint8)        # (B, Hkv, capacity, row_bytes)
    view = buf[:, :, :10]                                        # 10 of 16 rows filled
    assert bench.ggml_strides(view) == (18, 16 * 18, 3 * 16 * 18)
    with pytest.raises(ValueError):
        bench.ggml_strides(buf.transpose(1, 2))                  # heads inside tokens: not ggml rows of this view
    with pytest.raises(ValueError):
        bench.ggml_strides(buf[..., :9])                         # rows cut short


def test_mask_as_ggml_f16(bench):
    m = bench.additive_mask(torch.tensor([[True, False, True]]))
    assert m.dtype == torch.float16 and m.tolist() == [[0.0, float("-inf"), 0.0]]


def test_compare_counts_bits_and_ulps(bench):
    theirs = np.array([1.0, -2.0, 0.0, 3.0], np.float32)
    ours = theirs.copy()
    ours[0] = np.nextafter(ours[0], np.float32(2))               # 1 ulp up
    ours[1] = np.nextafter(np.nextafter(ours[1], np.float32(0)), np.float32(0))   # 2 ulps toward zero
    ours[2] = np.float32(-0.0)                                   # other bits, same value
    r = bench.compare(ours, theirs, exact_norm=1.0)
    assert (r["values"], r["equal"], r["max_ulp"]) == (4, 1, 2)
    assert r["max_abs"] == pytest.approx(2.0 ** -22)
    tiny = np.array([np.float32(1e-45)], np.float32)             # the smallest subnormal, either sign: 2 ulps apart
    assert bench.compare(-tiny, tiny, 1.0)["max_ulp"] == 2


def test_quant_error_unrotates_the_output(bench):
    from kvlab.accuracy.attention import unrotate
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((4, 128))
    out_rot = unrotate(exact, 64).astype(np.float32)             # what the kernel returns: the rotated basis
    err = bench.quant_error(out_rot, 64, exact)
    assert err["quant_rel_l2"] < 1e-6                            # only float32 rounding
    assert bench.quant_error(out_rot, None, exact)["quant_rel_l2"] > 0.5


def test_worst_ratio(bench):
    same = {"diff_rel_l2": 0.0}
    assert bench.worst_ratio(1e-3, [same, same]) is None
    assert bench.worst_ratio(1e-3, [same, {"diff_rel_l2": 1e-7}, {"diff_rel_l2": 1e-8}]) == pytest.approx(1e4)


def test_kvlab_splits_follow_the_blocks_heads(bench):
    """kvlab's split count for a case: plan() over blocks of cols_per_block heads, which depends on V's type
    (f16/bf16 V: at most 4 heads a block)."""
    from kvlab.kernels.cuda import flash_decode as fd
    f16, q4_0 = 1, 2
    assert fd.cols_per_block(8, 128, q4_0) == 8 and fd.cols_per_block(8, 128, f16) == 4
    assert bench.kvlab_splits(16, 8, 128, 4096, 132, f16) == fd.plan(16 // 4, 4096, 132)[0]
    assert bench.kvlab_splits(16, 8, 128, 4096, 132, q4_0) == fd.plan(16 // 8, 4096, 132)[0]
