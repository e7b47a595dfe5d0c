"""Python twins of kernels/cuda/ops.py's PTX instructions, for the Numba CUDA simulator.

numpy float32 scalars round to nearest like the GPU's ``.rn`` instructions; FMA is made exact
through a float64 product (exact for float32 inputs) and a round-to-odd float64 sum;
rcp.approx.ftz.f32 reads the table measured on an H100 (the CPU kernels' scalar.rcp_approx_table()).
"""
from fractions import Fraction

import numpy as np

from ..scalar import rcp_approx_table

_f32 = np.float32
_MIN_NORMAL = _f32(1.1754943508222875e-38)


def _quiet(fn):
    def wrapped(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    wrapped.__name__ = fn.__name__
    return wrapped


def f32_bits(x):
    return np.array(x, np.float32).view(np.uint32)[()]


def f32_from_bits(u):
    return np.array(u, np.uint32).view(np.float32)[()]


def ftz(x):
    x = _f32(x)
    return _f32(np.copysign(_f32(0.0), x)) if abs(x) < _MIN_NORMAL else x


@_quiet
def mul(a, b):
    return _f32(a) * _f32(b)


@_quiet
def add(a, b):
    return _f32(a) + _f32(b)


@_quiet
def sub(a, b):
    return _f32(a) - _f32(b)


@_quiet
def div(a, b):
    return _f32(a) / _f32(b)


@_quiet
def fma(a, b, c):
    a, b, c = _f32(a), _f32(b), _f32(c)
    p = np.float64(a) * np.float64(b)                  # exact
    if not (np.isfinite(p) and np.isfinite(c)):
        return _f32(p + np.float64(c))
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:                                     # the sign of a zero sum (a Fraction has none): IEEE's,
        return _f32(p + np.float64(c))                 # as the exact float64 p + c gives it
    s = np.float64(float(exact))
    if Fraction(float(s)) != exact:                    # round to odd, then once to float32
        if abs(Fraction(float(s))) > abs(exact):
            s = np.nextafter(s, np.float64(0.0))
        s = np.array(s).view(np.uint64)[()] | np.uint64(1)
        s = np.array(s, np.uint64).view(np.float64)[()]
    return _f32(s)


def _f32_at_or_below(exact):
    """The largest float32 <= the Fraction exact (-inf below -FLT_MAX)."""
    top = Fraction(float(np.finfo(np.float32).max))
    if exact > top:
        return np.finfo(np.float32).max
    if exact < -top:
        return _f32(-np.inf)
    r = _f32(float(exact))
    while Fraction(float(r)) > exact:
        r = np.nextafter(r, _f32(-np.inf))
    while Fraction(float(np.nextafter(r, _f32(np.inf)))) <= exact:
        r = np.nextafter(r, _f32(np.inf))
    return r


@_quiet
def fma_rm(a, b, c):
    """fma.rm.f32: a * b + c exactly, then the float32 at or below it (a zero sum of nonzero terms, or of
    zeros of both signs, is -0, as IEEE rounds toward -inf)."""
    a, b, c = _f32(a), _f32(b), _f32(c)
    product = np.float64(a) * np.float64(b)            # exact; its zero carries the sign
    if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c)):
        return _f32(product + np.float64(c))
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:                                     # +0 only as +0 + +0
        plus = product == 0 and c == 0 and not np.signbit(product) and not np.signbit(c)
        return _f32(0.0) if plus else _f32(-0.0)
    return _f32_at_or_below(exact)


def add_rm(a, b):
    return fma_rm(a, _f32(1.0), b)


def mul_ftz(a, b):
    return ftz(mul(ftz(a), ftz(b)))


def add_ftz(a, b):
    return ftz(add(ftz(a), ftz(b)))


def sub_ftz(a, b):
    return ftz(sub(ftz(a), ftz(b)))


def fma_ftz(a, b, c):
    return ftz(fma(ftz(a), ftz(b), ftz(c)))


