"""ggml-cuda's own flash-attention vector kernel against kvlab's CUDA flash_decode, on the same ggml bytes.

    python bench/fa_cuda_ggml.py [--build DIR] [--lib-dir DIR] [--head-dims 64,128,256]
                                 [--contexts 256,4096,32768] [--gqa 1,4,8] [--pairs f16/f16,...]

Issue 18, item 3. The ggml side is fattn-vec.cuh's flash_attn_ext_vec and fattn-common.cuh's
flash_attn_combine_results of llama-cpp-python 0.3.36, compiled for sm_90 with ggml-cuda's flags by
tools/cuda_golden/fattn_build.sh (run here unless --lib-dir names built libraries) and launched as
launch_fattn launches them for a one-token decode (tools/cuda_golden/fattn_harness.cu). The bytes are
ggml-cuda's own set_rows output (cpy-utils.cuh) of synthetic K/V (kvlab.accuracy.synthetic: outlier
channels, RoPE, Student-t V; 2 KV heads, 2 * gqa query heads, batch 1), rotated first as llama.cpp
rotates a quantized cache (kvlab.rotation.rotation_plan); the last MASKED_TAIL cells are masked out
(-inf), as llama.cpp masks the padding of its cache. Per case (pair x head size x context x GQA), on
the rotated-basis outputs, three comparisons:
  same_splits     kvlab with ggml's own split count (launch_fattn's parallel_blocks) vs ggml: the
                  number of partial results held equal (which tiles a split reads, and the order
                  inside a block, are each kernel's own);
  kvlab_splits    both at the split count kvlab's flash_decode picks by itself;
  as_shipped      each at its own split count, what a user gets;
and ggml_vs_itself: ggml at kvlab's split count against ggml at its own (the order effect alone).
Each gives `equal` (output values with identical bits, of `values`), max_ulp, max_abs and diff_rel_l2
(||kvlab - ggml|| / ||exact||); the pair's quantization error is ggml's output (un-rotated) against
float64 attention on the unquantized, unrotated K/V (quant_rel_l2, quant_max_abs), and
ratio = quant_rel_l2 / diff_rel_l2 (null: bit-exact), the worst over the three comparisons.
One JSON line per case, then a summary line per pair and one for the run (timings included).
On the H200: build 22 s in parallel with kvlab's compile (22 s), the 108 cases 5 s (bench/README.md).
"""
import argparse
import ctypes
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("f16/f16", "bf16/bf16", "q4_0/q4_0", "q8_0/q8_0")     # ggml-cuda's default GGML_CUDA_FA_QUANTS
N_HEAD_KV = 2
MASKED_TAIL = 7
SEED = 0

c_i32, c_i64, c_f32, c_ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# fattn_vec(D, q, k, v, mask, dst, parts, meta, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits)
VEC_ARGTYPES = [c_i32] + [c_ptr] * 7 + [c_f32] + [c_i32] * 4 + [c_i64] * 6 + [c_i32]
VEC_TIME_ARGTYPES = VEC_ARGTYPES + [c_i32, c_ptr]         # fattn_vec_time(..., splits, repeat, float * ms)
SET_ROWS_ARGTYPES = [c_i32, c_ptr, c_ptr, c_i64]          # fattn_set_rows(which, x, y, n_values)
SPLITS_ARGTYPES = [c_i32, c_i32, c_i32]                    # fattn_parallel_blocks(D, n_rows, n_kv)


def ints(text: str) -> list:
    return [int(x) for x in text.split(",")]


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


# ---- the ggml side ---------------------------------------------------------------------------------
def ggml_strides(raw) -> tuple:
    """(nb1, nb2, nb3): byte strides of token, KV head and sequence of a (B, Hkv, L, row_bytes) uint8 cache
    whose rows are contiguous (the view may hold fewer rows than its buffer: nb2 is the buffer's)."""
    if raw.dtype.itemsize != 1 or raw.dim() != 4 or raw.stride(3) != 1 or raw.stride(2) != raw.shape[3]:
        raise ValueError(f"ggml rows must be contiguous uint8 (B, Hkv, L, row_bytes), got strides {raw.stride()}")
    return int(raw.stride(2)), int(raw.stride(1)), int(raw.stride(0))


def additive_mask(mask):
    """(B, L) bool (True = attend) as ggml's f16 mask: 0 or -inf."""
    import torch
    return torch.where(mask, 0.0, float("-inf")).to(torch.float16).contiguous()   # (B, L)


