"""x @ H_n on every n-chunk of the tile, bit-equal to kernels/hadamard.py.

The CPU transform runs butterfly stages (a + b, a - b) for h = 1, 2, 4 .. n/2 over each chunk, then
multiplies every value by H_n[0, 0]. Any split of that work among threads gives the same floats as
long as each stage sees the previous stage's results. A chunk of n values is n/32 consecutive tile
rows (tile.py), so:
  - stages h < 32 pair values of one row: thread t runs them on its row in registers (fwht_row);
  - stages h >= 32 pair rows of a chunk column by column: through the tile, a thread takes whole
    columns of a chunk into registers (fwht_col_<rows>, for chunks of 2, 4 or 8 rows: n = 64 .. 256),
    or for larger n runs one stage at a time in shared memory with a barrier between stages.
The register versions are straight-line code, written out below by _butterfly_source, so every
value stays in a register.
"""
import numpy as np
from numba import cuda

from .ops import add, device, mul, sub
from .tile import read_row, write_row
from .unroll import unrolled



def _butterfly_source(name, params, size, at, guarded):
    """Python source of a device function: load `size` values (at(k) is element k), run the butterfly
    stages (each `if n > h` when guarded: chunks smaller than the row), scale, store back."""
    body = [f"    v{k} = {at(k)}" for k in range(size)]
    h = 1
    while h < size:
        indent = "    "
        if guarded:
            body.append(f"    if n > {h}:")
            indent = "        "
        for start in range(0, size, 2 * h):
            body += [f"{indent}v{i}, v{i + h} = add(v{i}, v{i + h}), sub(v{i}, v{i + h})"
                     for i in range(start, start + h)]
        h *= 2
    indent = "    "
    if guarded:
        body.append(f"    if n <= {size}:")
        indent = "        "
    body += [f"{indent}v{k} = mul(v{k}, scale)" for k in range(size)]
    body += [f"    {at(k)} = v{k}" for k in range(size)]
    return f"def {name}({params}):\n" + "\n".join(body) + "\n"


def _compile(name, params, size, at, guarded):
    scope = {"add": add, "sub": sub, "mul": mul, "_u": np.uint32}
    exec(_butterfly_source(name, params, size, at, guarded), scope)
    return device(scope[name])


# fwht_row(row, n, scale): stages h < min(n, 32) on the 32 values of row, scaled when the chunk fits it
fwht_row = _compile("fwht_row", "row, n, scale", 32, lambda k: f"row[{k}]", True)
# fwht_col_<rows>(tile, r0, j, scale): all stages of the column j of rows r0 .. r0 + rows - 1
fwht_col_2 = _compile("fwht_col_2", "tile, a, b, scale", 2, lambda k: f"tile[_u(a + {k}), b]", False)
fwht_col_4 = _compile("fwht_col_4", "tile, a, b, scale", 4, lambda k: f"tile[_u(a + {k}), b]", False)
fwht_col_8 = _compile("fwht_col_8", "tile, a, b, scale", 8, lambda k: f"tile[_u(a + {k}), b]", False)


@device
def _columns_in_registers(tile, rows, scale, tpb):
    """Chunks of 2, 4 or 8 rows: thread t takes the columns v = t, t + tpb, .. (32 / rows of them)."""
    t = cuda.threadIdx.x
    for k in range(32 // rows):
        v = t + k * tpb
        r0 = np.uint32((v >> 5) * rows)
        j = np.uint32(v & 31)               # unsigned: no wrap-around code on the indices
        if rows == 2:
            fwht_col_2(tile, r0, j, scale)
        elif rows == 4:
            fwht_col_4(tile, r0, j, scale)
        else:
            fwht_col_8(tile, r0, j, scale)


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
    (H_n[0, 0] == scale); every thread calls it, with the tile's rows stale or not: for n > 32 the
    rows go through the tile (overwritten), with barriers."""
    fwht_row(row, n, scale)
    if n > 32:
        t = np.uint32(cuda.threadIdx.x)
        write_row(tile, t, row)
        cuda.syncthreads()
        if n <= 256:
            _columns_in_registers(tile, n >> 5, scale, tpb)
            cuda.syncthreads()
            read_row(tile, t, row)
        else:
            _columns_in_shared(tile, n >> 5, tpb)
            read_row(tile, t, row)
            scale_row(row, scale)
        cuda.syncthreads()            # the tile is free again (the caller may write rows into it)
