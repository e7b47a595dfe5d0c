"""The large on-GPU byte-equality run (needs a CUDA GPU and torch; prints JSON lines).

Inputs: tools/cuda_golden/large_inputs.py (n_blocks of 32 values, 8 adversarial kinds interleaved),
as rows of 4096. Every count is of 32-value blocks (of single values for f32/f16/bf16) whose bytes
differ, outputs poisoned before each GPU run so an unwritten byte shows:
  quantize      GPU kernels vs the CPU kernels (kvlab.quantize on numpy), 9 types x 3 flavors;
                the cuda flavor, GPU and CPU, vs ggml-cuda itself: tools/cuda_golden/harness.cu built
                here by nvcc when .vendor_cuda/ holds ggml's sources (all n_blocks), and the bytes
                saved in .cuda_large/large_{a,b,c}.npz (their first 2^18 blocks, same inputs)
  dequantize    GPU vs CPU kernels (float32 bits)
  set_rows      rows to shuffled cache rows, GPU vs the CPU quantize of the same rows (ids checked in
                every CUDA block, and by the separate check kernel past kernels.IDS_CHECKED_IN_KERNEL ids);
                a call with one id out of range: bytes changed (must be 0) and whether it raised
  rotate_quantize / dequantize_unrotate / rotate    vs kernels/hadamard.py's rotate_rows + CPU kernels
  unaligned     arrays off 16-byte alignment and rows of 4k+2 values (the slow paths)
  partial_tiles tensors whose last tile is partial (3,003 and 10,656 blocks): quantize, dequantize,
                dequantize_unrotate at n = 32, 512, 1024 (a chunk across warps)
  graph         a decode step's set_rows (1 token x 8 KV heads x 128, the cuda flavor) captured into a
                torch.cuda.CUDAGraph and replayed for 8 tokens, vs the same calls made eagerly
    python bench/gpu_check.py [n_blocks] [--types q4_1,iq4_nl] [--flavors ref,cuda]   (default 2^20, all)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tools", "cuda_golden"))
from large_inputs import large_inputs  # noqa: E402

import kvlab  # noqa: E402
import kvlab.kernels.cuda as kc  # noqa: E402
from kvlab.kernels.cuda import kernels  # noqa: E402
from kvlab.kernels import hadamard  # noqa: E402
from kvlab.rotation import hadamard_scale  # noqa: E402
from kvlab.types import FLAVORS, TYPES  # noqa: E402

COLS = 4096
POISON = 0xAB


def emit(**rec):
    print(json.dumps(rec), flush=True)


def blocks_differ(got, want, info):
    """Blocks (values for f32/f16/bf16) whose bytes differ; got/want uint8 of the same size."""
    width = info.type_size
    return int((np.asarray(got).reshape(-1, width) != np.asarray(want).reshape(-1, width)).any(1).sum())


def ggml_cuda_harness(x):
    """ggml-cuda's own quantizers (tools/cuda_golden/harness.cu) on x; None without nvcc or sources."""
    g = os.path.join(ROOT, ".vendor_cuda", "ggml")
    if not os.path.isdir(g):
        return None
    work = tempfile.mkdtemp()
    exe = os.path.join(work, "harness")
    subprocess.run(["nvcc", "-use_fast_math", "-extended-lambda", "-arch=sm_90", "-std=c++17", "-O3", "-DNDEBUG",
                    "-I", f"{g}/include", "-I", f"{g}/src", "-I", f"{g}/src/ggml-cuda", "-o", exe,
                    os.path.join(ROOT, "tools", "cuda_golden", "harness.cu")], check=True)
    x.tofile(os.path.join(work, "in.bin"))
    subprocess.run([exe, os.path.join(work, "in.bin"), work], check=True, capture_output=True)
    return {t: np.fromfile(os.path.join(work, f"{t}.bin"), np.uint8) for t in TYPES}


