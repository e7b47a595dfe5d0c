"""Properties of the f32/f16/bf16/q8_0/q4_0/q4_1 kernels that need no golden file: error bounds
from each format's math, the byte layout of ggml's block structs, the scalar helpers against
plain transcriptions of ggml's C, and parallel == serial."""
import struct

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.kernels import bf16, blocks, f16, f32, q4_0, q4_1, q8_0
from kvlab.kernels.fp import CPU, CUDA, REF

FLAVORS = (REF, CPU, CUDA)
QUANTIZED = {"q8_0": q8_0, "q4_0": q4_0, "q4_1": q4_1}
ELEMENTWISE = {"f32": f32, "f16": f16, "bf16": bf16}


def quantize(mod, name, x, flavor):
    """x: (n_blocks, block_size) -> raw (n_blocks, TYPE_SIZE); elementwise types take any (rows, cols)."""
    out = np.zeros((x.shape[0], x.shape[1] * mod.TYPE_SIZE // (32 if name in QUANTIZED else 1)), np.uint8)
    getattr(mod, f"quantize_row_{name}")(np.ascontiguousarray(x, np.float32), out, flavor)
    return out


def dequantize(mod, name, raw, n_values):
    out = np.zeros((raw.shape[0], n_values), np.float32)
    getattr(mod, f"dequantize_row_{name}")(raw, out)
    return out


def f16_scale(raw, offset=0):
    """The ggml_half at a byte offset of each block, as float64."""
    return raw[:, offset:offset + 2].copy().view(np.float16)[:, 0].astype(np.float64)


# --- error bounds: |x - dequantize(quantize(x))| from each format's rounding ------------------------

HALF_ULP_F16 = 2.0 ** -11          # relative rounding of a normal half (scales d and m)


def normal_blocks(seed, n_blocks=2048, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((n_blocks, 32)) * scale).astype(np.float32)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_q8_0_error_within_half_step(flavor, scale):
    x = normal_blocks(1, scale=scale)
    raw = quantize(q8_0, "q8_0", x, flavor)
    err = np.abs(dequantize(q8_0, "q8_0", raw, 32).astype(np.float64) - x)
    d = np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / 127
    # half a step, plus q (<= 127) times the scale's rounding to half, plus float32 rounding
    bound = d * (0.5 + 127 * HALF_ULP_F16) + np.abs(x) * 2.0 ** -22
    assert (err <= bound).all()


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_q4_0_error_within_one_step(flavor, scale):
    x = normal_blocks(2, scale=scale)
    raw = quantize(q4_0, "q4_0", x, flavor)
    err = np.abs(dequantize(q4_0, "q4_0", raw, 32).astype(np.float64) - x)
    d = np.abs(f16_scale(raw))[:, None]
    # q = 15 clamps +8d to +7d: one step at worst; half a step for every other value
    clamped = x * np.sign(f16_scale(raw))[:, None] > 7.5 * d          # x / d > 7.5
    step = np.where(clamped, 1.0, 0.5)
    assert (err <= d * (step + 8 * HALF_ULP_F16) + np.abs(x) * 2.0 ** -22).all()
    assert (err[~clamped] <= 0.5 * d.repeat(32, 1)[~clamped] * (1 + 16 * HALF_ULP_F16) + 1e-30).all()


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])
def test_q4_1_error_within_half_step(flavor, scale):
    x = normal_blocks(3, scale=scale)
    raw = quantize(q4_1, "q4_1", x, flavor)
    err = np.abs(dequantize(q4_1, "q4_1", raw, 32).astype(np.float64) - x)
    d = f16_scale(raw)[:, None]
    m = np.abs(f16_scale(raw, 2))[:, None]
    bound = d * (0.5 + 15 * HALF_ULP_F16) + m * HALF_ULP_F16 + (np.abs(x) + m) * 2.0 ** -21
    assert (d >= 0).all() and (err <= bound).all()


