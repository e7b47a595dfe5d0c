"""Every entry point of kvlab.kernels.cuda on small inputs, run under the Numba CUDA simulator.

    NUMBA_ENABLE_CUDASIM=1 python cuda_sim_outputs.py INPUTS.npz OUT.npz

test_cuda_sim.py runs this once per session (the simulator must be chosen before numba.cuda is first
imported, so it runs in its own process) and compares each output with the CPU kernels and with
ggml-cuda's bytes, one test per output. Keys: quantize/<type>/<flavor>/<case>, dequantize/<type>/<case>,
rotate/<n>, rotate_quantize/<n>/<flavor>, dequantize_unrotate/<n>, set_rows_f16/<cols>,
set_rows_ids[_raised]/<n_ids>/<bad>, api/<what>.
Shapes are tiny: the simulator runs every GPU thread as a Python thread.
"""
import os
import sys

import numpy as np

import kvlab
from kvlab.rotation import hadamard_scale
from kvlab.types import FLAVORS, TYPES

CASES = ("normal", "ties_pm", "subnormal_mixed", "nan", "inf", "zeros")
ROTATIONS = (((2, 256), 1), ((2, 256), 4), ((2, 256), 32), ((2, 256), 64), ((2, 256), 128), ((2, 256), 256),
             ((2, 512), 512))                                                                   # (shape, n)
FUSED = ((32, "cuda"), (64, "ref"), (128, "cpu"), (256, "cuda"), (512, "cpu"))                                                 # (n, flavor)
FUSED_ROW_IDS = (2, 0)                      # rotate_quantize writes rows 0, 1 of x to these rows of a 3-row cache
LOOPED = (("iq4_nl", "ref", 0), ("iq4_nl", "cuda", 0), ("iq4_nl", "cpu", 64))  # (lookahead type, flavor, rotation n)
LOOPED_ROWS = 5                             # (5, 256): 40 blocks, 3 tiles of 16 (the last partial) on 2 CUDA blocks
SET_ROWS_IDS = (2, 6)                       # ids per set_rows: checked in every CUDA block / by a kernel first


def rotation_input(inputs, shape):
    return np.ascontiguousarray(inputs["normal"][:4].reshape(-1)[:shape[0] * shape[1]].reshape(shape))


