"""GPU quantize / dequantize / fused rotate+quantize throughput (needs a CUDA GPU and torch).

Prints one JSON line per figure: GB/s of (bytes read + bytes written) and that as a fraction of
the same run's torch copy_ bandwidth; beside kvlab's kernels, torch eager and torch.compile of the
same block math (q8_0, q4_0, q4_1) and the llama.cpp way (dense x @ H_n, then quantize).
First-call (compile or cache load) time is reported apart.   python bench/gpu_quant.py [log2_elems]
"""
import json
import sys
import time

import numpy as np
import torch

import kvlab.kernels.cuda as kc
from kvlab.rotation import hadamard, hadamard_scale
from kvlab.types import TYPES


def timed(fn, reps=20):
    """Median milliseconds of fn() over reps, with CUDA events, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def half_bytes(v):
    """(n_blocks, 1) float32 -> (n_blocks, 2) uint8 of the halves (1-D first: inductor cannot bitcast strided)."""
    return v.reshape(-1).half().view(torch.uint8).reshape(-1, 2)


def torch_q8_0(x):
    xb = x.view(-1, 32)                                             # (n_blocks, 32)
    d = xb.abs().amax(1, keepdim=True) / 127
    q = torch.round(xb * torch.where(d > 0, 1 / d, 0)).to(torch.int8)
    return torch.cat([half_bytes(d), q.view(torch.uint8)], 1)


def torch_q4_0(x):
    xb = x.view(-1, 32)
    idx = xb.abs().argmax(1, keepdim=True)
    d = xb.gather(1, idx) / -8
    q = torch.clamp((xb * torch.where(d != 0, 1 / d, 0) + 8.5).to(torch.int8), max=15).to(torch.uint8)
    return torch.cat([half_bytes(d), q[:, :16] | (q[:, 16:] << 4)], 1)


def torch_q4_1(x):
    xb = x.view(-1, 32)
    lo, hi = xb.amin(1, keepdim=True), xb.amax(1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.clamp(((xb - lo) * torch.where(d != 0, 1 / d, 0) + 0.5).to(torch.int8), max=15).to(torch.uint8)
    return torch.cat([half_bytes(d), half_bytes(lo), q[:, :16] | (q[:, 16:] << 4)], 1)


TORCH_PEERS = {"q8_0": torch_q8_0, "q4_0": torch_q4_0, "q4_1": torch_q4_1}


def main(log2_elems):
    n = 1 << log2_elems
    cols = 4096
    x = torch.randn(n // cols, cols, device="cuda")                 # (rows, 4096)
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    copy_gbs = 2 * 4 * n / copy_ms / 1e6
    dev = torch.cuda.get_device_name()
    print(json.dumps({"device": dev, "elements": n, "copy_GBps": round(copy_gbs, 1)}), flush=True)

    def report(op, type_name, impl, ms, nbytes, extra=None):
        gbs = nbytes / ms / 1e6
        rec = {"op": op, "type": type_name, "impl": impl, "ms": round(ms, 4), "GBps": round(gbs, 1),
               "frac_copy": round(gbs / copy_gbs, 3)}
        rec.update(extra or {})
        print(json.dumps(rec), flush=True)

    for name, info in TYPES.items():
        out = torch.empty(n // cols, info.row_bytes(cols), dtype=torch.uint8, device="cuda")
        nbytes = 4 * n + out.numel()
        t0 = time.perf_counter()
        kc.quantize(x, out, name, 2)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for fl, fname in enumerate(("ref", "cpu", "cuda")):
            report("quantize", name, f"kvlab_{fname}", timed(lambda: kc.quantize(x, out, name, fl)), nbytes,
                   {"first_call_s": round(first, 2)} if fl == 0 else None)
        back = torch.empty_like(x)
        report("dequantize", name, "kvlab", timed(lambda: kc.dequantize(out, back, name)), nbytes)
        if name in TORCH_PEERS:
            fn = TORCH_PEERS[name]
            report("quantize", name, "torch_eager", timed(lambda: fn(x)), nbytes)
            comp = torch.compile(fn)
            report("quantize", name, "torch_compile", timed(lambda: comp(x)), nbytes)
        if info.is_quantized:
            for nr in (64, 128, 256):
                s = hadamard_scale(nr)
                report("rotate_quantize", name, "kvlab_fused",
                       timed(lambda: kc.rotate_quantize(x, out, name, 0, nr, s)), nbytes, {"n": nr})
            h = torch.from_numpy(hadamard(128)).cuda()
            report("rotate_quantize", name, "llamacpp_way_matmul_then_kvlab",
                   timed(lambda: kc.quantize((x.view(-1, 128) @ h).view(x.shape), out, name, 0)), nbytes, {"n": 128})
            report("dequantize_unrotate", name, "kvlab_fused",
                   timed(lambda: kc.dequantize_unrotate(out, back, name, 128, hadamard_scale(128))), nbytes, {"n": 128})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 27)
