"""CPU quantize / dequantize throughput of kvlab and its peers, side by side, one JSON line per figure.

    python bench/cpu_quant.py [--n 4194304] [--threads 2] [--repeat 5] [--types q4_0,q8_0]

Peers, on the same input and the same thread count:
  kvlab         Numba kernels (numba threads = --threads), flavors ref and cpu
  gguf-py       gguf.quants (numpy), rows split over --threads Python threads
  ggml-ref      the C library's from_float_ref (quantize_row_<type>_ref)
  ggml-cpu      the C library's CPU-backend from_float (SIMD) and to_float
  memcpy        numpy copy of the float32 input over the same threads: the machine's yardstick
The C calls run over row chunks in --threads Python threads (ctypes releases the GIL).
GB/s counts bytes read + bytes written (1e9 bytes); the median of --repeat runs after one warm-up,
the impls of a type and op taken in turn (round r runs each once, a memcpy among them for frac_memcpy),
so that a slow spell of a shared machine falls on all of them alike.
An impl that is missing (no kernel yet, no ggml library, no gguf) prints a line with "skipped".
"""
import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvlab.types import TYPES

ROW_LEN = 4096          # values per row: a typical n_embd_k_gqa; a multiple of every block size


@dataclass
class Config:
    n: int
    threads: int
    repeat: int
    types: list
    ggml_lib: str


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 22, help="values per run (a multiple of 4096)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--ggml-lib", default=None, help="libggml directory (default: KVLAB_GGML_LIB)")
    a = parser.parse_args(argv)
    if a.n % ROW_LEN:
        parser.error(f"--n must be a multiple of {ROW_LEN}")
    return Config(a.n, a.threads, a.repeat, a.types.split(","), a.ggml_lib)


def median_seconds(run, repeat):
    return interleaved_seconds({"run": run}, repeat)["run"]


def interleaved_seconds(runs: dict, repeat: int) -> dict:
    """name -> median seconds of runs[name](): each warmed up once (JIT compile, page faults, caches),
    then `repeat` rounds that run every one once, in turn; a run that raises gives its exception."""
    out, live = {}, {}
    for name, run in runs.items():
        try:
            run()
            live[name] = []
        except Exception as e:                          # noqa: BLE001 - e.g. a kernel not written yet
            out[name] = e
    for _ in range(repeat):
        for name, times in live.items():
            start = time.perf_counter()
            runs[name]()
            times.append(time.perf_counter() - start)
    out.update({name: statistics.median(times) for name, times in live.items()})
    return out