def run(inputs) -> dict:
    from numba import cuda                  # here, not at import: test_cuda_sim.py imports the constants
    import kvlab.kernels.cuda as kc
    out = {}
    for name, info in TYPES.items():
        for case in CASES:
            x = np.ascontiguousarray(inputs[case][1:2])                  # (1, 256): one row
            for code, flavor in enumerate(FLAVORS):
                raw = cuda.to_device(np.zeros((1, info.row_bytes(256)), np.uint8))
                kc.quantize(cuda.to_device(x), raw, info, code)
                out[f"quantize/{name}/{flavor}/{case}"] = raw.copy_to_host()
            deq = cuda.to_device(np.zeros((1, 256), np.float32))
            kc.dequantize(raw, deq, info)                                # the cuda flavor's bytes
            out[f"dequantize/{name}/{case}"] = deq.copy_to_host()
    for name, flavor, n in LOOPED:     # 2 tiles a CUDA block: a block loads its next tile while it works
        x = np.ascontiguousarray(inputs["normal"][:LOOPED_ROWS])
        raw = cuda.to_device(np.zeros((LOOPED_ROWS, TYPES[name].row_bytes(256)), np.uint8))
        if n:                          # and through row_ids: row k to row LOOPED_ROWS - 1 - k
            kc.rotate_quantize(cuda.to_device(x), raw, TYPES[name], FLAVORS.index(flavor), n, hadamard_scale(n),
                               row_ids=cuda.to_device(np.arange(LOOPED_ROWS)[::-1].copy()))
        else:
            kc.quantize(cuda.to_device(x), raw, TYPES[name], FLAVORS.index(flavor))
        out[f"looped/{name}/{flavor}/{n}"] = raw.copy_to_host()
    for shape, n in ROTATIONS:        # in-row stages only, register columns, shared-memory columns
        a = rotation_input(inputs, shape)
        rot = cuda.to_device(np.zeros(shape, np.float32))
        kc.rotate(cuda.to_device(a), rot, n, hadamard_scale(n))
        out[f"rotate/{n}"] = rot.copy_to_host()
    for n, flavor in FUSED:
        a = rotation_input(inputs, (2, max(256, n)))
        q = kvlab.quantize(kvlab.rotate(a, n), "q4_0", flavor).raw                # (2, row_bytes), host
        cache = cuda.to_device(np.zeros((3, q.shape[1]), np.uint8))
        kc.rotate_quantize(cuda.to_device(a), cache, TYPES["q4_0"], FLAVORS.index(flavor), n, hadamard_scale(n),
                           row_ids=cuda.to_device(np.array(FUSED_ROW_IDS, np.int64)))
        out[f"rotate_quantize/{n}/{flavor}"] = cache.copy_to_host()
        back = cuda.to_device(np.zeros(a.shape, np.float32))
        kc.dequantize_unrotate(cuda.to_device(q), back, TYPES["q4_0"], n, hadamard_scale(n))
        out[f"dequantize_unrotate/{n}"] = back.copy_to_host()
    for cols in (256, 6):             # whole 16-byte groups, and not (the one-value kernel)
        v = np.ascontiguousarray(inputs["nan"][:2, :cols])
        cache = cuda.to_device(np.zeros((3, 2 * cols), np.uint8))
        kc.set_rows(cache, cuda.to_device(np.array([1, 2], np.int32)), cuda.to_device(v), TYPES["f16"], 1)
        out[f"set_rows_f16/{cols}"] = cache.copy_to_host()
    for n_ids in SET_ROWS_IDS:        # every CUDA block checks the ids / check_rows_kernel does first
        v = np.ascontiguousarray(inputs["normal"][:n_ids, :32])                 # (n_ids, 32): q8_0 rows
        for bad in (False, True):
            ids = np.arange(n_ids)[::-1].copy()
            if bad:
                ids[n_ids // 2] = n_ids                                          # past the cache's rows
            cache = cuda.to_device(np.full((n_ids, 34), 0xAB, np.uint8))
            try:
                kc.set_rows(cache, cuda.to_device(ids), cuda.to_device(v), TYPES["q8_0"], 0)
                raised = False
            except ValueError:
                raised = True
            out[f"set_rows_ids/{n_ids}/{bad}"] = cache.copy_to_host()
            out[f"set_rows_ids_raised/{n_ids}/{bad}"] = np.array(raised)
    # the public API routes device arrays to these kernels
    dev = cuda.to_device(np.ascontiguousarray(inputs["ties_pm"][:2, :64]))       # (2, 64)
    for name in ("q4_1", "f16"):
        q = kvlab.quantize(dev, name, "cuda")
        out[f"api/quantize/{name}"] = q.raw.copy_to_host()
        out[f"api/dequantize/{name}"] = kvlab.dequantize(q).copy_to_host()
        # out=: the caller's device buffers, written in place and handed back
        raw = cuda.to_device(np.full(q.raw.shape, 0xAB, np.uint8))
        values = cuda.to_device(np.full((2, 64), np.nan, np.float32))
        same = kvlab.quantize(dev, name, "cuda", out=raw).raw is raw and kvlab.dequantize(q, out=values) is values
        out[f"api/out_is_the_buffer/{name}"] = np.array(same)
        out[f"api/quantize_out/{name}"] = raw.copy_to_host()
        out[f"api/dequantize_out/{name}"] = values.copy_to_host()
    out["api/rotate"] = kvlab.rotate(dev, 64).copy_to_host()
    cache = kvlab.QTensor(cuda.to_device(np.zeros((4, 40), np.uint8)), "q4_1", (4, 64), "cuda")
    kvlab.set_rows(cache, np.array([3, 1]), dev)
    out["api/set_rows"] = cache.raw.copy_to_host()
    return out


def main(inputs_path, out_path):
    with np.load(inputs_path) as f:
        outputs = run({k: f[k] for k in f.files})
    with open(out_path + ".part", "wb") as f:
        np.savez(f, **outputs)
    os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
