"""GPU quantize / dequantize / rotate+quantize throughput (needs a CUDA GPU and torch).

Prints one JSON line per figure: GB/s of the op's own bytes (the floats read + the quantized bytes
written, or the reverse) over GPU time, and that as a fraction of the same run's torch copy_
bandwidth (copy_GBps, bytes read + written, timed the same way); host_us is the Python time per
call (argument checks and launches), which overlaps GPU work when calls are queued back to back. Per type and op: kvlab's kernels, torch eager and torch.compile
of the same block math (bench/torch_quant.py), and for rotate+quantize the llama.cpp way: a dense
x @ H_n matmul, then quantize. Compile (or cache load) time is reported apart, as first_call_s.
First, per type, a decode step's set_rows (op "set_rows_decode": one token of 8 KV heads x 128 into a
4096-row cache, the cuda flavor) against torch's copy_ of the same floats into a float32 row, end to
end: microseconds per call with calls queued back to back (one sync at the end: the host's rate) and
with a sync after every call (latency), and host_us; and both captured in a CUDA graph of GRAPH_CALLS
calls (torch.cuda.CUDAGraph), replayed: GPU microseconds per call (graph_us, torch_copy_graph_us,
ratio_graph), the launch work off the host altogether. Then (op "set_rows_decode_stream") the same
set_rows on a side stream (torch.cuda.stream(s): kvlab follows torch's current stream) against copy_ there.
    python bench/gpu_quant.py [log2_elems] [--types q8_0,q4_0] [--flavors ref,cuda] [--no-compile] [--once]
                              [--decode-only] [--ab-prefetch] [--kernels-only] [--ops dequantize,..]
                              [--prefetch READ,WRITE]
--kernels-only: kvlab's own lines alone (no decode set_rows, llama.cpp-way or torch lines; a short run),
and the fused ref at n = 32 too (the in-row stages alone: against n = 64 .. 256, the column stages' cost).
--ops: only these ops' kvlab lines (quantize, rotate_quantize, dequantize, dequantize_unrotate, rotate).
--prefetch: kc._PREFETCH for the whole process (each line then carries it, its impl ending _read<f> or
_write<f>), set before the first call: kvlab.kernels.cuda replays a call key's first launches (its
_PLANS: kernel and prefetch distance), so a setting changed later in a process need not take effect.
Hence --ab-prefetch runs this script once more per setting, each in its own process.
The copy line also gives fill_GBps, torch's fill_ (writes only), as the roof of write-heavy ops
(dequantize writes 4-7x the bytes it reads).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_quant  # noqa: E402

import kvlab.kernels.cuda as kc  # noqa: E402
from kvlab.rotation import hadamard, hadamard_scale  # noqa: E402
from kvlab.types import FLAVORS, TYPES  # noqa: E402

ROT_N = 128          # llama.cpp's K rotation for a head of 128


SLEEP_CYCLES = 4_000_000       # ~2 ms of GPU clock: longer than any call's Python-side launch work


def timed(fn, reps=30):
    """Median GPU milliseconds of fn() by CUDA events, after two warm-up calls. Before each timed call
    the GPU is kept busy (torch.cuda._sleep) while Python enqueues the events and fn's kernels, so the
    events time the device work alone; the host's share is host_us below."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def host_us(fn, calls=20):
    """Microseconds of Python per call (argument checks, kernel launch), the GPU left to run behind."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 1)


def per_call_us(fn, calls=2000, sync_each=False):
    """Wall microseconds per call of `calls` calls, synchronized after each or once at the end."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / calls * 1e6, 2)


DECODE_COLS = 8 * 128        # one token of 8 KV heads x head_dim 128
DECODE_CACHE_ROWS = 4096
GRAPH_CALLS = 100


