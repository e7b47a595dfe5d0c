"""x @ H_n on every n-chunk of the tile, bit-equal to kernels/hadamard.py.

The CPU transform runs butterfly stages (a + b, a - b) for h = 1, 2, 4 .. n/2 over each chunk, then
multiplies every value by H_n[0, 0]. Any split of that work among threads gives the same floats as
long as each stage sees the previous stage's results. A chunk of n values is n/32 consecutive tile
rows (tile.py), so:
  - stages h < 32 pair values of one row: thread t runs them on its row in registers (fwht_row_32,
    all five stages unguarded, for n >= 32; fwht_row for the rotate kernel's n < 32, each stage
    behind `if n > h`, which leaves a register copy of every value per stage in SASS);
  - stages h >= 32 pair rows of a chunk column by column. For n = 64 .. 256 a chunk's 2 .. 8 rows are
    consecutive lanes of one warp (row t is thread t's), and stage h trades each value with lane
    t ^ (h / 32) by warp shuffle (columns_<stages>): the row stays in registers, no shared memory, no
    barrier. Larger n run one stage at a time in shared memory, with a block barrier between stages.
The register versions are straight-line code written out below, so every value stays in a register.
rotate_row leaves a thread's rotated row in registers (the quantizers); rotate_into_tile leaves it in
the tile (dequantize+unrotate, rotate).
Why shuffles: a shuffle stage moves each value once (shuffles and shared memory move the same 128 bytes
a clock an SM), the tile's trip (write the row, read 4 columns of a chunk, write them, read the row
back, between warp barriers) four times. H200, fraction of copy_ (bench/gpu_quant.py, one run beside the
tile version built from the same templates): fused rotate+quantize ref at n = 64 / 128 / 256, q4_0
0.87 / 0.87 / 0.87 -> 1.01 / 0.96 / 0.92, q5_1 0.88 / 0.88 / 0.89 -> 0.97 / 0.95 / 0.91 (q8_0 1.02 / 1.00 /
0.96; every type >= 0.90; n = 32, no column stage, 1.01-1.02); dequantize+unrotate at n = 128 as the tile
version read in an earlier run (0.94-0.96), rotate 0.97.
"""
import numpy as np
from numba import cuda

from .ops import SIM, add, device, fma, mul, sub
from .tile import read_row, write_row
from .unroll import unrolled


def _guarded_row_source():
    """fwht_row(row, n, scale): the stages h < min(n, 32) on the 32 values of row, each behind
    `if n > h`, scaled when the chunk fits in the row."""
    body = [f"v{k} = row[{k}]" for k in range(32)]
    h = 1
    while h < 32:
        body.append(f"if n > {h}:")
        for start in range(0, 32, 2 * h):
            body += [f"    v{i}, v{i + h} = add(v{i}, v{i + h}), sub(v{i}, v{i + h})" for i in range(start, start + h)]
        h *= 2
    body.append("if n <= 32:")
    body += [f"    v{k} = mul(v{k}, scale)" for k in range(32)]
    body += [f"row[{k}] = v{k}" for k in range(32)]
    return "def fwht_row(row, n, scale):\n" + "".join(f"    {line}\n" for line in body)


def _compile_guarded_row():
    scope = {"add": add, "sub": sub, "mul": mul}
    exec(_guarded_row_source(), scope)
    return device(scope["fwht_row"])


# the rotate kernel's n < 32 only: a stage that may not run leaves a register copy of every value
# behind it in SASS
fwht_row = _compile_guarded_row()


def _row_stages_source():
    """fwht_row_32(row): the 5 stages h = 1 .. 16 on the 32 values of row, unguarded and unscaled (n >= 32)."""
    body = [f"v{k} = row[{k}]" for k in range(32)]
    h = 1
    while h < 32:
        for start in range(0, 32, 2 * h):
            body += [f"v{i}, v{i + h} = add(v{i}, v{i + h}), sub(v{i}, v{i + h})" for i in range(start, start + h)]
        h *= 2
    body += [f"row[{k}] = v{k}" for k in range(32)]
    return "def fwht_row_32(row):\n" + "".join(f"    {line}\n" for line in body)


def _compile_row_stages():
    scope = {"add": add, "sub": sub}
    exec(_row_stages_source(), scope)
    return device(scope["fwht_row_32"])


fwht_row_32 = _compile_row_stages()


