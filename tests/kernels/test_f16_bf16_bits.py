"""f16 and bf16 against the ggml C library over a dense sample of all 2**32 float32 bit patterns.

The golden files hold a few thousand values; the conversions are per value, so they can be held against
the live library on far more: every 256th pattern, whole neighbourhoods of each boundary where the
rounding or the NaN rule changes, and both signs of everything (about 19 M values, a few seconds).
One row whose length is a multiple of 16, so ggml-cpu's f16 from_float converts all of it with F16C; its
row tail (cols % 4 values) is ggml's software conversion, the one from_float_ref makes, checked on rows of
2. The whole 2**32 space was checked once the same way when kvlab's f16 conversion became LLVM's fptrunc
(0 differing for f16 and bf16, ref and cpu).
"""
import numpy as np
import pytest

import kvlab

NEIGHBOURHOOD = 1 << 12   # patterns on each side of a boundary
BOUNDARIES = (            # |x| bits where a conversion's case changes
    0x00000000,           # zero / float32 subnormals
    0x00800000,           # smallest normal float32
    0x33000000,           # 2**-25: half of the smallest f16 subnormal (rounds to even: 0)
    0x33800000,           # 2**-24: the smallest f16 subnormal
    0x38800000,           # 2**-14: the smallest normal f16
    0x477FE000,           # 65504: the largest f16
    0x477FF000,           # 65520: from here f16 rounds to Inf
    0x47800000,           # 2**16
    0x7F7F8000,           # bf16's tie between the largest bf16 and Inf
    0x7F7FFFFF,           # the largest float32
    0x7F800000,           # Inf / the first signalling NaN
    0x7FC00000,           # the first quiet NaN
    0x7FFFE000,           # the NaNs whose f16 payload bits are all set
)


def dense_patterns() -> np.ndarray:
    """float32 (1, n): every 256th bit pattern, the boundary neighbourhoods, random patterns; both signs."""
    every = np.arange(0, 1 << 31, 1 << 8, dtype=np.uint32)
    near = [np.arange(max(b - NEIGHBOURHOOD, 0), min(b + NEIGHBOURHOOD, 1 << 31), dtype=np.uint32)
            for b in BOUNDARIES]
    rng = np.random.default_rng(19)
    spread = rng.integers(0, 1 << 31, 1 << 20, dtype=np.uint32)
    bits = np.concatenate([every, *near, spread])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    bits = np.concatenate([bits, np.zeros(-len(bits) % 16, np.uint32)])   # one F16C body, no tail
    return bits.view(np.float32)[None]


@pytest.fixture(scope="module")
def ggml_lib():
    from kvlab.ggml import lib as ggml
    try:
        return ggml.load()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def patterns():
    return dense_patterns()


@pytest.mark.parametrize("flavor", ["ref", "cpu"])
@pytest.mark.parametrize("type_name", ["f16", "bf16"])
def test_every_sampled_pattern_equals_ggml(type_name, flavor, patterns, ggml_lib):
    ground_truth = ggml_lib.quantize_ref if flavor == "ref" else ggml_lib.quantize_cpu
    expected = ground_truth(patterns, type_name).view(np.uint16)
    got = np.asarray(kvlab.quantize(patterns, type_name, flavor=flavor).raw).view(np.uint16)
    differs = np.flatnonzero(got != expected)
    if len(differs):
        bits = patterns.view(np.uint32)[0]
        first = ", ".join(f"{bits[i]:08x} -> {got[0, i]:04x} (ggml {expected[0, i]:04x})" for i in differs[:8])
        pytest.fail(f"{type_name} {flavor}: {len(differs)} of {got.size} patterns differ: {first}", pytrace=False)


def test_f16_row_tail_is_ggml_software_conversion(patterns, ggml_lib):
    """Rows shorter than an F16C chunk are all tail: the cpu flavor writes what from_float_ref writes."""
    expected = ggml_lib.quantize_ref(patterns, "f16").view(np.uint16).ravel()
    got = np.asarray(kvlab.quantize(patterns.reshape(-1, 2), "f16", flavor="cpu").raw).view(np.uint16).ravel()
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} patterns differ"


def test_a_large_bf16_dequantize_streams_ggmls_bytes(ggml_lib):
    """An output of STREAM_MIN_BYTES or more is written by nontemporal 64-byte stores from each row's first
    64-byte boundary: every bf16 pattern (NaN payloads, subnormals, both zeros, +-Inf) in rows of 4099 values
    (scalar heads and tails), into the caller's buffer 4 bytes off a 64-byte boundary, gives the bytes of
    ggml's to_float, and touches nothing around the buffer."""
    from kvlab.kernels.bf16 import STREAM_MIN_BYTES
    n_rows, row_len = -(-STREAM_MIN_BYTES // (4 * 4099)), 4099
    halves = np.resize(np.arange(1 << 16, dtype=np.uint16), n_rows * row_len)
    raw = halves.view(np.uint8).reshape(n_rows, 2 * row_len)
    want = ggml_lib.dequantize(raw, "bf16", row_len).view(np.uint32)
    buf = np.full(n_rows * row_len + 32, 0x7FC0DEAD, np.uint32)
    at = 16 - buf.ctypes.data % 64 // 4 + 1                       # 4 bytes past a 64-byte boundary
    out = buf[at:at + n_rows * row_len].view(np.float32).reshape(n_rows, row_len)
    assert out.nbytes >= STREAM_MIN_BYTES and out.ctypes.data % 64 == 4
    kvlab.dequantize(kvlab.QTensor.from_raw(raw, "bf16", (n_rows, row_len)), out=out)
    assert np.array_equal(out.view(np.uint32), want)
    assert (buf[:at] == 0x7FC0DEAD).all() and (buf[at + n_rows * row_len:] == 0x7FC0DEAD).all()