class GgmlVec:
    """One pair's library from fattn_build.sh: set_rows bytes, launch_fattn's split count, the kernel."""

    def __init__(self, lib_dir: Path, pair: str):
        from kvlab.types import type_info
        self.type_k, self.type_v = (type_info(t) for t in pair.split("/"))
        self.lib = ctypes.CDLL(str(lib_dir / f"libfattn_{self.type_k.name}_{self.type_v.name}.so"))
        for name, argtypes in (("fattn_vec", VEC_ARGTYPES), ("fattn_set_rows", SET_ROWS_ARGTYPES),
                               ("fattn_parallel_blocks", SPLITS_ARGTYPES), ("fattn_vec_time", VEC_TIME_ARGTYPES)):
            getattr(self.lib, name).argtypes, getattr(self.lib, name).restype = argtypes, c_i32
        built = (self.lib.fattn_type_k(), self.lib.fattn_type_v())
        if built != (self.type_k.ggml_type, self.type_v.ggml_type):
            raise RuntimeError(f"{pair}: the library was built for ggml types {built}")

    def set_rows(self, x, which: int):
        """ggml-cuda's set_rows bytes of x (Hkv, L, D) float32 CUDA in K's (0) or V's (1) type: (1, Hkv, L, row_bytes)."""
        import torch
        info = (self.type_k, self.type_v)[which]
        x = x.float().contiguous()
        raw = torch.empty((1, *x.shape[:-1], info.row_bytes(x.shape[-1])), dtype=torch.uint8, device=x.device)
        _check(self.lib.fattn_set_rows(which, x.data_ptr(), raw.data_ptr(), x.numel()), "fattn_set_rows")
        return raw

    def splits(self, d: int, n_rows: int, n_kv: int) -> int:
        return _check(self.lib.fattn_parallel_blocks(d, n_rows, n_kv), "fattn_parallel_blocks")

    def attend(self, q, k_raw, v_raw, mask_f16, scale: float, splits: int):
        """Output (B, H, D) float32 of q (B, H, D) over the caches, at `splits` parallel blocks."""
        import torch
        b, h, d = (int(x) for x in q.shape)
        q = q.float().contiguous()
        out = torch.empty((b, h, d), dtype=torch.float32, device=q.device)
        parts = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        meta = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
        torch.cuda.synchronize()                      # the library launches on the legacy default stream
        _check(self.lib.fattn_vec(d, q.data_ptr(), k_raw.data_ptr(), v_raw.data_ptr(),
                                  0 if mask_f16 is None else mask_f16.data_ptr(), out.data_ptr(),
                                  parts.data_ptr(), meta.data_ptr(), scale, b, h, int(k_raw.shape[1]),
                                  int(k_raw.shape[2]), *ggml_strides(k_raw), *ggml_strides(v_raw), splits),
               "fattn_vec")
        return out

    def time_launches(self, q, k_raw, v_raw, scale: float, splits: int, repeat: int) -> float:
        """Seconds per launch (vector kernel + combine), `repeat` launches back to back between CUDA events
        inside the library; no mask (n_kv a multiple of 128)."""
        import torch
        b, h, d = (int(x) for x in q.shape)
        q = q.float().contiguous()
        out = torch.empty((b, h, d), dtype=torch.float32, device=q.device)
        parts = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        meta = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
        ms = ctypes.c_float()
        torch.cuda.synchronize()
        _check(self.lib.fattn_vec_time(d, q.data_ptr(), k_raw.data_ptr(), v_raw.data_ptr(), 0, out.data_ptr(),
                                       parts.data_ptr(), meta.data_ptr(), scale, b, h, int(k_raw.shape[1]),
                                       int(k_raw.shape[2]), *ggml_strides(k_raw), *ggml_strides(v_raw), splits,
                                       repeat, ctypes.byref(ms)), "fattn_vec_time")
        return ms.value / 1e3


def _check(rc: int, what: str) -> int:
    if rc < 0 or (what != "fattn_parallel_blocks" and rc != 0):
        raise RuntimeError(f"{what} returned {rc} (a cudaError_t, or -1: head size not built)")
    return rc


