"""kvlab.hadamard / rotate / rotation_plan against llama.cpp (src/llama-kv-cache.cpp, src/llama-graph.cpp)."""
import numpy as np
import pytest
import torch

import kvlab


@pytest.mark.parametrize("n", [64, 128, 256, 512])
def test_hadamard_bytes_equal_ggml_gen_hadamard(n, golden):
    # golden made by compiling llama.cpp's own ggml_gen_hadamard (tools/make_hadamard_golden.sh)
    assert kvlab.hadamard(n).tobytes() == golden("hadamard.npz")[str(n)].tobytes()


@pytest.mark.parametrize("n", [64, 128, 256])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_rotate_equals_matmul_within_stated_bound(n, scale):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((7, 3 * n)) * scale).astype(np.float32)
    got = kvlab.rotate(x, n).reshape(-1, n).astype(np.float64)                     # (n_chunks, n)
    exact = x.reshape(-1, n).astype(np.float64) @ kvlab.hadamard(n).astype(np.float64)
    rel = np.linalg.norm(got - exact, axis=1) / np.linalg.norm(exact, axis=1)
    bound = (np.log2(n) + 1) * 2.0 ** -24                                          # see rotate's docstring
    assert rel.max() <= bound, (rel.max(), bound)


def test_rotate_twice_is_identity_and_keeps_torch():
    x = torch.randn(4, 256)
    y = kvlab.rotate(kvlab.rotate(x, 128), 128)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-5)


def test_rotate_spreads_an_outlier():
    x = np.zeros((1, 128), np.float32)
    x[0, 3] = 100.0
    y = kvlab.rotate(x, 128)
    assert np.allclose(np.abs(y), 100.0 / np.sqrt(128))


@pytest.mark.parametrize("bad", [0, 3, 48, 100, -64, 64.0])
def test_rotation_size_must_be_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        kvlab.hadamard(bad)


def test_rotate_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="multiple of the rotation size 128"):
        kvlab.rotate(np.zeros((2, 96), np.float32), 128)
    with pytest.raises(TypeError, match="float32"):
        kvlab.rotate(np.zeros((2, 128), np.float64), 128)


@pytest.mark.parametrize("head_dim,expect_k", [(64, 64), (128, 128), (256, 256), (192, 64), (320, 64),
                                               (512, 512), (80, None), (96, None)])
def test_rotation_plan_sizes(head_dim, expect_k):
    plan = kvlab.rotation_plan("q4_0", "q4_0", head_dim, disable=False)
    assert plan.k == expect_k
    assert plan.v == (64 if head_dim % 64 == 0 else None)


@pytest.mark.parametrize("tk", list(kvlab.TYPES))
@pytest.mark.parametrize("tv", ["f16", "q8_0"])
def test_rotation_plan_gate_is_per_side_and_needs_a_quantized_type(tk, tv):
    plan = kvlab.rotation_plan(tk, tv, 128, disable=False)
    assert (plan.k is not None) == kvlab.TYPES[tk].is_quantized
    assert (plan.v is not None) == kvlab.TYPES[tv].is_quantized


@pytest.mark.parametrize("value,disabled", [("1", True), ("2", True), ("0", False), ("", False),
                                            ("abc", False), ("1abc", True)])
def test_llama_attn_rot_disable_is_read_like_atoi(monkeypatch, value, disabled):
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", value)
    assert (not kvlab.rotation_plan("q4_0", "q4_0", 128).any) == disabled