def saved_ggml_cuda():
    """The bytes ggml-cuda wrote for large_inputs(2^18), from .cuda_large/ (where carried)."""
    out = {}
    for part in "abc":
        path = os.path.join(ROOT, ".cuda_large", f"large_{part}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                out.update({k: z[k] for k in z.files})
    return out


def gpu(a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def poisoned(shape, dtype=torch.uint8, offset=0):
    """A GPU array filled with POISON bytes (NaN floats), starting `offset` elements into its buffer."""
    fill = POISON if dtype == torch.uint8 else float("nan")
    buf = torch.full((int(np.prod(shape)) + offset,), fill, dtype=dtype, device="cuda")
    return buf[offset:].view(shape)


def twice(out, fn):
    """fn() writing out, then out poisoned again and fn() once more: the second call takes the direct
    launch that the first (numba's dispatcher) left behind (kvlab.kernels.cuda), and is the one checked."""
    fn()
    out.fill_(POISON if out.dtype == torch.uint8 else float("nan"))
    fn()


def cpu_quantize(rows, name, flavor):
    return np.asarray(kvlab.quantize(rows, name, flavor).raw)


def check_quantize(rows, xg, ggml, saved, types, flavors):
    n_saved = 0
    for name, info in types.items():
        for flavor in flavors:
            out = poisoned((rows.shape[0], info.row_bytes(COLS)))
            twice(out, lambda: kc.quantize(xg, out, info, FLAVORS.index(flavor)))
            got = out.cpu().numpy()
            want = cpu_quantize(rows, name, flavor)
            rec = {"check": "quantize", "type": name, "flavor": flavor, "blocks": got.size // info.type_size,
                   "gpu_vs_cpu_kernel": blocks_differ(got, want, info)}
            if flavor == "cuda":
                if ggml is not None:
                    rec["gpu_vs_ggml_cuda"] = blocks_differ(got, ggml[name], info)
                    rec["cpu_cuda_flavor_vs_ggml_cuda"] = blocks_differ(want, ggml[name], info)
                if name in saved:
                    n_saved = saved[name].size
                    rec["saved_blocks"] = n_saved // info.type_size
                    rec["gpu_vs_saved_ggml_cuda"] = blocks_differ(got.reshape(-1)[:n_saved], saved[name], info)
                    rec["cpu_cuda_flavor_vs_saved_ggml_cuda"] = blocks_differ(want.reshape(-1)[:n_saved],
                                                                             saved[name], info)
            emit(**rec)
        back = poisoned(rows.shape, torch.float32)
        raw = gpu(want)                                          # want: the cuda flavor's bytes
        twice(back, lambda: kc.dequantize(raw, back, info))
        ref = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(want, name, rows.shape)))
        emit(check="dequantize", type=name, values=int(ref.size),
             gpu_vs_cpu_kernel=int((back.cpu().numpy().view(np.uint32) != ref.view(np.uint32)).sum()))


def check_set_rows(rows, xg, types):
    rng = np.random.default_rng(1)
    for name in [t for t in ("q4_1", "iq4_nl", "f16") if t in types]:
        info = TYPES[name]
        for n in sorted({min(512, rows.shape[0]), min(2 * kernels.IDS_CHECKED_IN_KERNEL, rows.shape[0])}):
            ids = rng.permutation(2 * n)[:n]                       # n distinct rows of a 2n-row cache
            cache = torch.zeros((2 * n, info.row_bytes(COLS)), dtype=torch.uint8, device="cuda")
            kc.set_rows(cache, torch.as_tensor(ids, device="cuda"), xg[:n], info, 2)
            want = np.zeros((2 * n, info.row_bytes(COLS)), np.uint8)
            want[ids] = cpu_quantize(rows[:n], name, "cuda")
            emit(check="set_rows", type=name, flavor="cuda", rows=n,
                 gpu_vs_cpu_kernel=blocks_differ(cache.cpu(), want, info))
            ids[n // 2] = 2 * n                                    # one id past the cache
            before = cache.clone()
            try:
                kc.set_rows(cache, torch.as_tensor(ids, device="cuda"), xg[:n], info, 2)
                torch.cuda.synchronize()
                kc.raise_refused()
                raised = False
            except ValueError:
                raised = True
            emit(check="set_rows_refused", type=name, rows=n, raised=raised,
                 bytes_changed=int((cache != before).sum()))


def rotated(rows, n):
    rot = np.zeros((rows.size // n, n), np.float32)
    hadamard.rotate_rows(rows.reshape(-1, n), rot, hadamard_scale(n))      # (chunks, n)
    return rot.reshape(rows.shape)


def check_rotation(rows, xg, types, flavors):
    for n in (1, 16, 64, 256, 4096):
        out = poisoned(rows.shape, torch.float32)
        twice(out, lambda: kc.rotate(xg, out, n, hadamard_scale(n)))
        emit(check="rotate", n=n, values=int(rows.size),
             gpu_vs_cpu=int((out.cpu().numpy().view(np.uint32) != rotated(rows, n).view(np.uint32)).sum()))
    for k, n in enumerate((64, 128, 256, 1024)):
        rot = rotated(rows, n)
        for name, info in types.items():
            if not info.is_quantized:
                continue
            flavor = FLAVORS[(k + len(name)) % 3]
            if flavor not in flavors:
                continue
            out = poisoned((rows.shape[0], info.row_bytes(COLS)))
            twice(out, lambda: kc.rotate_quantize(xg, out, info, FLAVORS.index(flavor), n, hadamard_scale(n)))
            want = cpu_quantize(rot, name, flavor)
            emit(check="rotate_quantize", type=name, n=n, flavor=flavor, gpu_vs_cpu=blocks_differ(out.cpu(), want, info))
            # read back at every n (at 1024 one chunk spans several warps of a CUDA block)
            back = poisoned(rows.shape, torch.float32)
            raw = gpu(want)
            twice(back, lambda: kc.dequantize_unrotate(raw, back, info, n, hadamard_scale(n)))
            deq = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(want, name, rows.shape)))
            emit(check="dequantize_unrotate", type=name, n=n, gpu_vs_cpu=int(
                (back.cpu().numpy().view(np.uint32) != rotated(deq, n).view(np.uint32)).sum()))


def check_partial_tiles(rows, types):
    """Tensors whose last tile is partial (block counts not a multiple of a CUDA block's rows), so the last
    tile's rows end inside a warp or leave whole warps idle: quantize (cuda flavor), dequantize, and
    dequantize_unrotate at an n within a warp's rows (32) and across warps (512, 1024)."""
    for shape, n in (((1001, 96), 32), ((333, 1024), 512), ((333, 1024), 1024)):      # 3003 / 10656 blocks
        part = np.ascontiguousarray(rows.reshape(-1)[:shape[0] * shape[1]].reshape(shape))
        for name, info in types.items():
            if not info.is_quantized:
                continue
            out = poisoned((shape[0], info.row_bytes(shape[1])))
            twice(out, lambda: kc.quantize(gpu(part), out, info, 2))
            want = cpu_quantize(part, name, "cuda")
            raw = gpu(want)
            deq = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(want, name, shape)))
            back = poisoned(shape, torch.float32)
            twice(back, lambda: kc.dequantize(raw, back, info))
            unrot = poisoned(shape, torch.float32)
            twice(unrot, lambda: kc.dequantize_unrotate(raw, unrot, info, n, hadamard_scale(n)))
            emit(check="partial_tiles", type=name, shape=list(shape), n=n,
                 quantize_gpu_vs_cpu=blocks_differ(out.cpu(), want, info),
                 dequantize_gpu_vs_cpu=int((back.cpu().numpy().view(np.uint32) != deq.view(np.uint32)).sum()),
                 dequantize_unrotate_gpu_vs_cpu=int(
                     (unrot.cpu().numpy().view(np.uint32) != rotated(deq, n).view(np.uint32)).sum()))


