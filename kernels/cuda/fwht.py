"""x @ H_n on every n-chunk of the tile, bit-equal to kernels/hadamard.py.

The CPU transform runs butterfly stages (a + b, a - b) for h = 1, 2, 4 .. n/2 over each chunk, then
multiplies every value by H_n[0, 0]. Any split of that work among threads gives the same floats as
long as each stage sees the previous stage's results. A chunk of n values is n/32 consecutive tile
rows (tile.py), so:
  - stages h < 32 pair values of one row: thread t runs them on its row in registers (fwht_row_32,
    all five stages unguarded, for n >= 32; fwht_row for the rotate kernel's n < 32, each stage
    behind `if n > h`, which leaves a register copy of every value per stage in SASS);
  - stages h >= 32 pair rows of a chunk column by column: through the tile, a thread takes 4 whole
    columns of a chunk into registers (fwht_cols_<rows>, for chunks of 2, 4 or 8 rows: n = 64 .. 256,
    the lane's 8 / rows units written out per n: constant addresses, no loop, no division),
    or for larger n runs one stage at a time in shared memory with a barrier between stages.
    A chunk of 2 .. 8 rows lies in one warp (row t is thread t's, a warp's 32 rows hold 4 .. 16 whole
    chunks), so each warp transforms the columns of its own rows, between two warp barriers: the
    block's other warps go on meanwhile (no block barrier for n <= 256).
The register versions are straight-line code, written out below by _butterfly_source, so every
value stays in a register. rotate_row leaves a thread's rotated row in registers (the quantizers);
rotate_into_tile leaves it in the tile (dequantize+unrotate, rotate: for n = 64 .. 256 the column
stages end there, no read back and write again).
Measured (H200, bench/README.md): the fused quantizers at n = 32 (row stages only) run at the quantizers'
own 1.02 of copy_; n = 64 .. 256 at 0.87-0.92: the trip through the tile for the columns costs the rest,
about as much for one column stage as for three.
"""
import numpy as np
from numba import cuda

from .ops import add, device, ld_f32x4, mul, st_f32x4, sub, warp_barrier
from .tile import TILE_W, read_row, write_row
from .unroll import unrolled



def _butterfly_source(name, params, size, lanes, load, store, guarded):
    """Python source of a device function on `size` elements of `lanes` values each (v{k}_{c} is lane c
    of element k): load them (the lines load(k)), run the butterfly stages between elements, lane by
    lane (each stage `if n > h` when guarded: chunks smaller than the row), scale, store (store(k))."""
    body = [line for k in range(size) for line in load(k)]
    h = 1
    while h < size:
        indent = "    "
        if guarded:
            body.append(f"    if n > {h}:")
            indent = "        "
        for start in range(0, size, 2 * h):
            body += [f"{indent}v{i}_{c}, v{i + h}_{c} = add(v{i}_{c}, v{i + h}_{c}), sub(v{i}_{c}, v{i + h}_{c})"
                     for i in range(start, start + h) for c in range(lanes)]
        h *= 2
    indent = "    "
    if guarded:
        body.append(f"    if n <= {size}:")
        indent = "        "
    body += [f"{indent}v{k}_{c} = mul(v{k}_{c}, scale)" for k in range(size) for c in range(lanes)]
    body += [line for k in range(size) for line in store(k)]
    return f"def {name}({params}):\n" + "\n".join(f"    {line}" if not line.startswith(" ") else line
                                                    for line in body) + "\n"


def _compile(name, params, size, lanes, load, store, guarded):
    scope = {"add": add, "sub": sub, "mul": mul, "ld_f32x4": ld_f32x4, "st_f32x4": st_f32x4}
    exec(_butterfly_source(name, params, size, lanes, load, store, guarded), scope)
    return device(scope[name])


# fwht_row(row, n, scale): stages h < min(n, 32) on the 32 values of row, scaled when the chunk fits it
# (each stage behind `if n > h`: the rotate kernel's n < 32 only, since a stage that may not run leaves
# a register copy of every value behind it in SASS)
fwht_row = _compile("fwht_row", "row, n, scale", 32, 1, lambda k: [f"v{k}_0 = row[{k}]"],
                    lambda k: [f"row[{k}] = v{k}_0"], True)


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


