"""Properties of the CPU kernels that need no golden file, for every type x flavor (ggml's
test-backend-ops style: one test body, the whole cross product): error bounds from each format's math,
the byte layout against the C structs (read here as numpy dtypes, independently of the kernels),
parallel == serial == block by block; then the helpers and cases particular to a type.

Kernels are called through the type table (TypeInfo.quantize_row / dequantize_row), as kvlab.quantize does.
"""
import importlib
import struct
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.kernels import CPU, CUDA, REF, iq4_nl, q8_0, scalar
from kvlab.types import TYPES, flavor_code

HALF_ULP_F16 = 2.0 ** -11          # relative rounding of a normal half (scales d and m)
BLOCK_TYPES = [t for t, info in TYPES.items() if info.is_quantized]


def quantize(type_name, x, flavor):
    """x: (n_blocks, block_size) -> raw (n_blocks, type_size); f32/f16/bf16 take any (rows, cols)."""
    info = TYPES[type_name]
    out = np.zeros((x.shape[0], info.row_bytes(x.shape[1])), np.uint8)
    info.quantize_row(np.ascontiguousarray(x, np.float32), out, flavor_code(flavor), None)
    return out


def dequantize(type_name, raw, n_values):
    out = np.zeros((raw.shape[0], n_values), np.float32)
    TYPES[type_name].dequantize_row(raw, out)
    return out


def normal_blocks(seed, n_blocks=2048, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((n_blocks, 32)) * scale).astype(np.float32)


# ---- the C structs (ggml-common.h) as numpy dtypes, and ggml's to_float on their fields ---------------

@dataclass(frozen=True)
class Struct:
    dtype: np.dtype
    value: Callable        # (q (n, 32) int, fields) -> (n, 32) float32, as dequantize_row_<type>


def _f32(a):
    return np.asarray(a, np.float32)


STRUCTS = {
    "q8_0": Struct(np.dtype([("d", "<f2"), ("qs", "i1", 32)]), lambda q, s: _f32(q) * _f32(s["d"])[:, None]),
    "q4_0": Struct(np.dtype([("d", "<f2"), ("qs", "u1", 16)]), lambda q, s: _f32(q - 8) * _f32(s["d"])[:, None]),
    "q4_1": Struct(np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
                   lambda q, s: _f32(q) * _f32(s["d"])[:, None] + _f32(s["m"])[:, None]),
    "iq4_nl": Struct(np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
                     lambda q, s: _f32(s["d"])[:, None] * iq4_nl.KVALUES.astype(np.float32)[q]),
    "q5_0": Struct(np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
                   lambda q, s: _f32(q - 16) * _f32(s["d"])[:, None]),
    "q5_1": Struct(np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
                   lambda q, s: _f32(q) * _f32(s["d"])[:, None] + _f32(s["m"])[:, None]),
}
VALUE_BITS = {   # f32/f16/bf16: the little-endian bits of each value, and back
    "f32": (lambda x: x.view(np.uint32), lambda b: b.view(np.float32)),
    "f16": (lambda x: x.astype(np.float16).view(np.uint16), lambda b: b.view(np.float16).astype(np.float32)),
    "bf16": (lambda x: (x.view(np.uint32) >> 16).astype(np.uint16),                # values exact in bf16
             lambda b: (b.astype(np.uint32) << 16).view(np.float32)),
}


