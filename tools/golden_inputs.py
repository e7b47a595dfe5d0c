"""The inputs every golden file is made from: random, adversarial and edge cases.

Deterministic (fixed seeds), so the C harness, the CUDA harness and the tests
all see the same floats. Each case is (rows, 256) float32: 256 is a multiple of
every block size and of every rotation size llama.cpp uses (64, 128, 256).
"""
import numpy as np

COLS = 256
ROWS = 16


def _blocks(rng, rows=ROWS):
    return rng.standard_normal((rows, COLS)).astype(np.float32)


def golden_cases(seed: int = 1234) -> dict:
    rng = np.random.default_rng(seed)
    cases = {}
    cases["normal"] = _blocks(rng)
    cases["normal_tiny"] = _blocks(rng) * np.float32(1e-3)
    cases["normal_large"] = _blocks(rng) * np.float32(1e3)
    cases["f16_overflow"] = _blocks(rng) * np.float32(1e5)       # scales past half's 65504
    cases["heavy_tail"] = rng.standard_t(2, (ROWS, COLS)).astype(np.float32)
    # Ties: values on integer and half-integer grids make x*id land exactly on .5.
    cases["ties_half_grid"] = (rng.integers(-255, 256, (ROWS, COLS)) / np.float32(2)).astype(np.float32)
    cases["ties_int_grid"] = rng.integers(-8, 8, (ROWS, COLS)).astype(np.float32)
    cases["ties_q4_grid"] = (rng.integers(0, 16, (ROWS, COLS)) * np.float32(0.25)).astype(np.float32)
    cases["ties_pm"] = np.where(rng.random((ROWS, COLS)) < 0.5, -1, 1).astype(np.float32) * \
        rng.integers(1, 4, (ROWS, COLS)).astype(np.float32) * np.float32(0.5)
    zeros = _blocks(rng)
    zeros[::2] = 0.0                                              # whole all-zero rows
    zeros[1::2, 32:64] = 0.0                                      # an all-zero block inside a row
    zeros[3, 64:96] = -0.0                                        # negative zeros
    cases["zeros"] = zeros
    const = np.repeat(rng.standard_normal((ROWS, COLS // 32)).astype(np.float32), 32, axis=1)
    cases["constant_blocks"] = const                              # min == max in every block
    outlier = _blocks(rng)
    idx = rng.integers(0, 32, (ROWS, COLS // 32))
    for r in range(ROWS):
        for b in range(COLS // 32):
            outlier[r, b * 32 + idx[r, b]] = np.float32(1e4) * (1 if (r + b) % 2 else -1)
    cases["outlier"] = outlier
    # Subnormals: float32 subnormals, and values whose scale is a half subnormal.
    sub = (rng.standard_normal((ROWS, COLS)) * 1e-39).astype(np.float32)
    sub[::4, :32] = np.float32(1.4e-45)                           # the smallest subnormal
    cases["subnormal_f32"] = sub
    cases["subnormal_f16"] = _blocks(rng) * np.float32(1e-6)
    mixed = _blocks(rng)
    mixed[:, 1::2] *= np.float32(1e-40)                           # normals beside subnormals
    cases["subnormal_mixed"] = mixed
    inf = _blocks(rng)
    inf[:, 5] = np.inf
    inf[:, 40] = -np.inf
    inf[2, 64:96] = np.inf                                        # a block of only +Inf
    cases["inf"] = inf
    nan = _blocks(rng)
    nan[:, 7] = np.nan
    nan[3, 96:128] = np.nan                                       # a block of only NaN
    nan[5, 128:160] = -np.float32(np.nan)
    cases["nan"] = nan
    return cases


def save_inputs(path: str) -> None:
    from kvlab._io import atomic_path
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **golden_cases())


if __name__ == "__main__":
    import sys
    save_inputs(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/inputs.npz")
