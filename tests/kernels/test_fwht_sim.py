"""The column stages of the CUDA rotation (kernels/cuda/fwht.py: n = 64 .. 256 by warp shuffle, 512 in
shared memory) under the Numba CUDA simulator, on values where a + b and a - b are easy to get wrong:
signed zeros, subnormals, sums that overflow to Inf (and Inf - Inf = NaN a stage later), NaN and Inf
inputs. rotate, rotate_quantize (every block type, the flavors in turn) and dequantize_unrotate against
the CPU's kvlab.rotate and kernels, as bytes.

Float outputs are compared as bits, except that any NaN equals any NaN: the GPU's add.rn / fma.rn give
their one canonical NaN, the CPU's addss the payload of an operand, so a NaN's payload says nothing of the
transform. The quantized bytes are compared whole.

The simulator must be chosen before numba.cuda is first imported: one subprocess (this file run as a
script) runs every kernel, each output is then its own test.
"""
import sys

import numpy as np
import pytest

import kvlab
from kvlab.types import FLAVORS, TYPES

pytestmark = pytest.mark.cudasim

SHAPE = (4, 512)                    # 64 blocks of 32: the simulator's TPB = 16, so 4 CUDA blocks
NS = (64, 128, 256, 512)
QUANTIZED = ("q8_0", "q4_1")        # rotate_quantize: the rotation's floats decide every byte
DEQUANTIZED = "q5_0"                # dequantize_unrotate


def _zeros(rng):
    return np.where(rng.random(SHAPE) < 0.5, np.float32(0.0), np.float32(-0.0))


def _subnormals(rng):
    """Small multiples of the least subnormal (every sum exact) beside signed zeros and larger subnormals."""
    tiny = rng.integers(-8, 9, SHAPE).astype(np.float32) * np.float32(2.0 ** -149)
    wide = (rng.standard_normal(SHAPE) * 2.0 ** -128).astype(np.float32)
    return np.where(rng.random(SHAPE) < 0.5, tiny, wide) * np.where(rng.random(SHAPE) < 0.1, 0, 1).astype(np.float32)


def _overflow(rng):
    """+-3e38 beside +-1: stage sums overflow to +-Inf, and Inf - Inf gives NaN a stage later."""
    big = np.where(rng.random(SHAPE) < 0.5, np.float32(3e38), np.float32(-3e38))
    return np.where(rng.random(SHAPE) < 0.05, big, rng.standard_normal(SHAPE).astype(np.float32))


def _nan_inf(rng):
    """One NaN, +Inf or -Inf now and then in normal values (a chunk that holds one is all NaN or Inf after)."""
    x = rng.standard_normal(SHAPE).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf], np.float32)[rng.integers(0, 3, SHAPE)]
    return np.where(rng.random(SHAPE) < 0.003, special, x)


def _normal(rng):
    return (rng.standard_normal(SHAPE) * np.exp2(rng.integers(-20, 20, (SHAPE[0], 1)))).astype(np.float32)


CASES = {"zeros": _zeros, "subnormals": _subnormals, "overflow": _overflow, "nan_inf": _nan_inf, "normal": _normal}


def inputs():
    rng = np.random.default_rng(19)
    return {case: make(rng) for case, make in CASES.items()}


def flavor_of(type_name, n):
    """The flavors in turn, over types and n."""
    return FLAVORS[((QUANTIZED + (DEQUANTIZED,)).index(type_name) + NS.index(n)) % len(FLAVORS)]


def run(out_path):
    """Every kernel under the simulator (this process chose it), outputs saved to out_path (.npz)."""
    from numba import cuda
    import kvlab.kernels.cuda as kc
    from kvlab.rotation import hadamard_scale
    out = {}
    for case, x in inputs().items():
        xd = cuda.to_device(x)
        for n in NS:
            rot = cuda.to_device(np.zeros(SHAPE, np.float32))
            kc.rotate(xd, rot, n, hadamard_scale(n))
            out[f"rotate/{case}/{n}"] = rot.copy_to_host()
            for name in QUANTIZED:
                info = TYPES[name]
                raw = cuda.to_device(np.zeros((SHAPE[0], info.row_bytes(SHAPE[1])), np.uint8))
                kc.rotate_quantize(xd, raw, info, FLAVORS.index(flavor_of(name, n)), n, hadamard_scale(n))
                out[f"rotate_quantize/{case}/{n}/{name}"] = raw.copy_to_host()
            back = cuda.to_device(np.zeros(SHAPE, np.float32))
            q = kvlab.quantize(x, DEQUANTIZED, flavor_of(DEQUANTIZED, n)).raw
            kc.dequantize_unrotate(cuda.to_device(q), back, TYPES[DEQUANTIZED], n, hadamard_scale(n))
            out[f"dequantize_unrotate/{case}/{n}"] = back.copy_to_host()
    np.savez(out_path, **out)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from .simulated import simulated_outputs
    return simulated_outputs(__file__, tmp_path_factory.mktemp("fwht_sim"))


@pytest.fixture(scope="module")
def cases():
    return inputs()


def assert_same_floats(got, want, what):
    g, w = got.view(np.uint32), want.view(np.uint32)
    differ = (g != w) & ~(np.isnan(got) & np.isnan(want))
    if differ.any():
        k = int(np.argmax(differ.reshape(-1)))
        pytest.fail(f"{what}: {int(differ.sum())} of {differ.size} values differ; first, value {k}: "
                    f"got {g.reshape(-1)[k]:#010x}, expected {w.reshape(-1)[k]:#010x}", pytrace=False)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_rotate_equals_cpu(case, n, sim, cases):
    assert_same_floats(sim[f"rotate/{case}/{n}"], kvlab.rotate(cases[case], n), f"rotate {case} n={n}")


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_rotate_quantize_equals_rotate_then_quantize(case, n, name, sim, cases):
    want = kvlab.quantize(kvlab.rotate(cases[case], n), name, flavor_of(name, n)).raw
    got = sim[f"rotate_quantize/{case}/{n}/{name}"]
    width = TYPES[name].type_size
    differ = (got != want).reshape(-1, width).any(axis=1)
    assert not differ.any(), f"{name} {flavor_of(name, n)} {case} n={n}: blocks {np.flatnonzero(differ)[:8]} differ"


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_dequantize_unrotate_equals_dequantize_then_rotate(case, n, sim, cases):
    q = kvlab.quantize(cases[case], DEQUANTIZED, flavor_of(DEQUANTIZED, n))
    assert_same_floats(sim[f"dequantize_unrotate/{case}/{n}"], kvlab.rotate(kvlab.dequantize(q), n),
                       f"dequantize_unrotate {DEQUANTIZED} {case} n={n}")


if __name__ == "__main__":
    run(sys.argv[1])
