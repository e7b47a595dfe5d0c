"""Properties of the q5_0, q5_1 and iq4_nl kernels that follow from the formats' math (not golden bytes):
error bounds, the qh bit layout against the C struct, iq4_nl's least-squares scale and nearest indices,
parallel runs equal to serial ones."""
import numba
import numpy as np
import pytest

from kvlab.kernels import iq4_nl, q5_0, q5_1
from kvlab.kernels.fp import CPU, CUDA, REF

FLAVORS = (REF, CPU, CUDA)
HALF_EPS = 2.0 ** -11               # relative rounding of a float32 scale stored as ggml_half

# The structs of ggml-common.h as numpy dtypes: a second reading of the layout, independent of the kernels.
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
IQ4_NL = np.dtype([("d", "<f2"), ("qs", "u1", 16)])


def blocks(n, scale, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, 32)) * scale).astype(np.float32)


def quantize(module, name, x, flavor):
    out = np.zeros((x.shape[0], module.TYPE_SIZE), np.uint8)
    getattr(module, f"quantize_row_{name}")(x, out, flavor)
    return out


def dequantize(module, name, raw):
    out = np.empty((raw.shape[0], 32), np.float32)
    getattr(module, f"dequantize_row_{name}")(raw, out)
    return out


def struct_quants(raw, dtype):
    """q[j] for j in 0..31 from the struct fields: low nibbles are j < 16, qh bit j is q[j]'s bit 4."""
    s = raw.view(dtype)[:, 0]
    low = np.concatenate([s["qs"] & 0x0F, s["qs"] >> 4], axis=1)                    # (n_blocks, 32)
    high = (s["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1                # (n_blocks, 32)
    return low.astype(np.int64) | (high.astype(np.int64) << 4)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_q5_0_error_within_half_step_but_the_clamped_end(flavor, scale):
    x = blocks(4096, scale)
    raw = quantize(q5_0, "q5_0", x, flavor)
    err = np.abs(dequantize(q5_0, "q5_0", raw).astype(np.float64) - x)
    amax = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    step = amax / 16                                                                    # |d|
    # The max maps to q = 0 (-16 d); q = 31 is 15 d, so values of the other sign beyond 15.5 |d| are
    # clamped (up to one step off). Plus |q - 16| <= 16 steps times the half rounding of d.
    clamped = (np.sign(x) != np.sign(x[np.arange(len(x)), np.abs(x).argmax(axis=1)])[:, None]) \
        & (np.abs(x) > 15.5 * step)
    bound = np.where(clamped, 1.0, 0.5) + 16 * HALF_EPS
    assert (err <= step * bound * (1 + 1e-6)).all()
    assert clamped.any()          # the data reaches the clamped end, so both bounds are exercised


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_q5_1_error_within_half_step(flavor, scale):
    x = blocks(4096, scale)
    raw = quantize(q5_1, "q5_1", x, flavor)
    err = np.abs(dequantize(q5_1, "q5_1", raw).astype(np.float64) - x)
    lo = x.min(axis=1, keepdims=True).astype(np.float64)
    step = (x.max(axis=1, keepdims=True) - lo) / 31
    assert (err <= step * (0.5 + 31 * HALF_EPS) * (1 + 1e-5) + np.abs(lo) * HALF_EPS).all()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_q5_layouts_match_the_c_structs(flavor):
    """Quants known in advance (d = 1) land in qs/qh exactly where block_q5_0/block_q5_1 put them."""
    rng = np.random.default_rng(1)
    q = np.array([rng.permutation(32) for _ in range(64)])                                # (64, 32)
    for module, name, dtype, x in (
            (q5_1, "q5_1", Q5_1, q.astype(np.float32)),               # min 0, max 31: d = 1, m = 0
            (q5_0, "q5_0", Q5_0, q.astype(np.float32) - 16)):        # max -16: d = 1, x = q - 16
        raw = quantize(module, name, x, flavor)
        s = raw.view(dtype)[:, 0]
        assert (s["d"] == 1).all()
        assert (struct_quants(raw, dtype) == q).all()
        assert (dequantize(module, name, raw) == x).all()


def test_q5_zero_block_layout():
    """An all-zero q5_0 block: d = 0 / -16 = -0 and every q = 16, so qh is all ones and qs all zeros."""
    s = quantize(q5_0, "q5_0", np.zeros((1, 32), np.float32), REF).view(Q5_0)[0, 0]
    assert s["d"].view(np.uint16) == 0x8000 and s["qh"] == 0xFFFFFFFF and (s["qs"] == 0).all()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_iq4_nl_indices_are_nearest_table_entries(flavor):
    x = blocks(2048, 1.0, seed=2)
    raw = quantize(iq4_nl, "iq4_nl", x, flavor)
    s = raw.view(IQ4_NL)[:, 0]
    q = np.concatenate([s["qs"] & 0x0F, s["qs"] >> 4], axis=1)                           # (n_blocks, 32)
    first_max = x[np.arange(len(x)), np.abs(x).argmax(axis=1)][:, None]                 # ggml's `max`
    scaled = x.astype(np.float64) * (-127 / first_max.astype(np.float64))
    table = iq4_nl.KVALUES.astype(np.float64)
    dist = np.abs(scaled[..., None] - table)                                            # (n_blocks, 32, 16)
    chosen = np.take_along_axis(dist, q[..., None].astype(np.int64), axis=2)[..., 0]
    # nearest up to float32 rounding of x * (1/d0): a value within 1e-4 of a midpoint may go either way
    assert (chosen <= dist.min(axis=2) + 1e-4).all()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_iq4_nl_scale_is_the_weighted_least_squares_optimum(flavor):
    """For its indices, the stored d minimizes sum(x^2 (x - d q)^2): nudging it either way by more
    than the half rounding makes the weighted error larger."""
    x = blocks(2048, 1.0, seed=3).astype(np.float64)
    raw = quantize(iq4_nl, "iq4_nl", x.astype(np.float32), flavor)
    s = raw.view(IQ4_NL)[:, 0]
    idx = np.concatenate([s["qs"] & 0x0F, s["qs"] >> 4], axis=1)
    q = iq4_nl.KVALUES.astype(np.float64)[idx]                                          # (n_blocks, 32)
    d = s["d"].astype(np.float64)[:, None]

    def weighted_error(scale):
        return (x * x * (x - scale * q) ** 2).sum(axis=1)

    for nudge in (1 - 2.0 ** -6, 1 + 2.0 ** -6):
        assert (weighted_error(d) < weighted_error(d * nudge)).all()


def test_iq4_nl_tiny_blocks_get_kvlab_defined_bytes():
    """Below ggml's 1e-15 the ref writes d = 0 and leaves qs to stale memory; kvlab writes index 8
    (table value +1, best_index(0)) so the block dequantizes to +0.0."""
    x = np.zeros((3, 32), np.float32)
    x[1] = 1e-16
    x[2] = np.nan
    raw = quantize(iq4_nl, "iq4_nl", x, REF)
    assert (raw[:, :2] == 0).all() and (raw[:, 2:] == 0x88).all()
    assert (dequantize(iq4_nl, "iq4_nl", raw).view(np.uint32) == 0).all()


@pytest.mark.parametrize("module,name", [(q5_0, "q5_0"), (q5_1, "q5_1"), (iq4_nl, "iq4_nl")])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_parallel_equals_serial(module, name, flavor):
    x = blocks(1024, 1.0, seed=4)
    x[::7, 3] = np.nan
    x[::11, 5] = np.float32(1e-40)
    x[::13] = 0.0
    parallel = quantize(module, name, x, flavor)
    serial = np.zeros_like(parallel)
    for i in range(len(x)):                      # one block at a time, outside the prange loop
        module.quantize_block(x[i], serial[i], flavor)
    assert (parallel == serial).all()
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_thread = quantize(module, name, x, flavor)
    finally:
        numba.set_num_threads(threads)
    assert (parallel == one_thread).all()
    assert (dequantize(module, name, parallel).view(np.uint32)
            == dequantize(module, name, one_thread).view(np.uint32)).all()


@numba.njit(cache=True)
def _cpu_best_indices(x):
    out = np.empty(x.size, np.int32)
    for i in range(x.size):
        out[i] = iq4_nl.best_index(x[i])
    return out


def _gpu_best_indices(x):
    """The CUDA kernels' best_index (kernels/cuda/blocks.py), step by step in numpy: the 32-entry table
    indexed by floor(2x) + 256, the NaN-dropping clamps first."""
    from kvlab.kernels.cuda.blocks import BEST_INDEX_LUT
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.fmax(np.fmin(x + x, np.float32(255.0)), np.float32(-256.0))       # NaN -> 255
    u = np.floor(y).astype(np.int64) + 256                                           # 0 .. 511
    e = BEST_INDEX_LUT[u >> 4].astype(np.int64)
    return (e & 0xFF) + (u >= (e >> 8))


def test_cuda_best_index_table_equals_the_cpu_search():
    """Every float near a decision point (within 64 ulps), every 1/16 step of [-140, 140], scaled
    normals, and the specials: the GPU's table lookup gives ggml's index."""
    mids = (iq4_nl.KVALUES_F32[:-1] + iq4_nl.KVALUES_F32[1:]) / np.float32(2)
    bits = mids.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)        # (15, 129)
    near = np.concatenate([bits.view(np.float32).ravel(), -bits.view(np.float32).ravel()])
    grid = (np.arange(-140 * 16, 140 * 16 + 1) / 16).astype(np.float32)
    rng = np.random.default_rng(3)
    wide = (rng.standard_normal(200_000) * np.float32(10) ** rng.integers(-40, 37, 200_000)).astype(np.float32)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38,
                        127.5, 127.49998, -128.0, -128.00002, 255.5, -256.5], np.float32)
    x = np.concatenate([near, grid, wide, special])
    q = _gpu_best_indices(x)
    want = _cpu_best_indices(x)
    assert np.array_equal(q, want), x[q != want][:10]