def struct_quants(type_name, fields):
    """q[j] for j in 0..31 from the struct fields: qs as int8 (q8_0), or low nibbles for j < 16 and high
    ones for j >= 16, with qh bit j as q[j]'s bit 4 (q5)."""
    if type_name == "q8_0":
        return fields["qs"].astype(np.int64)
    q = np.concatenate([fields["qs"] & 0x0F, fields["qs"] >> 4], axis=1).astype(np.int64)       # (n, 32)
    if "qh" in fields.dtype.names:
        q |= ((fields["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64) << 4
    return q


def encode(type_name, q, **scalars):
    """One block's bytes from its quants and scalar fields, through the numpy struct."""
    s = np.zeros(1, STRUCTS[type_name].dtype)
    for name, v in scalars.items():
        s[name] = v
    if type_name == "q8_0":
        s["qs"] = q
    else:
        s["qs"] = (q[:16] & 0x0F) | ((q[16:] & 0x0F) << 4)
        if "qh" in s.dtype.names:
            s["qh"] = sum(int((q[j] >> 4) & 1) << j for j in range(32))
    return s.tobytes()


# ---- every type x flavor ----------------------------------------------------------------------------

def first_max(x):
    """ggml's `max`: the value of largest magnitude (normals: no ties)."""
    return x[np.arange(len(x)), np.abs(x).argmax(axis=1)][:, None].astype(np.float64)


def error_bound(type_name, x, raw):
    """(n_blocks, 32) bound on |x - dequantize(quantize(x))|, from the format's rounding and the stored scales."""
    x = x.astype(np.float64)
    ax = np.abs(x)
    if type_name in ("f32", "f16", "bf16"):
        rel = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}[type_name]
        return np.maximum(rel * ax, 2.0 ** -25 if type_name == "f16" else 0.0)        # f16 subnormals: absolute
    fields = raw.view(STRUCTS[type_name].dtype)[:, 0]
    d = fields["d"].astype(np.float64)[:, None]
    if type_name == "q8_0":   # half a step, plus q (<= 127) times the scale's rounding to half, plus float32's
        return np.abs(first_max(x)) / 127 * (0.5 + 127 * HALF_ULP_F16) + ax * 2.0 ** -22
    if type_name in ("q4_0", "q5_0"):   # the max maps to the lowest q, so the other sign clamps one step
        levels = 8 if type_name == "q4_0" else 16
        clamped = x * np.sign(d) > (levels - 0.5) * np.abs(d)
        return (np.where(clamped, 1.0, 0.5) + levels * HALF_ULP_F16) * np.abs(d) * (1 + 2 * HALF_ULP_F16) \
            + ax * 2.0 ** -21
    if type_name in ("q4_1", "q5_1"):
        m = np.abs(fields["m"].astype(np.float64))[:, None]
        top = 15 if type_name == "q4_1" else 31
        return d * (0.5 + top * HALF_ULP_F16) + m * HALF_ULP_F16 + (ax + m) * 2.0 ** -21
    # iq4_nl: x = d0 t with d0 = max / -127 and |t| <= 127, t within 14 of its level (the widest half gap
    # is 12; t in (113, 127] takes 113), and the stored scale d in place of d0
    d0 = first_max(x) / -127
    return 14 * np.abs(d0) + 127 * np.abs(d - d0) + ax * 2.0 ** -20


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_error_within_the_format_bound(type_name, flavor, scale):
    x = normal_blocks(1, scale=scale)
    raw = quantize(type_name, x, flavor)
    err = np.abs(dequantize(type_name, raw, 32).astype(np.float64) - x)
    assert (err <= error_bound(type_name, x, raw)).all()


def known_block(type_name, rng):
    """(x (1, 32) float32, the bytes every flavor must write for it): values on the format's grid, with
    a scale that every rounding keeps exact."""
    if type_name in VALUE_BITS:
        x = np.array([[1.0, -2.5, 0.0, -0.0, 65280.0, 2.0 ** -24, np.inf, -np.inf, 3.0]], np.float32)
        return x, VALUE_BITS[type_name][0](x).astype("<u4" if type_name == "f32" else "<u2").tobytes()
    if type_name == "q8_0":
        q = rng.integers(-126, 127, 32)
        q[7] = 127                                                        # amax = 127 -> d = 1
        return q[None].astype(np.float32), encode("q8_0", q, d=1.0)
    if type_name == "q4_0":
        q = rng.integers(1, 16, 32)
        q[3] = 0                                                          # the only |x| = 4: d = -4/-8
        return ((q - 8) * 0.5)[None].astype(np.float32), encode("q4_0", q, d=0.5)
    if type_name == "q4_1":
        q = rng.integers(0, 16, 32)
        q[2], q[20] = 0, 15                                               # d = (max - min)/15 = 0.25
        return (q * 0.25 - 1.5)[None].astype(np.float32), encode("q4_1", q, d=0.25, m=-1.5)
    if type_name == "iq4_nl":
        q = rng.integers(1, 16, 32)
        q[5] = 0                                                          # the only -127: d = 1, x = level
        return iq4_nl.KVALUES[q][None].astype(np.float32), encode("iq4_nl", q, d=1.0)
    q = rng.permutation(32)                                               # every 5-bit value once
    if type_name == "q5_0":
        return (q - 16)[None].astype(np.float32), encode("q5_0", q, d=1.0)   # max -16: d = 1
    return q[None].astype(np.float32), encode("q5_1", q, d=1.0, m=0.0)      # min 0, max 31: d = 1


def test_layout_matches_the_c_struct(type_name, flavor):
    rng = np.random.default_rng(5)
    for _ in range(8):
        x, expected = known_block(type_name, rng)
        assert quantize(type_name, x, flavor).tobytes() == expected, x


def test_dequantize_reads_struct_fields(type_name):
    """Random bytes (finite scales) decode as ggml's to_float does on the struct's fields, bit for bit."""
    rng = np.random.default_rng(8)
    if type_name in VALUE_BITS:
        x = (rng.standard_normal((64, 32)) * 100).astype(np.float32)
        bits = VALUE_BITS[type_name][0](x)
        raw = bits.view(np.uint8).reshape(64, -1)
        want = VALUE_BITS[type_name][1](bits)
    else:
        s = STRUCTS[type_name]
        raw = rng.integers(0, 256, (256, s.dtype.itemsize), dtype=np.uint8)
        fields = raw.view(s.dtype)[:, 0]
        fields["d"] = (rng.standard_normal(256) * 0.1).astype(np.float16)
        if "m" in s.dtype.names:
            fields["m"] = rng.standard_normal(256).astype(np.float16)
        want = s.value(struct_quants(type_name, fields), fields)
    got = dequantize(type_name, raw, want.shape[1])
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_parallel_equals_serial_and_blockwise(type_name, flavor):
    x = normal_blocks(11, n_blocks=1000)
    x[::7] = np.random.default_rng(12).choice(np.float32([0, -0.0, np.nan, np.inf, 1e-40, 2.5]), (143, 32))
    x[::11, 5] = np.float32(1e-40)
    x[::13, 3] = np.nan
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = quantize(type_name, x, flavor)
    finally:
        numba.set_num_threads(before)
    parallel = quantize(type_name, x, flavor)
    assert (parallel == serial).all()
    if TYPES[type_name].is_quantized:                                 # one block at a time, in Python
        module = importlib.import_module(f"kvlab.kernels.{type_name}")
        one_by_one = np.zeros_like(serial)
        for i in range(len(x)):
            module.quantize_block(x, one_by_one, i, flavor_code(flavor))
        assert (one_by_one == serial).all()


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
@pytest.mark.parametrize("flavor", ["ref", "cpu"])
def test_row_kernels_take_blocks_that_are_not_back_to_back(type_name, flavor):
    """A row kernel called on strided views (a value every other float, a block every other row of bytes)
    writes the bytes it writes for contiguous arrays: q8_0's whole-block vectors run only where
    scalar.contiguous_blocks holds, and the element loops take the rest."""
    x = normal_blocks(13, n_blocks=300)
    info = TYPES[type_name]
    want = quantize(type_name, x, flavor)
    wide = np.zeros((300, 64), np.float32)
    wide[:, ::2] = x
    got = np.zeros((600, info.type_size), np.uint8)
    info.quantize_row(wide[:, ::2], got[::2], flavor_code(flavor), None)     # (300, 32) views, strides 8 and 2 rows
    assert (got[::2] == want).all() and not got[1::2].any()


# ---- particular types ----------------------------------------------------------------------------

def test_f16_nan_per_flavor():
    """ref drops the payload (0x7E00|sign), cpu's F16C keeps its top bits, cuda writes 0x7FFF;
    the cpu flavor's last cols % 4 values of a row take ggml's scalar (software) tail."""
    nan = np.array([0x7F802000, 0xFFC00000, 0x7FBFFFFF, 0x7F812345, 0x7F802000], np.uint32).view(np.float32)
    halves = {fl: quantize("f16", nan[None], fl).view(np.uint16)[0].tolist() for fl in ("ref", "cpu", "cuda")}
    assert halves["ref"] == [0x7E00, 0xFE00, 0x7E00, 0x7E00, 0x7E00]
    assert halves["cpu"] == [0x7E01, 0xFE00, 0x7FFF, 0x7E09, 0x7E00]       # 5 % 4 = 1 value in the tail
    assert halves["cuda"] == [0x7FFF] * 5


def test_bf16_nan_per_flavor():
    nan = np.array([0x7F802000, 0xFFC00001, 0x7FFFFFFF], np.uint32).view(np.float32)
    halves = {fl: quantize("bf16", nan[None], fl).view(np.uint16)[0].tolist() for fl in ("ref", "cpu", "cuda")}
    assert halves["ref"] == halves["cpu"] == [0x7FC0, 0xFFC0, 0x7FFF]       # top half | 0x0040 (quiet)
    assert halves["cuda"] == [0x7FFF] * 3


def test_q5_zero_block_layout():
    """An all-zero q5_0 block: d = 0 / -16 = -0 and every q = 16, so qh is all ones and qs all zeros."""
    s = quantize("q5_0", np.zeros((1, 32), np.float32), "ref").view(STRUCTS["q5_0"].dtype)[0, 0]
    assert s["d"].view(np.uint16) == 0x8000 and s["qh"] == 0xFFFFFFFF and (s["qs"] == 0).all()


@pytest.mark.parametrize("flavor", ["ref", "cpu", "cuda"])
def test_iq4_nl_indices_are_nearest_table_entries(flavor):
    x = normal_blocks(2)
    raw = quantize("iq4_nl", x, flavor)
    q = struct_quants("iq4_nl", raw.view(STRUCTS["iq4_nl"].dtype)[:, 0])                   # (n_blocks, 32)
    scaled = x.astype(np.float64) * (-127 / first_max(x))
    dist = np.abs(scaled[..., None] - iq4_nl.KVALUES.astype(np.float64))                  # (n_blocks, 32, 16)
    chosen = np.take_along_axis(dist, q[..., None], axis=2)[..., 0]
    # nearest up to float32 rounding of x * (1/d0): a value within 1e-4 of a midpoint may go either way
    assert (chosen <= dist.min(axis=2) + 1e-4).all()


@pytest.mark.parametrize("flavor", ["ref", "cpu", "cuda"])
def test_iq4_nl_scale_is_the_weighted_least_squares_optimum(flavor):
    """For its indices, the stored d minimizes sum(x^2 (x - d q)^2): nudging it either way by more
    than the half rounding makes the weighted error larger."""
    x = normal_blocks(3).astype(np.float64)
    raw = quantize("iq4_nl", x.astype(np.float32), flavor)
    fields = raw.view(STRUCTS["iq4_nl"].dtype)[:, 0]
    q = iq4_nl.KVALUES.astype(np.float64)[struct_quants("iq4_nl", fields)]                # (n_blocks, 32)
    d = fields["d"].astype(np.float64)[:, None]

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
    raw = quantize("iq4_nl", x, "ref")
    assert (raw[:, :2] == 0).all() and (raw[:, 2:] == 0x88).all()
    assert (dequantize("iq4_nl", raw, 32).view(np.uint32) == 0).all()


@numba.njit(cache=True)
def _cpu_best_indices(x):
    out = np.empty(x.size, np.int32)
    for i in range(x.size):
        out[i] = iq4_nl.best_index(x[i])
    return out


def _gpu_best_indices(x):
    """The CUDA kernels' best_index (kernels/cuda/quantizers.py), step by step in numpy: the NaN-dropping
    clamps, u = floor(2x) + 256 (the kernel's sum rounded toward -inf, 2^23 + 256 + y, whose bits are 2^23's plus
    u), its bucket's entry of the 32-word table added to those bits, the index in the top 4 bits."""
    from kvlab.kernels.cuda.quantizers import _MAGIC_BITS, BEST_INDEX_LUT
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.fmax(np.fmin(x + x, np.float32(255.0)), np.float32(-256.0))       # NaN -> 255
    u = np.floor(y).astype(np.int64) + 256                                           # 0 .. 511
    e = BEST_INDEX_LUT[u >> 4].astype(np.int64)
    return ((_MAGIC_BITS + u + e) & 0xFFFFFFFF) >> 28


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


# ---- scalar helpers against plain transcriptions of the C ---------------------------------------------

def ftz(v):
    return np.float32(np.copysign(0.0, v)) if v != 0 and abs(v) < np.float32(2.0 ** -126) else v


def c_first_absmax(xb, flush):
    amax = vmax = np.float32(0.0)
    for v in xb:
        av = ftz(abs(v)) if flush else abs(v)
        if amax < av:
            amax, vmax = av, v
    return vmax


def c_min_max(xb, flush, from_first):
    f = ftz if flush else (lambda v: v)
    if from_first:
        vmin = vmax = xb[0]
    else:
        vmin, vmax = np.float32(3.4028234663852886e38), np.float32(-3.4028234663852886e38)
    for v in xb[1:] if from_first else xb:
        if f(v) < f(vmin):
            vmin = v
        if f(v) > f(vmax):
            vmax = v
    return vmin, vmax


def tricky_block(rng):
    """Values that stress ties: repeated magnitudes, +-0, subnormals, NaN, Inf, FLT_MAX."""
    pool = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1e-40, -1e-40, 3e-39, np.nan, -np.nan,
                     np.inf, -np.inf, 3.4028234663852886e38, -3.4028234663852886e38, 0.5], np.float32)
    subset = rng.choice(pool, rng.integers(1, 5), replace=False)       # few kinds: all-zero, all-NaN, ...
    return rng.choice(subset, 32)