@_quiet
def rcp_approx(x):
    x = ftz(x)
    if x == 0 or np.isinf(x) or np.isnan(x):
        return _f32(1.0) / x
    r = _f32(1.0) / x
    bits = np.uint32(f32_bits(r) + np.uint32(np.int64(rcp_approx_table()[f32_bits(x) & 0x7FFFFF]) & 0xFFFFFFFF))
    return ftz(f32_from_bits(bits))


def roundf(x):
    x = _f32(x)
    if not abs(x) < _f32(8388608.0):
        return x
    return _f32(np.copysign(np.floor(abs(np.float64(x)) + 0.5), x))


def round_even(x):
    x = _f32(x)
    return x if not abs(x) < _f32(8388608.0) else _f32(np.rint(x))


def ptx_i32(x):
    x = _f32(x)
    if x != x:
        return np.int32(0)
    return np.int32(min(max(np.float64(x), -2147483648.0), 2147483647.0))


def ptx_u32(x):
    x = _f32(x)
    if x != x:
        return np.uint32(0)
    return np.uint32(min(max(np.float64(x), 0.0), 4294967295.0))


def floor_i32(x):
    x = _f32(x)
    if x != x:
        return np.int32(0)
    return np.int32(min(max(np.floor(np.float64(x)), -2147483648.0), 2147483647.0))


def fmin(a, b):
    return _f32(np.fmin(_f32(a), _f32(b)))


def fmax(a, b):
    return _f32(np.fmax(_f32(a), _f32(b)))


def fmin_ftz(a, b):
    return ftz(fmin(ftz(a), ftz(b)))


def fmax_ftz(a, b):
    return ftz(fmax(ftz(a), ftz(b)))


@_quiet
def f32_to_f16_bits(x):
    x = _f32(x)
    if x != x:
        return np.uint16(0x7FFF)
    return np.array(x, np.float16).view(np.uint16)[()]


def f16_bits_to_f32(h):
    return _f32(np.array(h, np.uint16).view(np.float16)[()])


# ---- wide memory access on flat views (the simulator's arrays wrap numpy arrays in ``_ary``) ----
def _flat(a):
    return getattr(a, "_ary", a).reshape(-1)


def _words(a, i, count):
    """`count` 32-bit words from element i of a (uint8: i a byte offset; uint32: a word index)."""
    f = _flat(a)
    return f[i:i + 4 * count // f.itemsize].view(np.uint32)


def ld_f32x4(a, i):
    return tuple(_flat(a)[i:i + 4])


def st_f32x4(a, i, v0, v1, v2, v3):
    _flat(a)[i:i + 4] = (v0, v1, v2, v3)


def ld_u16(a, i):
    return _flat(a)[i:i + 2].view(np.uint16)[0]


def st_u16(a, i, v):
    _flat(a)[i:i + 2].view(np.uint16)[0] = v


def ld_u32(a, i):
    return _words(a, i, 1)[0]


def st_u32(a, i, v):
    _words(a, i, 1)[0] = v


def ld_u32x2(a, i):
    return tuple(_words(a, i, 2))


def st_u32x2(a, i, v0, v1):
    _words(a, i, 2)[:] = (v0, v1)


def ld_u32x4(a, i):
    return tuple(_words(a, i, 4))


def st_u32x4(a, i, v0, v1, v2, v3):
    _words(a, i, 4)[:] = (v0, v1, v2, v3)


def prefetch_l2(a, i):
    """A hint on the GPU; here only the check that the line asked for starts inside the array."""
    assert 0 <= i < a.size, (i, a.size)


def _cp_async(size):
    def copy(dst, i, src, j):
        """The copy at once (the GPU's lands by cp_async_wait_all); both sides inside their arrays."""
        d, s = _flat(dst), _flat(src)
        nd, ns = size // d.itemsize, size // s.itemsize
        assert 0 <= i and i + nd <= d.size and 0 <= j and j + ns <= s.size, (i, d.size, j, s.size)
        d[i:i + nd] = s[j:j + ns].view(d.dtype)
    return copy


cp_async16 = _cp_async(16)
cp_async4 = _cp_async(4)


def cp_async_wait_all():
    pass


def cp_async_commit():
    pass


def cp_async_wait_one():
    pass
