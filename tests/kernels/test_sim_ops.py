"""The CUDA simulator's stand-ins for GPU instructions (kvlab.kernels.cuda.sim_ops) against the hardware
they stand for where this machine has it: fma against the CPU's fused multiply-add (llvm.fma.f32 through
kvlab.kernels.fp.fma32), bit for bit, signed zeros and ties included."""
import numpy as np
from numba import njit

from kvlab.kernels.cuda import sim_ops
from kvlab.kernels.fp import fma32


@njit(cache=True)
def _hardware_fma(a, b, c, out):
    for i in range(a.size):
        out[i] = fma32(a[i], b[i], c[i])


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_fma_equals_the_hardware_bit_for_bit():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(3000).astype(np.float32) for _ in range(3))
    c[:1000] = -(a[:1000] * b[:1000])                  # near-cancellation: the rounding of the product matters
    zeros = np.array([0.0, -0.0], np.float32)
    grid = np.array([(x, y, z) for x in (0.0, -0.0, 1.0, -1.0) for y in (0.0, -0.0, 1.0, -1.0)
                     for z in (0.0, -0.0, 1.0, -1.0)], np.float32)   # every signed-zero and cancelling case
    big = np.array([(3e38, 2.0, -3e38), (1e-45, 0.5, 0.0), (-1e-45, 0.5, -0.0), (np.inf, 0.0, 1.0)], np.float32)
    a, b, c = (np.concatenate([v, grid[:, i], big[:, i], zeros]) for i, v in enumerate((a, b, c)))
    want = np.empty_like(a)
    _hardware_fma(a, b, c, want)
    got = np.array([sim_ops.fma(x, y, z) for x, y, z in zip(a, b, c)], np.float32)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    bad = np.flatnonzero(_bits(got)[~nan] != _bits(want)[~nan])
    assert bad.size == 0, [(a[~nan][i], b[~nan][i], c[~nan][i], got[~nan][i], want[~nan][i]) for i in bad[:5]]