def _columns(rows):
    """fwht_cols_<rows>(tile, at, scale): all stages of the 4 columns at flat tile index at .. at + 3
    of `rows` consecutive rows, one float4 per row."""
    def load(k):
        return [f"a{k} = ld_f32x4(tile, at + {k * TILE_W})"] + [f"v{k}_{c} = a{k}[{c}]" for c in range(4)]

    def store(k):
        return [f"st_f32x4(tile, at + {k * TILE_W}, v{k}_0, v{k}_1, v{k}_2, v{k}_3)"]

    return _compile(f"fwht_cols_{rows}", "tile, at, scale", rows, 4, load, store, False)


fwht_cols_2, fwht_cols_4, fwht_cols_8 = _columns(2), _columns(4), _columns(8)


def _units_source(rows):
    """units_<rows>(tile, first, lane, w, scale): fwht_cols_<rows> on the lane's units u = lane + k * w,
    k = 0 .. 8 / rows - 1, of the warp whose first row is `first` (w = min(32, tpb) rows a warp): unit u
    is the warp's chunk u / 8, columns 4 * (u % 8) .. (u % 8 a quarter warp's lane: 8 float4 of one row,
    32 banks)."""
    lines = []
    for k in range(8 // rows):
        lines += [f"u = lane + U32({k}) * w",
                  f"cols(tile, (first + (u >> U32(3)) * U32({rows})) * U32({TILE_W}) + (u & U32(7)) * U32(4), scale)"]
    return f"def units_{rows}(tile, first, lane, w, scale):\n" + "".join(f"    {line}\n" for line in lines)


def _compile_units(rows):
    scope = {"cols": {2: fwht_cols_2, 4: fwht_cols_4, 8: fwht_cols_8}[rows], "U32": np.uint32}
    exec(_units_source(rows), scope)
    return device(scope[f"units_{rows}"])


_units_2, _units_4, _units_8 = _compile_units(2), _compile_units(4), _compile_units(8)


@device
def _columns_in_warp(tile, n, scale, tpb):
    """Chunks of 2, 4 or 8 rows (n = 64, 128, 256), each warp over its own rows (w = min(32, tpb) rows
    from the warp's first): a lane takes 8 / rows units of 4 adjacent columns (a float4) of a chunk's
    rows, written out per n (constant indices, no loop)."""
    w = np.uint32(min(32, tpb))
    t = np.uint32(cuda.threadIdx.x)
    lane = t & (w - np.uint32(1))
    first = t - lane                          # the warp's first row
    if n == 64:
        _units_2(tile, first, lane, w, scale)
    elif n == 128:
        _units_4(tile, first, lane, w, scale)
    else:
        _units_8(tile, first, lane, w, scale)


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
    writes another's row after the caller's last block barrier): for n > 32 the rows go through the
    tile (overwritten), with warp barriers (n <= 256: a chunk's rows are one warp's) or block barriers.
    On return thread t may write tile row t (the only row it read last) with no barrier; other rows
    only after a block barrier."""
    if n < 32:
        fwht_row(row, n, scale)
        return
    fwht_row_32(row)
    if n == 32:
        scale_row(row, scale)
        return
    t = np.uint32(cuda.threadIdx.x)
    write_row(tile, t, row)
    if n <= 256:
        warp_barrier()                        # the warp's rows: its chunks' whole columns
        _columns_in_warp(tile, n, scale, tpb)
        warp_barrier()
        read_row(tile, t, row)
    else:
        cuda.syncthreads()
        _columns_in_shared(tile, n >> 5, tpb)
        read_row(tile, t, row)
        scale_row(row, scale)


@device
def rotate_into_tile(tile, row, n, scale, tpb):
    """rotate_row, its result left in tile row t (thread t's) instead of in row: for n = 64 .. 256 the
    column stages leave it there already, so no read back and write again (16 shared accesses a thread);
    the caller's block barrier publishes the tile. row is spent."""
    t = np.uint32(cuda.threadIdx.x)
    if n > 32 and n <= 256:
        fwht_row_32(row)
        write_row(tile, t, row)
        warp_barrier()
        _columns_in_warp(tile, n, scale, tpb)
    else:
        rotate_row(tile, row, n, scale, tpb)
        write_row(tile, t, row)