class Chunked:
    """Run fn(x_chunk, out_chunk) over row chunks of x in a fixed pool of threads."""

    def __init__(self, threads):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)

    def __call__(self, fn, x, out):
        bounds = np.linspace(0, len(x), self.threads + 1).astype(int)
        jobs = [self.pool.submit(fn, x[a:b], out[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        for job in jobs:
            job.result()


def quantize_impls(cfg, chunked):
    """name -> function(x, out) writing ggml bytes of x into out; a string where the impl is missing."""
    impls = {}
    try:
        import numba
        import kvlab
        numba.set_num_threads(cfg.threads)
        for flavor in ("ref", "cpu"):
            # into out as every peer (the public out=): no allocation and first touch of fresh pages timed
            impls[f"kvlab-{flavor}"] = lambda t, fl=flavor: lambda x, out: kvlab.quantize(x, t, flavor=fl, out=out)
    except Exception as e:                              # noqa: BLE001 - reported, not hidden
        impls["kvlab"] = f"{type(e).__name__}: {e}"
    try:
        import gguf
        from gguf.quants import quantize as gguf_quantize

        def gguf_fn(t):
            qtype = gguf.GGMLQuantizationType[t.upper()]
            return lambda x, out: chunked(
                lambda xc, oc: np.copyto(oc, np.asarray(gguf_quantize(xc, qtype)).view(np.uint8).reshape(oc.shape)),
                x, out)
        impls["gguf-py"] = gguf_fn
    except Exception as e:                              # noqa: BLE001
        impls["gguf-py"] = f"{type(e).__name__}: {e}"
    try:
        from kvlab.ggml import lib as ggml
        lib = ggml.load(cfg.ggml_lib)
        # A thread's chunk of rows as one row, so one C call: lib converts f16/bf16 row by row (ggml-cpu's f16
        # row tail differs on NaN), which would time a Python loop over rows; rows of ROW_LEN (a multiple of
        # 16) have no tail, so the bytes are the same.
        def one_call(quantize, t):
            return lambda x, out: chunked(lambda xc, oc: quantize(xc.reshape(1, -1), t, out=oc.reshape(1, -1)), x, out)
        impls["ggml-ref"] = lambda t: one_call(lib.quantize_ref, t)
        impls["ggml-cpu"] = lambda t: one_call(lib.quantize_cpu, t)
    except Exception as e:                              # noqa: BLE001
        impls["ggml"] = f"{type(e).__name__}: {e}"
    return impls


def dequantize_impls(cfg, chunked):
    """name -> function(raw, out) writing float32 values of raw into out; a string where missing."""
    impls = {}
    try:
        import kvlab
        impls["kvlab"] = lambda t: lambda raw, out: kvlab.dequantize(kvlab.QTensor.from_raw(raw, t, out.shape), out=out)
    except Exception as e:                              # noqa: BLE001
        impls["kvlab"] = f"{type(e).__name__}: {e}"
    try:
        import gguf
        from gguf.quants import dequantize as gguf_dequantize

        def gguf_fn(t):
            qtype = gguf.GGMLQuantizationType[t.upper()]
            return lambda raw, out: chunked(lambda rc, oc: np.copyto(oc, gguf_dequantize(rc, qtype)), raw, out)
        impls["gguf-py"] = gguf_fn
    except Exception as e:                              # noqa: BLE001
        impls["gguf-py"] = f"{type(e).__name__}: {e}"
    try:
        from kvlab.ggml import lib as ggml
        lib = ggml.load(cfg.ggml_lib)
        impls["ggml-cpu"] = lambda t: lambda raw, out: chunked(
            lambda rc, oc: lib.dequantize(rc, t, oc.shape[-1], out=oc), raw, out)
    except Exception as e:                              # noqa: BLE001
        impls["ggml"] = f"{type(e).__name__}: {e}"
    return impls


def timed_line(cfg, impl, op, type_name, n_bytes, seconds) -> dict:
    """A figure's JSON line: its seconds and GB/s, or "skipped" with why (a string or the exception)."""
    line = {"impl": impl, "op": op, "type": type_name, "n": cfg.n, "threads": cfg.threads, "bytes": n_bytes}
    if isinstance(seconds, str):
        line["skipped"] = seconds
    elif isinstance(seconds, Exception):
        line["skipped"] = f"{type(seconds).__name__}: {seconds}"
    else:
        line.update(seconds=round(seconds, 6), gbps=round(n_bytes / seconds / 1e9, 3))
    return line


def emit_group(cfg, op, type_name, n_bytes, makers, copy, copy_bytes):
    """One line per impl of (op, type): the runnable ones timed in turn beside a memcpy."""
    runs = {impl: run for impl, run in makers.items() if not isinstance(run, str)}
    seconds = interleaved_seconds({**runs, "memcpy": copy}, cfg.repeat)
    copy_gbps = copy_bytes / seconds["memcpy"] / 1e9
    for impl, run in makers.items():
        line = timed_line(cfg, impl, op, type_name, n_bytes, run if isinstance(run, str) else seconds[impl])
        if "gbps" in line:
            line["frac_memcpy"] = round(n_bytes / seconds[impl] / 1e9 / copy_gbps, 3)
        print(json.dumps(line), flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    x = np.random.default_rng(0).standard_normal((cfg.n // ROW_LEN, ROW_LEN)).astype(np.float32)  # (rows, 4096)
    chunked = Chunked(cfg.threads)
    copy_out = np.empty_like(x)
    copy = lambda: chunked(lambda src, dst: np.copyto(dst, src), x, copy_out)  # noqa: E731
    print(json.dumps(timed_line(cfg, "memcpy", "copy", "f32", 2 * x.nbytes, median_seconds(copy, cfg.repeat))),
          flush=True)
    quantizers, dequantizers = quantize_impls(cfg, chunked), dequantize_impls(cfg, chunked)
    for type_name in cfg.types:
        info = TYPES[type_name]
        raw = np.zeros((len(x), info.row_bytes(ROW_LEN)), np.uint8)   # (rows, row_bytes): quantizers' output
        n_bytes = x.nbytes + raw.nbytes
        values = np.empty_like(x)
        emit_group(cfg, "quantize", type_name, n_bytes,
                   {impl: make if isinstance(make, str) else (lambda fn=make(type_name): fn(x, raw))
                    for impl, make in quantizers.items()}, copy, 2 * x.nbytes)
        emit_group(cfg, "dequantize", type_name, n_bytes,
                   {impl: make if isinstance(make, str) else (lambda fn=make(type_name): fn(raw, values))
                    for impl, make in dequantizers.items()}, copy, 2 * x.nbytes)


if __name__ == "__main__":
    main()