def graph_us(fn, calls=GRAPH_CALLS, replays=20):
    """GPU microseconds per call of fn captured `calls` times into one CUDA graph, replayed (median of
    `replays` replays, by CUDA events; warm-up on a side stream first, as torch advises)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return round(timed(g.replay, replays) * 1e3 / calls, 3)


def on_side_stream(fn):
    """fn run inside torch.cuda.stream(s) of a fresh stream s (the stream kvlab must follow)."""
    s = torch.cuda.Stream()

    def run():
        with torch.cuda.stream(s):
            fn()
    return run


def decode_set_rows(types):
    """set_rows of one decode token into a cache, against torch's copy_ of the same floats."""
    torch.manual_seed(0)
    values = torch.randn(1, DECODE_COLS, device="cuda")                       # (1 token, 8 * 128)
    row = torch.tensor([DECODE_CACHE_ROWS // 2], device="cuda")
    plain = torch.empty(DECODE_CACHE_ROWS, DECODE_COLS, device="cuda")
    slot = plain[DECODE_CACHE_ROWS // 2:DECODE_CACHE_ROWS // 2 + 1]           # (1, 8 * 128)
    copy = lambda: slot.copy_(values)                                          # noqa: E731
    peer = {"torch_copy_us_queued": per_call_us(copy), "torch_copy_us_synced": per_call_us(copy, sync_each=True),
            "torch_copy_host_us": host_us(copy, 200), "torch_copy_graph_us": graph_us(copy)}
    side_copy = on_side_stream(copy)
    side_peer = {"torch_copy_us_queued": per_call_us(side_copy), "torch_copy_host_us": host_us(side_copy, 200)}
    for name in types:
        info = TYPES[name]
        cache = torch.zeros(DECODE_CACHE_ROWS, info.row_bytes(DECODE_COLS), dtype=torch.uint8, device="cuda")
        fn = lambda: kc.set_rows(cache, row, values, info, 2)                  # noqa: E731
        first = first_call(fn)
        rec = {"op": "set_rows_decode", "type": name, "impl": "kvlab_cuda", "cols": DECODE_COLS,
               "us_queued": per_call_us(fn), "us_synced": per_call_us(fn, sync_each=True),
               "host_us": host_us(fn, 200), "graph_us": graph_us(fn), **peer, "first_call_s": first}
        rec["ratio_queued"] = round(rec["us_queued"] / peer["torch_copy_us_queued"], 2)
        rec["ratio_synced"] = round(rec["us_synced"] / peer["torch_copy_us_synced"], 2)
        rec["ratio_graph"] = round(rec["graph_us"] / peer["torch_copy_graph_us"], 2)
        print(json.dumps(rec), flush=True)
        side = on_side_stream(fn)
        rec = {"op": "set_rows_decode_stream", "type": name, "impl": "kvlab_cuda", "cols": DECODE_COLS,
               "us_queued": per_call_us(side), "host_us": host_us(side, 200), **side_peer}
        rec["ratio_queued"] = round(rec["us_queued"] / side_peer["torch_copy_us_queued"], 2)
        print(json.dumps(rec), flush=True)


def first_call(fn):
    """Seconds of the first call (compile, or load from numba's / inductor's cache)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 2)


PREFETCH_DIRECTION = {"quantize": "write", "rotate_quantize": "write", "dequantize": "read",
                      "dequantize_unrotate": "read"}


class Report:
    """Times fn and prints its line, for the ops asked for (ops None: all); under a --prefetch setting
    the line carries it, and impl ends _read<f> / _write<f>, f the fraction of the op's direction."""
    def __init__(self, copy_gbs, ops, prefetch):
        self.copy_gbs = copy_gbs
        self.ops = ops
        self.prefetch = prefetch

    def __call__(self, op, type_name, impl, fn, nbytes, **extra):
        if self.ops is not None and op not in self.ops:
            return
        direction = PREFETCH_DIRECTION.get(op)
        if self.prefetch is not None and direction:
            impl += f"_{direction}{self.prefetch[direction]}"
            extra["prefetch"] = self.prefetch
        first = first_call(fn)
        ms = timed(fn)
        gbs = nbytes / ms / 1e6
        rec = {"op": op, "type": type_name, "impl": impl, "ms": round(ms, 4), "GBps": round(gbs, 1),
               "frac_copy": round(gbs / self.copy_gbs, 3), "host_us": host_us(fn), "first_call_s": first, **extra}
        print(json.dumps(rec), flush=True)


def profile_once(x, types):
    """Each kvlab kernel once (ref flavor; rotation n = 128), nothing timed: a run for ncu to read."""
    for name in types:
        info = TYPES[name]
        out = torch.empty(x.shape[0], info.row_bytes(x.shape[1]), dtype=torch.uint8, device="cuda")
        kc.quantize(x, out, info, 0)
        kc.dequantize(out, torch.empty_like(x), info)
        if info.is_quantized:
            kc.rotate_quantize(x, out, info, 0, ROT_N, hadamard_scale(ROT_N))
    torch.cuda.synchronize()


AB_TYPES = ("q8_0", "q4_0", "q5_0", "iq4_nl")
AB_PREFETCH = ((0.0, 1.0), (0.25, 0.25), (0.5, 0.5))     # (read, write) besides the default (0.5, 0)


def prefetch_ab(log2_elems, types):
    """The tile kernels again at other L2 prefetch distances (kc._PREFETCH: a fraction of the CUDA blocks
    the GPU holds, per direction), one process per setting (--prefetch: a process's first launches of a
    key are replayed, their prefetch distance with them): quantize, the fused rotate+quantize, dequantize
    and dequantize+unrotate (ref, n = ROT_N), each line with its setting and its process's own copy_."""
    ab_types = ",".join(t for t in AB_TYPES if t in types)
    for read, write in AB_PREFETCH if ab_types else ():
        subprocess.run([sys.executable, os.path.abspath(__file__), str(log2_elems), "--types", ab_types,
                        "--flavors", "ref", "--kernels-only", "--prefetch", f"{read},{write}",
                        "--ops", "quantize,rotate_quantize,dequantize,dequantize_unrotate"], check=True)


def main(log2_elems, types, compile_torch, once, decode_only, flavors, ab_prefetch=False, kernels_only=False,
         ops=None, prefetch=None):
    if prefetch is not None:                # before any call of this process: see the docstring
        prefetch = kc._PREFETCH = {"read": prefetch[0], "write": prefetch[1]}
    n = 1 << log2_elems
    cols = 4096
    torch.manual_seed(0)
    x = torch.randn(n // cols, cols, device="cuda")                 # (rows, 4096)
    if once:
        return profile_once(x, types)
    if not kernels_only and ops is None:
        decode_set_rows(types)
    if decode_only:
        return
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    copy_gbs = 2 * 4 * n / copy_ms / 1e6
    fill_ms = timed(lambda: dst.fill_(1.0))                # writes only: the roof of a write-heavy op
    print(json.dumps({"device": torch.cuda.get_device_name(), "elements": n, "copy_ms": round(copy_ms, 4),
                      "copy_GBps": round(copy_gbs, 1), "fill_GBps": round(4 * n / fill_ms / 1e6, 1),
                      "fill_frac_copy": round(4 * n / fill_ms / 1e6 / copy_gbs, 3),
                      **({} if prefetch is None else {"prefetch": prefetch})}), flush=True)
    report = Report(copy_gbs, ops, prefetch)
    h = torch.from_numpy(hadamard(ROT_N)).cuda()
    scale = hadamard_scale(ROT_N)
    bufs = {}
    for name in types:                      # kvlab first: its lines come out even if torch's compiles run long
        info = TYPES[name]
        # random bytes, what dequantize reads where --ops times no quantize first
        out = torch.randint(0, 256, (n // cols, info.row_bytes(cols)), dtype=torch.uint8, device="cuda")
        back = torch.empty_like(x)
        nbytes = 4 * n + out.numel()
        bufs[name] = out, nbytes
        for fl, fname in enumerate(FLAVORS):
            if fname not in flavors:
                continue
            report("quantize", name, f"kvlab_{fname}", lambda: kc.quantize(x, out, info, fl), nbytes)
        report("dequantize", name, "kvlab", lambda: kc.dequantize(out, back, info), nbytes)
        if not info.is_quantized:
            continue
        for nr in ((32,) if kernels_only else ()) + (64, ROT_N, 256) if "ref" in flavors else ():
            report("rotate_quantize", name, "kvlab_fused_ref",
                   lambda: kc.rotate_quantize(x, out, info, 0, nr, hadamard_scale(nr)), nbytes, n_rot=nr)
        if "cuda" in flavors:
            report("rotate_quantize", name, "kvlab_fused_cuda",
                   lambda: kc.rotate_quantize(x, out, info, 2, ROT_N, scale), nbytes, n_rot=ROT_N)
        if not kernels_only:
            report("rotate_quantize", name, "llamacpp_way_matmul_then_kvlab",
                   lambda: kc.quantize((x.view(-1, ROT_N) @ h).view(x.shape), out, info, 0), nbytes, n_rot=ROT_N)
        report("dequantize_unrotate", name, "kvlab_fused",
               lambda: kc.dequantize_unrotate(out, back, info, ROT_N, scale), nbytes, n_rot=ROT_N)
    report("rotate", "f32", "kvlab", lambda: kc.rotate(x, back, ROT_N, scale), 8 * n, n_rot=ROT_N)
    if ab_prefetch:
        prefetch_ab(log2_elems, types)
    for name in () if kernels_only or ops is not None else types:
        out, nbytes = bufs[name]
        quant, dequant = torch_quant.QUANTIZE[name], torch_quant.DEQUANTIZE[name]
        peers = [("torch_eager", quant, dequant)]
        if compile_torch:
            peers.append(("torch_compile", torch.compile(quant), torch.compile(dequant)))
        for impl, q, dq in peers:
            report("quantize", name, impl, lambda: q(x), nbytes)
            report("dequantize", name, impl, lambda: dq(out), nbytes)
            if TYPES[name].is_quantized:
                rq = (lambda q: lambda v: q((v.view(-1, ROT_N) @ h).view(v.shape)))(quant)
                rq = torch.compile(rq) if impl == "torch_compile" else rq
                report("rotate_quantize", name, f"llamacpp_way_{impl}", lambda: rq(x), nbytes, n_rot=ROT_N)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("log2_elems", type=int, nargs="?", default=27)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--once", action="store_true", help="run each kvlab kernel once, untimed (for ncu)")
    ap.add_argument("--flavors", default=",".join(FLAVORS), help="the flavors of kvlab's quantize lines")
    ap.add_argument("--decode-only", action="store_true", help="only the decode-shaped set_rows lines")
    ap.add_argument("--ab-prefetch", action="store_true",
                    help=f"also time {', '.join(AB_TYPES)} at other L2 prefetch distances {AB_PREFETCH}")
    ap.add_argument("--kernels-only", action="store_true",
                    help="kvlab's lines alone: no decode set_rows, llama.cpp-way or torch lines")
    ap.add_argument("--ops", help="only these ops' kvlab lines, comma-separated (implies no torch lines)")
    ap.add_argument("--prefetch", help="READ,WRITE: kc._PREFETCH for this process (fractions of a wave)")
    a = ap.parse_args()
    main(a.log2_elems, a.types.split(","), not a.no_compile, a.once, a.decode_only, a.flavors.split(","),
         a.ab_prefetch, a.kernels_only, a.ops and a.ops.split(","),
         a.prefetch and tuple(float(v) for v in a.prefetch.split(",")))