# ---- comparison ------------------------------------------------------------------------------------
def compare(ours: np.ndarray, theirs: np.ndarray, exact_norm: float) -> dict:
    """Bits, ulps and size of the difference of two float32 outputs of one shape."""
    from kvlab.accuracy.metrics import norm
    from kvlab.ggml.check import _ordered
    diff = ours.astype(np.float64) - theirs
    return {"values": int(ours.size), "equal": int((ours.view(np.uint32) == theirs.view(np.uint32)).sum()),
            "max_ulp": int(np.abs(_ordered(ours) - _ordered(theirs)).max()),
            "max_abs": float(np.abs(diff).max()), "diff_rel_l2": norm(diff) / exact_norm}


def quant_error(theirs: np.ndarray, rot_v, exact_out: np.ndarray) -> dict:
    """ggml's output (rotated basis, (H, D)) un-rotated against exact attention (H, D)."""
    from kvlab.accuracy.attention import unrotate
    from kvlab.accuracy.metrics import norm
    err = unrotate(theirs.astype(np.float64), rot_v) - exact_out
    return {"quant_rel_l2": norm(err) / norm(exact_out), "quant_max_abs": float(np.abs(err).max())}


def worst_ratio(quant_rel_l2: float, comparisons) -> float | None:
    """quant_rel_l2 / diff_rel_l2 of the largest difference; None when every comparison is bit-exact."""
    worst = max(c["diff_rel_l2"] for c in comparisons)
    return quant_rel_l2 / worst if worst else None


# ---- data ------------------------------------------------------------------------------------------
def synthetic(d: int, n_ctx: int):
    """K, V (N_HEAD_KV, n_ctx, D) float32 of kvlab.accuracy.synthetic; a shorter context is a prefix."""
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv
    _, k, v = synthetic_kv(n_ctx, SyntheticConfig(n_head=N_HEAD_KV, n_head_kv=N_HEAD_KV, head_dim=d, n_q=1, seed=SEED))
    return k, v


def query(d: int, gqa: int, n_valid: int) -> np.ndarray:
    """Q (n_head, 1, D) at the last attended position."""
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_queries
    cfg = SyntheticConfig(n_head=N_HEAD_KV * gqa, n_head_kv=N_HEAD_KV, head_dim=d, n_q=1, seed=SEED)
    return synthetic_queries([n_valid - 1], cfg)


def rotated(x: np.ndarray, rot, device):
    """x @ H_rot per rot-chunk (float64, rounded once to float32), on the device."""
    import torch
    from kvlab.accuracy.attention import unrotate      # H is its own inverse: the same product rotates
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float64)
    return unrotate(t, rot).float().contiguous()


# ---- kvlab's kernels: compiled in parallel before the run -------------------------------------------
def warm(pair: str, d: int, gqas) -> float:
    """Compile kvlab's kernels of one pair and head size for every GQA ratio (one KV head, tiny context,
    two splits: partials and combine); numba's on-disk cache keeps them for the run. Seconds."""
    import torch
    import kvlab.kernels.cuda.kernels  # noqa: F401  loads numba-cuda's array overloads (np.row_stack alias, numpy 2.5)
    from kvlab.kernels.cuda import flash_decode as fd
    from kvlab.types import type_info
    t0 = time.perf_counter()
    tk, tv = (type_info(t) for t in pair.split("/"))
    dev = torch.device("cuda")
    k = torch.zeros((1, 1, 256, tk.row_bytes(d)), dtype=torch.uint8, device=dev)
    v = torch.zeros((1, 1, 256, tv.row_bytes(d)), dtype=torch.uint8, device=dev)
    mask = torch.ones((1, 256), dtype=torch.bool, device=dev)
    for gqa in gqas:
        fd.flash_decode(torch.zeros((1, gqa, d), device=dev), k, v, tk.ggml_type, tv.ggml_type, mask, 1.0, splits=2)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def warm_kvlab(pairs, head_dims, gqas) -> float:
    """Every kernel (pair, head size, heads a block) in a process of its own, as many at once as there are
    cores (numba compiles on one core; different processes compile different kernels, but for the shared
    combine kernels); seconds."""
    from kvlab.kernels.cuda import flash_decode as fd
    from kvlab.types import type_info
    t0 = time.perf_counter()
    tasks, seen = [], set()
    for p in pairs:                                    # one process per kernel (GQA ratios of one G: once)
        for d in head_dims:
            for gqa in gqas:
                try:
                    key = (p, d, fd.cols_per_block(gqa, d, type_info(p.split("/")[1]).ggml_type))
                except TypeError:
                    key = (p, d, gqa)
                if key not in seen:
                    seen.add(key)
                    tasks.append((p, d, [gqa]))
    with multiprocessing.get_context("spawn").Pool(min(len(tasks), os.cpu_count() or 1)) as pool:
        pool.starmap(warm, tasks)
    return time.perf_counter() - t0


