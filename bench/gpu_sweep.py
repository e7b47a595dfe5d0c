"""The error sweep on a GPU, where kvlab.attention's cuda backend takes its outputs from the CUDA flash-decoding
kernel (kvlab.kernels.cuda.flash_decode) and the cpu backend from the CPU one (issue 18, item 4).
One JSON line per figure.

    python bench/gpu_sweep.py [--lengths 512,2048,8192]

agreement: per K/V pair, the cuda backend's output on the GPU (the kernel: ggml-cuda's numerics in its own
    summation order) against the same backend on the host (kvlab's float32 model of it: matmul order, exact
    expf): max |difference| relative to the output's norm, next to the pair's quantization error (out_rel_l2
    against exact attention); the kernel must sit orders of magnitude below it.
sweep: wall time of run_sweep over all 81 pairs x rotation off/on for the cuda flavor at every length, on the
    GPU (kernels) and on the host (numpy model), cold (no result cache), the same cells.
"""
import argparse
import json
import tempfile
import time

import numpy as np

PAIRS = ("q4_0/q4_0", "q8_0/q8_0", "f16/f16", "bf16/bf16", "q5_1/q4_1", "iq4_nl/q8_0")


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def agreement(torch, n_kv: int) -> None:
    from kvlab.accuracy.attention import cell_metrics, exact_attention, stored_attention, store_bytes
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv
    from kvlab.rotation import rotation_plan
    q, k, v = synthetic_kv(n_kv, SyntheticConfig(n_head=32, n_head_kv=8, head_dim=128, n_q=4, seed=3))
    exact = exact_attention(q, k, v)
    for pair in PAIRS:
        type_k, type_v = pair.split("/")
        plan = rotation_plan(type_k, type_v, 128)
        outs = {}
        for where in ("cuda", "host"):
            put = (lambda a: torch.from_numpy(a).cuda()) if where == "cuda" else (lambda a: a)
            k_st = store_bytes(put(k), type_k, "cuda", plan.k)
            v_st = store_bytes(put(v), type_v, "cuda", plan.v)
            att = stored_attention(put(q), k_st, v_st, type_k, type_v, plan, "cuda")
            outs[where] = (att, np.asarray(att.out_rot.cpu() if hasattr(att.out_rot, "cpu") else att.out_rot,
                                           np.float64))
        gpu, host = outs["cuda"][1], outs["host"][1]
        diff = float(np.linalg.norm(gpu - host) / np.linalg.norm(host))
        quant = cell_metrics(exact, np.asarray(outs["host"][0].logits), outs["host"][0].out_rot, plan.v, 8)["out_rel_l2"]
        emit({"figure": "cuda_backend_agreement", "pair": pair, "n_kv": n_kv, "kernel": outs["cuda"][0].path.kernel,
              "kernel_vs_model_rel_l2": diff, "max_abs": float(np.abs(gpu - host).max()),
              "quantization_out_rel_l2": quant, "ratio": quant / max(diff, 1e-30)})


def sweep_times(lengths) -> None:
    from kvlab.accuracy.sweep import SweepConfig, sweep
    cfg = SweepConfig(lengths=lengths, flavors=("cuda",))
    for device in ("cuda", "cpu"):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            table = sweep(cfg, cache_dir=cache, progress=False, device=device)
            emit({"figure": "sweep_seconds", "device": device, "cells": len(table), "lengths": list(lengths),
                  "seconds": time.perf_counter() - t0, "kernels": sorted(table["kernel"].unique())})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--n-kv", type=int, default=4096)
    a = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        emit({"figure": "gpu_sweep", "skipped": "no CUDA device"})
        return
    from kvlab.kernels.cuda import kernels  # noqa: F401  numba-cuda's array overloads, before any kernel compiles
    agreement(torch, a.n_kv)
    sweep_times(tuple(int(n) for n in a.lengths.split(",")))


if __name__ == "__main__":
    main()