def _shuffle_source(stages):
    """columns_<stages>(tile, row, scale): the column stages h = 32 .. 16 << stages of a chunk of
    1 << stages rows (n = 64, 128, 256), then the scale, row t being lane t's: stage h pairs lane t with
    lane t ^ (h / 32), value by value (shfl.sync.bfly); the lane whose bit h / 32 is clear holds a (row
    r), its partner b (row r + h / 32), and each keeps its own result as one fma(own, +-1, partner):
    a + b, or partner - own = a - b. own * +-1 is exact, so the one rounding is add.rn's: the same
    float as add / sub, signed zeros, NaN, Inf and subnormals included. No shared memory, no barrier.
    The simulator has no warp shuffle: there the rows trade through the tile (every thread of its
    one-warp block at once, between block barriers), tile row t ^ (h / 32) holding the partner's."""
    body = [f"v{j} = row[{j}]" for j in range(32)]
    body.append("t = cuda.threadIdx.x")
    for k in range(stages):
        m = 1 << k
        body.append(f"sign = F(-1.0) if t & {m} else F(1.0)")
        if SIM:
            body += [f"tile[t, {j}] = v{j}" for j in range(32)] + ["cuda.syncthreads()"]
            body += [f"p{j} = tile[t ^ {m}, {j}]" for j in range(32)] + ["cuda.syncthreads()"]
        else:
            body += [f"p{j} = cuda.shfl_xor_sync(0xFFFFFFFF, v{j}, {m})" for j in range(32)]
        body += [f"v{j} = fma(v{j}, sign, p{j})" for j in range(32)]
    body += [f"row[{j}] = mul(v{j}, scale)" for j in range(32)]
    return f"def columns_{stages}(tile, row, scale):\n" + "".join(f"    {line}\n" for line in body)


def _compile_shuffle(stages):
    scope = {"fma": fma, "mul": mul, "cuda": cuda, "F": np.float32}
    exec(_shuffle_source(stages), scope)
    return device(scope[f"columns_{stages}"])


_columns_1, _columns_2, _columns_3 = _compile_shuffle(1), _compile_shuffle(2), _compile_shuffle(3)


@device
def _columns_in_warp(tile, row, n, scale):
    """Chunks of 2, 4 or 8 rows (n = 64, 128, 256): a chunk's rows are consecutive lanes of one warp."""
    if n == 64:
        _columns_1(tile, row, scale)
    elif n == 128:
        _columns_2(tile, row, scale)
    else:
        _columns_3(tile, row, scale)

@device
def _scale(row, scale, k):
    row[k] = mul(row[k], scale)


@device
def _columns_in_shared(tile, rows, tpb):
    """Chunks of 16 rows or more: one stage at a time, tpb * 16 butterflies of row pairs per stage
    (the caller scales)."""
    t = cuda.threadIdx.x
    h = 1
    while h < rows:
        for p in range(t, tpb * 16, tpb):
            pair = p >> 5
            lo = 2 * pair - (pair & (h - 1))       # the row of the pair whose bit h is clear
            a = tile[lo, p & 31]
            b = tile[lo + h, p & 31]
            tile[lo, p & 31] = add(a, b)
            tile[lo + h, p & 31] = sub(a, b)
        cuda.syncthreads()
        h *= 2


scale_row = unrolled(_scale, 32, 2)         # scale_row(row, scale)


@device
def rotate_row(tile, row, n, scale, tpb):
    """row (thread t's 32 values) <- its part of chunk @ H_n for every n-chunk of the tile's values
    (H_n[0, 0] == scale); every thread calls it, once the tile's rows are its threads' alone (no thread
    writes another's row after the caller's last block barrier): n <= 256 in registers (the column
    stages by warp shuffle), n > 256 through the tile (overwritten) with block barriers. On return
    thread t may write tile row t (the only row it read last) with no barrier; other rows only after
    a block barrier."""
    if n < 32:
        fwht_row(row, n, scale)
        return
    fwht_row_32(row)
    if n == 32:
        scale_row(row, scale)
    elif n <= 256:
        _columns_in_warp(tile, row, n, scale)
    else:
        t = np.uint32(cuda.threadIdx.x)
        write_row(tile, t, row)
        cuda.syncthreads()
        _columns_in_shared(tile, n >> 5, tpb)
        read_row(tile, t, row)
        scale_row(row, scale)


@device
def rotate_into_tile(tile, row, n, scale, tpb):
    """rotate_row, its result left in tile row t (thread t's); the caller's block barrier publishes the
    tile. row is spent."""
    rotate_row(tile, row, n, scale, tpb)
    write_row(tile, np.uint32(cuda.threadIdx.x), row)