def same_float(a, b):
    return np.float32(a).view(np.uint32) == np.float32(b).view(np.uint32)


@numba.njit(cache=True)
def _searches(x, flavor, flush, from_first):
    """first_absmax and min_max of every block of x: (n,) float32 x 3."""
    n = x.shape[0]
    amax, lo, hi = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    for i in range(n):
        amax[i] = scalar.first_absmax(x, i, flavor)
        lo[i], hi[i] = scalar.min_max(x, i, flush, from_first)
    return amax, lo, hi


@pytest.mark.parametrize("flavor", [REF, CPU, CUDA])
@pytest.mark.parametrize("from_first", [False, True])
def test_block_searches_match_sequential_c(flavor, from_first):
    rng = np.random.default_rng(9)
    flush = flavor == CUDA
    x = np.stack([tricky_block(rng) for _ in range(3000)])                            # (3000, 32)
    amax, lo, hi = _searches(x, flavor, flush, from_first)
    for i, xb in enumerate(x):
        assert same_float(amax[i], c_first_absmax(xb, flush)), xb
        want_lo, want_hi = c_min_max(xb, flush, from_first)
        assert same_float(lo[i], want_lo) and same_float(hi[i], want_hi), xb


def c_max_macro(xb):
    amax = np.float32(0.0)
    for v in xb:
        amax = amax if amax > abs(v) else abs(v)
    return amax