def kvlab_splits(h: int, gqa: int, d: int, n_kv: int, n_sm: int, type_v: int) -> int:
    """The split count kvlab's flash_decode picks by itself for one sequence (its module's planner:
    `plan` over blocks of cols_per_block query heads; before that rewrite, `n_splits` over rows)."""
    from kvlab.kernels.cuda import flash_decode as fd
    if not hasattr(fd, "plan"):
        return fd.n_splits(h, n_kv, n_sm)
    try:
        g = fd.cols_per_block(gqa, d, type_v)
    except TypeError:                                  # kernels before the V type chose the block's heads
        g = fd.cols_per_block(gqa, d)
    return fd.plan(h // g, n_kv, n_sm)[0]


# ---- the run ---------------------------------------------------------------------------------------
def outputs(ggml: GgmlVec, q, k_raw, v_raw, mask, scale: float, g_splits: int, k_splits: int) -> dict:
    """(H, D) float32 outputs: ggml and kvlab, each at ggml's and at kvlab's split count."""
    from kvlab.kernels.cuda import flash_decode as fd
    mask16 = additive_mask(mask)
    tk, tv = ggml.type_k.ggml_type, ggml.type_v.ggml_type
    host = lambda x: x[0].cpu().numpy()                               # (1, H, D) -> (H, D)
    return {"ggml_own": host(ggml.attend(q, k_raw, v_raw, mask16, scale, g_splits)),
            "ggml_at_k": host(ggml.attend(q, k_raw, v_raw, mask16, scale, k_splits)),
            "ours_at_g": host(fd.flash_decode(q, k_raw, v_raw, tk, tv, mask, scale, splits=g_splits)),
            "ours": host(fd.flash_decode(q, k_raw, v_raw, tk, tv, mask, scale))}


def run_case(ggml: GgmlVec, pair: str, d: int, n_kv: int, gqa: int, data: dict, exact, n_sm: int) -> dict:
    import torch
    from kvlab.rotation import rotation_plan
    plan = rotation_plan(ggml.type_k.name, ggml.type_v.name, d, d, disable=False)
    k_raw = ggml.set_rows(data["k", plan.k][:, :n_kv], 0)             # (1, Hkv, n_kv, row_bytes)
    v_raw = ggml.set_rows(data["v", plan.v][:, :n_kv], 1)
    q = rotated(data["q", gqa, n_kv][:, 0], plan.k, k_raw.device)[None]   # (1, H, D)
    h = q.shape[1]
    mask = torch.arange(n_kv, device=q.device)[None] < n_kv - MASKED_TAIL  # (1, n_kv)
    g_splits, k_splits = ggml.splits(d, h, n_kv), kvlab_splits(h, gqa, d, n_kv, n_sm, ggml.type_v.ggml_type)
    o = outputs(ggml, q, k_raw, v_raw, mask, float(exact.scale), g_splits, k_splits)
    exact_out = exact.out.reshape(h, d)                                # (Hkv, gqa, D) -> (H, D)
    exact_norm = float(np.linalg.norm(exact_out))
    runs = {"same_splits": compare(o["ours_at_g"], o["ggml_own"], exact_norm),
            "kvlab_splits": compare(o["ours"], o["ggml_at_k"], exact_norm),
            "as_shipped": compare(o["ours"], o["ggml_own"], exact_norm)}
    qe = quant_error(o["ggml_own"], plan.v, exact_out)
    max_abs = max(r["max_abs"] for r in runs.values())
    return {"pair": pair, "head_dim": d, "n_kv": n_kv, "attended": n_kv - MASKED_TAIL, "gqa": gqa, "n_head": h,
            "n_head_kv": N_HEAD_KV, "rotation": {"k": plan.k, "v": plan.v}, "splits_ggml": g_splits,
            "splits_kvlab": k_splits, **runs, "ggml_vs_itself": compare(o["ggml_at_k"], o["ggml_own"], exact_norm),
            **qe, "ratio": worst_ratio(qe["quant_rel_l2"], runs.values()),
            "ratio_max_abs": qe["quant_max_abs"] / max_abs if max_abs else None}


def summary(rows: list, pair: str) -> dict:
    rs = [r for r in rows if r["pair"] == pair]
    ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
    out = {"summary": pair, "cases": len(rs)}
    for kind in ("same_splits", "kvlab_splits", "as_shipped", "ggml_vs_itself"):
        out[kind] = {"bit_exact_cases": sum(r[kind]["equal"] == r[kind]["values"] for r in rs),
                     "equal": sum(r[kind]["equal"] for r in rs), "values": sum(r[kind]["values"] for r in rs),
                     "max_ulp": max(r[kind]["max_ulp"] for r in rs), "max_abs": max(r[kind]["max_abs"] for r in rs)}
    out["min_quant_rel_l2"] = min(r["quant_rel_l2"] for r in rs)
    out["worst_ratio"] = min(ratios) if ratios else None
    return out


# ---- speed: ggml-cuda's own vector kernel and kvlab's on the same bytes ---------------------------------
SPEED_SHAPE = dict(n_head=32, n_head_kv=8, head_dim=128)          # a Llama-3-8B layer


def speed_case(ggml: GgmlVec, pair: str, n_kv: int, copy_bw: float, n_sm: int, repeat: int = 10) -> dict:
    """Both kernels on one batch of a Llama-3-8B layer's cache (>= 512 MiB of K+V at f16, past the L2),
    bytes from ggml-cuda's set_rows, no mask: seconds per launch (kernels only, L2 flushed first, each at
    its own split count) and K+V bytes read / time against the run's copy_ bandwidth."""
    import torch
    from flash_decode import launch_seconds           # bench/flash_decode.py's (this script's folder)
    from kvlab.kernels.cuda import flash_decode as fd
    h, hkv, d = SPEED_SHAPE["n_head"], SPEED_SHAPE["n_head_kv"], SPEED_SHAPE["head_dim"]
    batch = max(1, (1 << 29) // (hkv * n_kv * d * 2))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(SEED)
    k_raw = ggml.set_rows(torch.randn(batch * hkv, n_kv, d, device=dev, generator=gen), 0).view(
        batch, hkv, n_kv, -1)
    v_raw = ggml.set_rows(torch.randn(batch * hkv, n_kv, d, device=dev, generator=gen), 1).view(
        batch, hkv, n_kv, -1)
    q = torch.randn(batch, h, d, device=dev, generator=gen)
    scale = d ** -0.5
    flush = torch.empty(1 << 26, dtype=torch.float32, device=dev)    # 256 MiB > the H200's L2
    g_splits = ggml.splits(d, batch * h, n_kv)
    ggml.time_launches(q, k_raw, v_raw, scale, g_splits, 1)           # warm
    flush.zero_()
    t_ggml = ggml.time_launches(q, k_raw, v_raw, scale, g_splits, repeat)
    def kvlab_time(prefetch) -> float:
        """kvlab's seconds per launch with fd.PREFETCH = prefetch (None: its default for the pair)."""
        before, fd.PREFETCH = getattr(fd, "PREFETCH", None), prefetch
        try:
            launch, _ = fd.launcher(q, k_raw, v_raw, ggml.type_k.ggml_type, ggml.type_v.ggml_type, None, scale)
        finally:
            fd.PREFETCH = before
        launch()
        torch.cuda.synchronize()
        flush.zero_()
        return launch_seconds(torch, launch, repeat)

    t_pf = {n: kvlab_time(n) for n in (0, 1, 2)}      # L2 prefetch of the tile n ahead (0: none)
    t_kvlab = kvlab_time(None)
    read = k_raw.numel() + v_raw.numel()
    g = fd.cols_per_block(h // hkv, d, ggml.type_v.ggml_type)
    return {"figure": "speed", "pair": pair, **SPEED_SHAPE, "n_kv": n_kv, "batch": batch, "kv_bytes": read,
            "copy_GBps": copy_bw / 1e9, "ggml_seconds": t_ggml, "kvlab_seconds": t_kvlab,
            "ggml_fraction_of_copy": read / t_ggml / copy_bw, "kvlab_fraction_of_copy": read / t_kvlab / copy_bw,
            "kvlab_time_over_ggml": t_kvlab / t_ggml,
            "kvlab_prefetch": fd.prefetch_mode(ggml.type_k.ggml_type, ggml.type_v.ggml_type)
            if hasattr(fd, "prefetch_mode") else None,
            **{f"kvlab_fraction_of_copy_prefetch_{n}": read / t / copy_bw for n, t in t_pf.items()},
            "splits_ggml": g_splits,
            "splits_kvlab": fd.plan(batch * h // g, n_kv, n_sm)[0]}


def build(lib_dir: Path):
    """fattn_build.sh in the background: (process, start time)."""
    return subprocess.Popen(["bash", str(ROOT / "tools/cuda_golden/fattn_build.sh"), str(lib_dir)]), time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "build/fattn_ggml"), help="where fattn_build.sh writes the libraries")
    ap.add_argument("--lib-dir", help="libraries already built (skips the build)")
    ap.add_argument("--pairs", type=lambda s: s.split(","), default=list(PAIRS))
    ap.add_argument("--head-dims", type=ints, default=[64, 128, 256])
    ap.add_argument("--contexts", type=ints, default=[256, 4096, 32768])
    ap.add_argument("--gqa", type=ints, default=[1, 4, 8])
    ap.add_argument("--speed-contexts", type=lambda t: ints(t) if t else [], default=[4096, 32768],
                    help="contexts of the speed comparison (Llama-3-8B layer); empty: none")
    ap.add_argument("--parts", default="compare,speed", help="compare, speed: either or both")
    args = ap.parse_args()
    t_start = time.perf_counter()
    lib_dir = Path(args.lib_dir or args.build)
    proc, t_build = (None, None) if args.lib_dir else build(lib_dir)
    parts = args.parts.split(",")
    if "speed" in parts and args.speed_contexts:        # the speed shape's kernels too (D 128, GQA 4)
        warm_s = warm_kvlab(args.pairs, sorted(set(args.head_dims) | {128}), sorted(set(args.gqa) | {4}))
    else:
        warm_s = warm_kvlab(args.pairs, args.head_dims, args.gqa)
    if proc is not None and proc.wait() != 0:
        sys.exit(f"fattn_build.sh failed ({proc.returncode})")
    build_s = None if t_build is None else time.perf_counter() - t_build
    print(f"kvlab kernels compiled in {warm_s:.1f} s, ggml-cuda's built in {build_s} s", file=sys.stderr, flush=True)

    import torch
    from kvlab.accuracy.attention import exact_attention
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    libs = {p: GgmlVec(lib_dir, p) for p in args.pairs}
    rows = []
    t_run = time.perf_counter()
    for d in (args.head_dims if "compare" in parts else []):
        k, v = synthetic(d, max(args.contexts))
        data = {}
        for rot in {None, 64, d}:
            data["k", rot], data["v", rot] = rotated(k, rot, dev), rotated(v, rot, dev)
        for n_kv in args.contexts:
            n_valid = n_kv - MASKED_TAIL
            for gqa in args.gqa:
                q = query(d, gqa, n_valid)
                data["q", gqa, n_kv] = q
                exact = exact_attention(q, k[:, :n_valid], v[:, :n_valid])
                for pair in args.pairs:
                    row = run_case(libs[pair], pair, d, n_kv, gqa, data, exact, n_sm)
                    rows.append(row)
                    emit(row)
    for pair in (args.pairs if rows else []):
        emit(summary(rows, pair))
    t_speed = time.perf_counter()
    if "speed" in parts and args.speed_contexts:
        from flash_decode import copy_bandwidth    # bench/flash_decode.py's measures (a script's folder is on sys.path)
        copy_bw = copy_bandwidth(torch, dev)
        for pair in args.pairs:
            for n_kv in args.speed_contexts:
                emit(speed_case(libs[pair], pair, n_kv, copy_bw, n_sm))
    speed_s = time.perf_counter() - t_speed
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    emit({"summary": "all", "device": torch.cuda.get_device_name(dev), "cases": len(rows),
          "bit_exact_same_splits": sum(r["same_splits"]["equal"] == r["same_splits"]["values"] for r in rows),
          "bit_exact_kvlab_splits": sum(r["kvlab_splits"]["equal"] == r["kvlab_splits"]["values"] for r in rows),
          "worst_ratio": min(ratios) if ratios else None, "build_seconds": build_s, "kvlab_compile_seconds": warm_s,
          "run_seconds": time.perf_counter() - t_run, "speed_seconds": speed_s,
          "total_seconds": time.perf_counter() - t_start,
          "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
          "kvlab_flash_decode_sha256": kernel_digest()})


def kernel_digest() -> str:
    """Which version of kvlab's CUDA kernel ran (the file's sha256, first 16 hex digits)."""
    import hashlib
    from kvlab.kernels.cuda import flash_decode as fd
    return hashlib.sha256(Path(fd.__file__).read_bytes()).hexdigest()[:16]


if __name__ == "__main__":
    main()
