"""The large check set: 2^18 blocks of 32 float32 that any machine regenerates bit for bit.

Built from a splitmix64 hash of the value index with integer and power-of-two arithmetic only
(no library transcendental whose last bit could vary between numpy builds), so the GPU machine
and this one produce identical floats. Every 8 consecutive blocks hold one block of each kind:
"""
import numpy as np

N_BLOCKS = 1 << 18
BLOCK = 32
KINDS = ("normal", "normal_wide", "ties_half_grid", "ties_q4_grid", "subnormal_mixed",
         "f16_subnormal_scale", "outlier", "ties_int_grid")


def _splitmix64(i: np.ndarray) -> np.ndarray:
    z = i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(seed: int, shape) -> np.ndarray:
    """Uniform [0, 1) float64 with 24 random bits: exact, no rounding anywhere."""
    idx = np.arange(np.prod(shape), dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 40)
    return (_splitmix64(idx) >> np.uint64(40)).astype(np.float64).reshape(shape) * 2.0 ** -24


def _ints(seed: int, shape, lo: int, hi: int) -> np.ndarray:
    idx = np.arange(np.prod(shape), dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 40)
    return (lo + (_splitmix64(idx) % np.uint64(hi - lo)).astype(np.int64)).reshape(shape)


def large_inputs(n_blocks: int = N_BLOCKS) -> np.ndarray:
    """(n_blocks, 32) float32; block b is of kind KINDS[b % 8]."""
    assert n_blocks % len(KINDS) == 0
    per = n_blocks // len(KINDS)
    shape = (per, BLOCK)
    # Irwin-Hall of four uniforms: near-normal, every step exact in float64.
    normal = (_uniform(1, shape) + _uniform(2, shape) + _uniform(3, shape) + _uniform(4, shape) - 2.0) * 1.5
    scale = np.exp2(_ints(5, (per, 1), -12, 13).astype(np.float64))          # 2^-12 .. 2^12 per block
    wide = normal * scale * (1.0 + _uniform(6, (per, 1)))
    half_grid = _ints(7, shape, -255, 256) / 2.0
    q4_grid = _ints(8, shape, 0, 16) * 0.25 + _ints(9, (per, 1), -4, 4)
    sub_mixed = normal.copy()
    sub_mixed[:, 1::2] *= 2.0 ** -133                                        # float32 subnormals beside normals
    f16_sub = normal * 2.0 ** -20                                            # scales that are half subnormals
    outlier = normal.copy()
    pos = _ints(10, (per,), 0, BLOCK)
    outlier[np.arange(per), pos] = np.where(_ints(11, (per,), 0, 2) == 0, -1.0, 1.0) * 1e4
    int_grid = _ints(12, shape, -8, 8).astype(np.float64)
    kinds = (normal, wide, half_grid, q4_grid, sub_mixed, f16_sub, outlier, int_grid)
    out = np.stack(kinds, axis=1)                                            # (per, 8, 32): kinds interleave
    return out.reshape(n_blocks, BLOCK).astype(np.float32)                   # (n_blocks, 32)


def kind_of_block(n_blocks: int = N_BLOCKS) -> np.ndarray:
    """Index into KINDS for every block."""
    return np.arange(n_blocks) % len(KINDS)


if __name__ == "__main__":
    import hashlib, sys
    x = large_inputs()
    if len(sys.argv) > 1:
        x.tofile(sys.argv[1])
    print("large inputs", x.shape, "sha256", hashlib.sha256(x.tobytes()).hexdigest())