def check_unaligned(rows, types):
    """x one float and out a few bytes off 16-byte alignment; rows of 4094 values (no quad path)."""
    for cols in (COLS, COLS - 2):
        x = np.ascontiguousarray(rows[:64, :cols])
        for name, info in types.items():
            if cols % info.block_size:
                continue
            xg = poisoned(x.shape, torch.float32, offset=1)
            xg.copy_(gpu(x))
            # per-value types need their values aligned (4 / 2 bytes); block bytes may start anywhere
            out = poisoned((x.shape[0], info.row_bytes(cols)), offset=2 if info.is_quantized else 4)
            twice(out, lambda: kc.quantize(xg, out, info, 2))
            want = cpu_quantize(x, name, "cuda")
            back = poisoned(x.shape, torch.float32, offset=1)
            twice(back, lambda: kc.dequantize(out, back, info))
            ref = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(want, name, x.shape)))
            emit(check="unaligned", type=name, cols=cols, quantize_gpu_vs_cpu=blocks_differ(out.cpu(), want, info),
                 dequantize_gpu_vs_cpu=int((back.cpu().numpy().view(np.uint32) != ref.view(np.uint32)).sum()))


def check_graph(rows, types):
    """set_rows of one token (8 KV heads x 128) captured once, replayed for 8 tokens (inputs fed through
    the graph's buffers) into a 16-row cache: blocks differing from 8 eager calls."""
    cols, steps = 8 * 128, 8
    tokens = gpu(rows.reshape(-1)[:steps * cols].reshape(steps, 1, cols))
    for name, info in types.items():
        eager = torch.zeros((16, info.row_bytes(cols)), dtype=torch.uint8, device="cuda")
        for t in range(steps):
            kc.set_rows(eager, torch.tensor([t], device="cuda"), tokens[t], info, 2)
        cache, value, row = torch.zeros_like(eager), torch.zeros_like(tokens[0]), torch.zeros(1, dtype=torch.int64,
                                                                                               device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):                           # warm-up on a side stream, as torch advises
            kc.set_rows(cache, row, value, info, 2)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kc.set_rows(cache, row, value, info, 2)
        cache.zero_()
        for t in range(steps):
            value.copy_(tokens[t])
            row.fill_(t)
            g.replay()
        torch.cuda.synchronize()
        emit(check="graph", type=name, flavor="cuda", tokens=steps,
             graph_vs_eager=blocks_differ(cache.cpu(), eager.cpu(), info))


def main(n_blocks, types, flavors):
    x = large_inputs(n_blocks)                                      # (n_blocks, 32)
    rows = x.reshape(-1, COLS)                                      # (n_blocks / 128, 4096): ggml rows
    t0 = time.time()
    ggml = ggml_cuda_harness(x)
    emit(check="ggml_cuda_harness", built=ggml is not None, seconds=round(time.time() - t0, 1))
    xg = gpu(rows)
    check_quantize(rows, xg, ggml, saved_ggml_cuda(), types, flavors)
    check_set_rows(rows, xg, types)
    check_rotation(rows, xg, types, flavors)
    check_unaligned(rows, types)
    check_graph(rows, types)
    check_partial_tiles(rows, types)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("n_blocks", type=int, nargs="?", default=1 << 20)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--flavors", default=",".join(FLAVORS))
    a = ap.parse_args()
    t0 = time.time()
    main(a.n_blocks, {name: TYPES[name] for name in a.types.split(",")}, a.flavors.split(","))
    emit(check="done", seconds=round(time.time() - t0, 1))
