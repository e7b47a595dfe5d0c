"""kvlab.rope: ggml_rope_ext's two pairings, one function for every caller (split.sharded, tp, accuracy)."""
import numpy as np
import pytest

from kvlab.rope import rope


@pytest.mark.parametrize("mode", ["normal", "neox"])
def test_rope_is_a_rotation_that_keeps_relative_position(mode):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 1, 64))
    dot = lambda p, s: float((rope(a, np.array([p]), 1e4, mode) * rope(b, np.array([s]), 1e4, mode)).sum())
    assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-9)
    assert dot(10, 3) != pytest.approx(dot(10, 4), rel=1e-3)   # the angle depends on the distance


def test_the_pairings_differ_and_match_ggml_at_one_pair():
    x = np.zeros(8)
    x[0] = 1.0                                                     # value 0 pairs with 1 (normal) or 4 (neox)
    theta = 3 * 1e4 ** 0.0                                         # pair 0 turns by pos * base**0
    normal, neox = rope(x, 3, 1e4, "normal"), rope(x, 3, 1e4, "neox")
    assert normal[[0, 1]] == pytest.approx([np.cos(theta), np.sin(theta)]) and not normal[2:].any()
    assert neox[[0, 4]] == pytest.approx([np.cos(theta), np.sin(theta)]) and not neox[[1, 2, 3, 5, 6, 7]].any()


def test_values_past_n_rot_pass_through_and_dtype_is_kept():
    x = np.random.default_rng(1).standard_normal((3, 2, 64)).astype(np.float32)
    out = rope(x, np.arange(3)[:, None], 500.0, n_rot=32)
    assert out.dtype == np.float32 and np.array_equal(out[..., 32:], x[..., 32:])
    assert not np.array_equal(out[1:, :, :32], x[1:, :, :32])


def test_torch_gives_the_numpy_bits():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((4, 5, 128)).astype(np.float32)
    for mode in ("normal", "neox"):
        want = rope(x, np.arange(100, 105), 1e4, mode)
        got = rope(torch.from_numpy(x), np.arange(100, 105), 1e4, mode)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rope mode"):
        rope(np.zeros(8), 0, 1e4, "glm")
    with pytest.raises(ValueError, match="n_rot"):
        rope(np.zeros(8), 0, 1e4, n_rot=10)
