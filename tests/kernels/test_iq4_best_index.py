"""iq4_nl's best index in the CUDA quantizer (kernels/cuda/quantizers.py: floors by rounding toward -inf
and a bucket table whose entry, added to the floor's bits, carries the index into the top 4 bits),
under the Numba CUDA simulator: against the CPU kernel's best_index on every floor class u = floor(2x)
+ 256 (its lowest, middle and highest values) and on specials; the simulator's fma.rm twin against
exact floors; and whole blocks of values at and beside every decision point and bucket edge through
the quantize kernel, every flavor, against the CPU kernels' bytes.

    NUMBA_ENABLE_CUDASIM=1 python test_iq4_best_index.py OUT.npz      (what the fixture runs)
"""
import sys

import numpy as np
import pytest

import kvlab
from kvlab.kernels.iq4_nl import KVALUES_F32, best_index
from kvlab.types import FLAVORS

pytestmark = pytest.mark.cudasim

F = np.float32
_SPECIALS = F([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 254.0003, -254.0003, 255.99998, -256.0])


def floor_class_ys():
    """For every u in 0 .. 511: y = u - 256, u - 255.5 and the float below u - 255 (all floor to u - 256)."""
    u = np.arange(512, dtype=F) - F(256)
    return np.concatenate([u, u + F(0.5), np.nextafter(u + F(1), F(-np.inf))])


def edge_xs():
    """x at and beside every decision point m = (KVALUES[k] + KVALUES[k + 1]) / 2 and every bucket edge
    (2x a multiple of 16), and specials; all within (-127, 127)."""
    points = (KVALUES_F32[:-1] + KVALUES_F32[1:]) / F(2)
    edges = np.arange(-120, 127, 8, dtype=F)
    centre = np.concatenate([points, edges])
    xs = np.concatenate([centre, np.nextafter(centre, F(np.inf)), np.nextafter(centre, F(-np.inf)),
                         F([0.0, -0.0, 1e-45, -1e-45, 126.99999, -126.99999])])
    return xs[np.abs(xs) < 127]


def edge_blocks():
    """Blocks led by -127 (the ref's d is then 1, x = v) and filled with edge_xs in turn; then the same
    with a NaN and with an infinity (the clamped path)."""
    xs = edge_xs()
    n = -(-xs.size // 31)
    body = np.resize(xs, (n, 31))
    rows = np.concatenate([np.full((n, 1), F(-127)), body], axis=1)
    special = rows[:2].copy()
    special[0, 7] = F(np.nan)
    special[1, 9] = F(np.inf)
    return np.ascontiguousarray(np.concatenate([rows, special]).reshape(1, -1))


def run(out_path):
    from numba import cuda

    import kvlab.kernels.cuda as kc
    from kvlab.kernels.cuda import quantizers as q
    from kvlab.types import TYPES
    ys = np.concatenate([floor_class_ys(), _SPECIALS])
    out = {f"index/{clamp}": np.array([q.best_index(y, q.BEST_INDEX_LUT, clamp) for y in ys], np.int64)
           for clamp in (False, True)}
    out["index_nan/True"] = np.array(q.best_index(F(np.nan), q.BEST_INDEX_LUT, True), np.int64)
    out["index_nan/False"] = np.array(q.best_index(F(np.nan), q.BEST_INDEX_LUT, False), np.int64)
    out["floor_of"] = ys
    out["fma_rm_bits"] = np.array([q.f32_bits(q.fma_rm(y, F(0.25), q._U4_MAGIC)) for y in ys], np.int64)
    out["add_rm_bits"] = np.array([q.f32_bits(q.add_rm(y, q._U_MAGIC)) for y in ys], np.int64)
    x = edge_blocks()
    info = TYPES["iq4_nl"]
    for code, flavor in enumerate(FLAVORS):
        raw = cuda.to_device(np.zeros((1, info.row_bytes(x.shape[1])), np.uint8))
        kc.quantize(cuda.to_device(x), raw, info, code)
        out[f"quantize/{flavor}"] = raw.copy_to_host()
    np.savez(out_path, **out)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    from .simulated import simulated_outputs
    return simulated_outputs(__file__, tmp_path_factory.mktemp("iq4_sim"))


@pytest.mark.parametrize("clamp", [False, True])
def test_index_equals_cpu_best_index_on_every_floor_class(sim, clamp):
    ys = sim["floor_of"]
    want = np.array([best_index(y / F(2)) for y in ys])
    got = sim[f"index/{clamp}"]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} differ, first y = {ys[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"


def test_nan_indexes_the_top_clamped_and_stays_in_the_table_unclamped(sim):
    assert sim["index_nan/True"] == 15
    assert 0 <= sim["index_nan/False"] <= 15


def test_rounding_toward_minus_infinity_floors(sim):
    """The simulator's fma.rm / add.rm twins give the floors the table is built on (bits 2^23 + ..)."""
    ys = sim["floor_of"].astype(np.float64)
    assert np.array_equal(sim["add_rm_bits"] - 0x4B000000, np.floor(ys) + 256)
    assert np.array_equal(sim["fma_rm_bits"] - 0x4B000000, np.floor(ys / 4) + 64)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_edge_blocks_quantize_as_the_cpu_kernel(sim, flavor):
    want = kvlab.quantize(edge_blocks(), "iq4_nl", flavor).raw
    got = sim[f"quantize/{flavor}"]
    blocks = (got != want).reshape(-1, 18).any(axis=1)
    assert not blocks.any(), f"{int(blocks.sum())} of {blocks.size} blocks differ, first {int(np.argmax(blocks))}"


if __name__ == "__main__":
    run(sys.argv[1])