def maxps(a, b):
    return a if a > b else b


def avx_tree(xb):
    lanes = [xb[lane::8] for lane in range(8)]                          # lane l: x[l], x[l+8], ...
    m = []
    for lane in lanes:
        acc = abs(lane[0])
        for v in lane[1:]:
            acc = maxps(acc, abs(v))
        m.append(acc)
    q = [maxps(m[4 + k], m[k]) for k in range(4)]
    return maxps(maxps(q[0], q[2]), maxps(q[1], q[3]))


def test_q8_0_absmax_matches_c_with_nan():
    rng = np.random.default_rng(10)
    for _ in range(3000):
        xb = tricky_block(rng)
        assert same_float(q8_0._ref_absmax(xb[None], 0), c_max_macro(xb)), xb
        assert same_float(q8_0._avx_absmax(xb[None], 0), avx_tree(xb)), xb


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, -0.5, 2.5, -3.5, 8388607.5]))
def test_rounding_helpers(v):
    v = np.float32(v)
    if np.isfinite(v):
        assert same_float(scalar.round_even32(v), np.rint(v))
        away = np.float32(np.copysign(np.floor(abs(np.float64(v)) + 0.5), v))
        assert same_float(scalar.roundf32(v), away)
    fits = np.isfinite(v) and -2.0 ** 31 <= np.trunc(v) < 2.0 ** 31
    assert scalar.c_cast_i32(v) == (int(np.trunc(v)) if fits else -2 ** 31)


def test_cuda_rcp_applies_the_measured_table_at_every_exponent():
    table = np.zeros(1 << 23, np.int8)
    x = np.float32(1.7)
    table[int(x.view(np.uint32)) & 0x7FFFFF] = -1                     # hardware one ulp below RN(1/x)
    for scale in (2.0 ** -100, 1.0, 2.0 ** 100):
        xs = np.float32(x * scale)
        rn = np.float32(1) / xs
        assert scalar.cuda_rcp(xs) == rn
        assert np.float32(scalar.cuda_rcp(xs, table)).view(np.uint32) == rn.view(np.uint32) - 1
        assert np.float32(scalar.cuda_rcp(-xs, table)).view(np.uint32) == (-rn).view(np.uint32) - 1
    assert scalar.cuda_rcp(np.float32(2.0 ** 127), table) == 0                 # 1/x subnormal: flushed
    assert scalar.cuda_rcp(np.float32(1e-40), table) == np.inf                 # x flushed to 0
    assert scalar.cuda_rcp(np.float32(np.inf), table) == 0


def test_rcp_table_ships_with_the_kernels():
    table = scalar.rcp_approx_table()
    assert table.dtype == np.int8 and table.shape == (1 << 23,) and table.any()