@pytest.mark.parametrize("name,rel", [("f16", 2.0 ** -11), ("bf16", 2.0 ** -8), ("f32", 0.0)])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_elementwise_error_within_half_ulp(name, rel, flavor):
    mod = ELEMENTWISE[name]
    x = (np.random.default_rng(4).standard_normal((64, 256)) * 100).astype(np.float32)
    x[np.abs(x) < 2.0 ** -13] = 1.0                                    # stay in f16's normal range
    back = dequantize(mod, name, quantize(mod, name, x, flavor), 256)
    assert (np.abs(back.astype(np.float64) - x) <= rel * np.abs(x)).all()


# --- layout: bytes of a block whose quantization is known exactly ------------------------------------

def nibbles(q):
    """ggml's packing: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    return bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_q8_0_layout(flavor):
    q = np.random.default_rng(5).integers(-126, 127, 32)
    q[7] = 127                                                          # amax = 127 -> d = 1, id = 1
    raw = quantize(q8_0, "q8_0", q[None].astype(np.float32), flavor)
    assert bytes(raw[0]) == struct.pack("<e", 1.0) + q.astype(np.int8).tobytes()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_q4_0_layout(flavor):
    q = np.random.default_rng(6).integers(1, 16, 32)
    q[3] = 0                                                            # the only |x| = 4: d = -4/-8
    x = (q - 8) * 0.5
    raw = quantize(q4_0, "q4_0", x[None].astype(np.float32), flavor)
    assert bytes(raw[0]) == struct.pack("<e", 0.5) + nibbles(q)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_q4_1_layout(flavor):
    q = np.random.default_rng(7).integers(0, 16, 32)
    q[2], q[20] = 0, 15                                                 # d = (max - min)/15 = 0.25
    x = q * 0.25 - 1.5
    raw = quantize(q4_1, "q4_1", x[None].astype(np.float32), flavor)
    assert bytes(raw[0]) == struct.pack("<ee", 0.25, -1.5) + nibbles(q)


@pytest.mark.parametrize("name,layout", [("q4_0", lambda q, d, m: d * (q - 8)), ("q4_1", lambda q, d, m: d * q + m)])
def test_q4_dequantize_reads_struct_fields(name, layout):
    mod = QUANTIZED[name]
    rng = np.random.default_rng(8)
    q = rng.integers(0, 16, 32)
    header = struct.pack("<e", -0.375) + (struct.pack("<e", 2.5) if name == "q4_1" else b"")
    raw = np.frombuffer(header + nibbles(q), np.uint8)[None].copy()
    assert (dequantize(mod, name, raw, 32)[0] == layout(q, -0.375, 2.5)).all()


def test_q8_0_dequantize_reads_struct_fields():
    q = np.arange(-128, 128, 8, dtype=np.int8)
    raw = np.frombuffer(struct.pack("<e", 0.125) + q.tobytes(), np.uint8)[None].copy()
    assert (dequantize(q8_0, "q8_0", raw, 32)[0] == q * np.float32(0.125)).all()


@pytest.mark.parametrize("name,as_bits", [
    ("f32", lambda x: x.view(np.uint32)),
    ("f16", lambda x: x.astype(np.float16).view(np.uint16)),
    ("bf16", lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)),   # values exact in bf16
])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_elementwise_layout_is_little_endian_values(name, as_bits, flavor):
    mod = ELEMENTWISE[name]
    x = np.array([[1.0, -2.5, 0.0, -0.0, 65280.0, 2.0 ** -24, np.inf, -np.inf, 3.0]], np.float32)
    raw = quantize(mod, name, x, flavor)
    assert raw.tobytes() == as_bits(x).astype(as_bits(x).dtype.newbyteorder("<")).tobytes()


def test_f16_nan_per_flavor():
    """ref drops the payload (0x7E00|sign), cpu's F16C keeps its top bits, cuda writes 0x7FFF;
    the cpu flavor's last cols % 4 values of a row take ggml's scalar (software) tail."""
    nan = np.array([0x7F802000, 0xFFC00000, 0x7FBFFFFF, 0x7F812345, 0x7F802000], np.uint32).view(np.float32)
    halves = {fl: quantize(f16, "f16", nan[None], fl).view(np.uint16)[0].tolist() for fl in FLAVORS}
    assert halves[REF] == [0x7E00, 0xFE00, 0x7E00, 0x7E00, 0x7E00]
    assert halves[CPU] == [0x7E01, 0xFE00, 0x7FFF, 0x7E09, 0x7E00]       # 5 % 4 = 1 value in the tail
    assert halves[CUDA] == [0x7FFF] * 5


# --- scalar helpers against plain transcriptions of the C ---------------------------------------------

def ftz(v):
    return np.float32(np.copysign(0.0, v)) if v != 0 and abs(v) < np.float32(2.0 ** -126) else v


def c_first_absmax(xb, flush):
    amax = vmax = np.float32(0.0)
    for v in xb:
        av = ftz(abs(v)) if flush else abs(v)
        if amax < av:
            amax, vmax = av, v
    return vmax


def c_min_max(xb, flush):
    f = ftz if flush else (lambda v: v)
    vmin, vmax = np.float32(3.4028234663852886e38), np.float32(-3.4028234663852886e38)
    for v in xb:
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


@pytest.mark.parametrize("flavor", FLAVORS)
def test_block_searches_match_sequential_c(flavor):
    rng = np.random.default_rng(9)
    flush = flavor == CUDA
    for _ in range(3000):
        xb = tricky_block(rng)
        assert same_float(blocks.first_absmax(xb, flavor), c_first_absmax(xb, flush)), xb
        for got, want in zip(blocks.min_max(xb, flavor), c_min_max(xb, flush)):
            assert same_float(got, want), xb


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
        assert same_float(q8_0._ref_absmax(xb), c_max_macro(xb)), xb
        assert same_float(q8_0._avx_absmax(xb), avx_tree(xb)), xb


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, -0.5, 2.5, -3.5, 8388607.5]))
def test_rounding_helpers(v):
    v = np.float32(v)
    if np.isfinite(v):
        assert same_float(blocks.round_even32(v), np.rint(v))
        away = np.float32(np.copysign(np.floor(abs(np.float64(v)) + 0.5), v))
        assert same_float(blocks.roundf32(v), away)
    fits = np.isfinite(v) and -2.0 ** 31 <= np.trunc(v) < 2.0 ** 31
    assert blocks.c_cast_i32(v) == (int(np.trunc(v)) if fits else -2 ** 31)


def test_cuda_rcp_applies_the_measured_table_at_every_exponent():
    table = np.zeros(1 << 23, np.int8)
    x = np.float32(1.7)
    table[int(x.view(np.uint32)) & 0x7FFFFF] = -1                     # hardware one ulp below RN(1/x)
    for scale in (2.0 ** -100, 1.0, 2.0 ** 100):
        xs = np.float32(x * scale)
        rn = np.float32(1) / xs
        assert blocks.cuda_rcp(xs) == rn
        assert np.float32(blocks.cuda_rcp(xs, table)).view(np.uint32) == rn.view(np.uint32) - 1
        assert np.float32(blocks.cuda_rcp(-xs, table)).view(np.uint32) == (-rn).view(np.uint32) - 1
    assert blocks.cuda_rcp(np.float32(2.0 ** 127), table) == 0                 # 1/x subnormal: flushed
    assert blocks.cuda_rcp(np.float32(1e-40), table) == np.inf                 # x flushed to 0
    assert blocks.cuda_rcp(np.float32(np.inf), table) == 0


# --- parallel == serial --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(QUANTIZED) + list(ELEMENTWISE))
@pytest.mark.parametrize("flavor", FLAVORS)
def test_parallel_equals_serial_and_blockwise(name, flavor):
    mod = QUANTIZED.get(name) or ELEMENTWISE[name]
    x = normal_blocks(11, n_blocks=1000)
    x[::7] = np.random.default_rng(12).choice(np.float32([0, -0.0, np.nan, np.inf, 1e-40, 2.5]), (143, 32))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = quantize(mod, name, x, flavor)
    finally:
        numba.set_num_threads(before)
    parallel = quantize(mod, name, x, flavor)
    assert (parallel == serial).all()
    if name in QUANTIZED:                                              # one block at a time, in Python
        one_by_one = np.zeros_like(serial)
        for i in range(len(x)):
            mod.quantize_block(x[i], one_by_one[i], flavor)
        assert (one_by_one == serial).all()
