"""The CUDA flash-decoding kernel (kernels/cuda/flash_decode.py) under the Numba CUDA simulator, on tiny
shapes, against a float64 statement of ggml-cuda's vector-kernel math (fattn-common.cuh): Q scaled, q8_1
per 32 values (d = amax/127, roundf(x * rcp(d)), the block's float sum s), each K type's dp4a formula
(q4_0: d_k (d sum(q q8) - 8 s); q5_0 ... - 16 s; q4_1/q5_1: d_k d sum(q q8) + m_k s; q8_0/iq4_nl: d_k d
sum(q q8); f16/bf16/f32: the float dot), softmax, V dequantized. The kernel sums in float32 in its own
order, so the comparison has a tolerance far below the pair's quantization error; the q8_1 rounding of
Q is shared exactly (the simulator's rcp.approx table), so no value can round the other way.
Every type as K and as V with a GQA group of 4 query heads in one block (2 splits: the combine pass);
GQA ratio 1 (2 KV heads) masked, in 1, 3 and 5 splits (the last ones empty); f32/f16/bf16 K with 1, 2, 4 groups
loaded together, or the 8 written out (0), give the same bits.

The simulator must be chosen before numba.cuda is first imported, so the kernel runs in subprocesses,
WORKERS at once (the simulator is pure Python: one core each). Where a CUDA GPU is present the same cases
also run on it (the device machine's check of the compiled kernel).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvlab
from kvlab.kernels.cuda import sim_ops
from kvlab.kernels.iq4_nl import KVALUES

pytestmark = pytest.mark.cudasim

D, L = 64, 150                        # 150 tokens: two 128-token tiles, the second partial
GQA4, GQA1 = (4, 1), (2, 2)             # (H, Hkv)
WORKERS = 2                             # subprocesses at once
# every K and every V type at GQA4, and two mixed pairs (f16 K and q4_0 V both staged in shared memory at
# D 64, and the other way round); q4_0/q4_0 also GQA1 masked, 1, 3 and 5 splits
PAIRS = [(t, t) for t in kvlab.TYPES] + [("f16", "q4_0"), ("q4_0", "f16")]
SCRIPT = textwrap.dedent(r'''
    import sys
    import numpy as np
    from numba import cuda
    from kvlab.kernels.cuda import flash_decode as fd
    from kvlab.types import type_info
    data = dict(np.load(sys.argv[1]))
    out = {}
    ONE_SPLIT = ("f16/f16", "q8_0/q8_0")
    STAGED_V = ("q8_0/q8_0", "q4_0/q4_0", "f16/f16", "bf16/bf16", "q4_0/f16")
    default = fd.VARIANT                                 # (registers, V steps, K groups)
    for key in [k for k in data if k.startswith("k/")]:
        layout, pair = key[2:].split(":")
        tk, tv = pair.split("/")
        masked = layout == "gqa1"

        def run(splits):
            return fd.flash_decode(cuda.to_device(data["q/" + layout]), cuda.to_device(data[key]),
                                   cuda.to_device(data[f"v/{layout}:{pair}"]), type_info(tk).ggml_type,
                                   type_info(tv).ggml_type, data["mask"] if masked else None, np.float32(0.125),
                                   splits).copy_to_host()
        for splits in ((1, 3, 5) if masked else (1, 2) if pair in ONE_SPLIT else (2,)):
            out[f"{layout}:{pair}/{splits}"] = run(splits)
            if splits == 3 or pair == "f16/f16":         # the other L2 prefetch modes (a hint: the same bits)
                for mode in {0, 1, -1, -2} - {fd.prefetch_mode(type_info(tk).ggml_type, type_info(tv).ggml_type)}:
                    fd.PREFETCH = mode
                    out[f"{layout}:{pair}/{splits}/prefetch_{mode}"] = run(splits)
                    fd.PREFETCH = None
        # f32/f16/bf16 K: the kernel's other counts of K groups loaded together
        for kg in (0, 1, 2, 4):                          # 0: the 8 groups written out
            if tk in ("f32", "f16", "bf16") and kg != default[2]:
                fd.VARIANT = (*default[:2], kg, *default[3:])
                out[f"{layout}:{pair}/2/k_groups_{kg}"] = run(2)
                fd.VARIANT = default
        if pair in STAGED_V and layout == "gqa4":         # V rows staged in shared memory, or not
            for stage_v in (False, True):
                fd.VARIANT = (*default[:3], stage_v)
                out[f"{layout}:{pair}/2/stage_v_{stage_v}"] = run(2)
                fd.VARIANT = default
    np.savez(sys.argv[2], **out)
''')


def q8_1(x):
    """quantize_q8_1_to_shared on float32 x (..., D): q (..., D) float64, d and s (..., D/32) float64."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1)
    d = (amax * (np.float32(1) / np.float32(127))).astype(np.float32)
    r = np.vectorize(sim_ops.rcp_approx, otypes=[np.float32])(d)
    q = np.where(d[..., None] != 0, np.vectorize(sim_ops.roundf, otypes=[np.float32])(blocks * r[..., None]), 0)
    s = blocks.astype(np.float64).sum(-1)
    return q.astype(np.float64), d.astype(np.float64), s


def k_fields(kq):
    """(integer values q as the dp4a sees them, d, m) per block of a quantized K, float64."""
    t = kq.type
    raw = np.asarray(kq.raw)
    size = kq.info.type_size
    b = raw.reshape(*raw.shape[:-1], -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if t in ("q4_1", "q5_1") else 0 * d
    if t == "q8_0":
        return b[..., 2:].view(np.int8).astype(np.float64), d, m
    at = {"q4_0": 2, "iq4_nl": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}[t]
    qs = b[..., at:at + 16]
    q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.int64)
    if t in ("q5_0", "q5_1"):
        qh = sum(b[..., (2 if t == "q5_0" else 4) + i].astype(np.int64) << (8 * i) for i in range(4))
        q |= ((qh[..., None] >> np.arange(32)) & 1) << 4
    if t == "iq4_nl":
        q = KVALUES.astype(np.int64)[q]
    return q.astype(np.float64), d, m


def reference(q, kq, vq, visible=None):
    """ggml-cuda's math in float64: (B, H, D); query head h reads KV head h // (H / Hkv)."""
    group = q.shape[1] // kq.shape[1]
    x = (q * np.float32(0.125)).astype(np.float32)                             # (B, H, D) pre-scaled Q
    if not kq.info.is_quantized:
        k = np.repeat(kvlab.dequantize(kq).astype(np.float64), group, axis=1)  # (B, H, L, D)
        logits = np.einsum("bhd,bhld->bhl", x.astype(np.float64), k)
    else:
        qq, qd, qsum = q8_1(x)                                                 # (B, H, D/32, 32), (B, H, D/32)
        kint, kd, km = (np.repeat(f, group, axis=1) for f in k_fields(kq))     # (B, H, L, D/32, 32), (.., D/32)
        dots = np.einsum("bhnj,bhlnj->bhln", qq.reshape(*qq.shape[:2], -1, 32), kint)   # (B, H, L, D/32)
        offset = {"q4_0": 8, "q5_0": 16}.get(kq.type, 0)
        terms = kd * (qd[:, :, None] * dots - offset * qsum[:, :, None])
        terms += km * qsum[:, :, None]
        logits = terms.sum(-1)                                                 # (B, H, L)
    if visible is not None:
        logits = np.where(visible[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    v = np.repeat(kvlab.dequantize(vq).astype(np.float64), group, axis=1)     # (B, H, L, D)
    return np.einsum("bhl,bhld->bhd", p, v)


def _inputs(rng, heads, kv_heads):
    q = rng.standard_normal((1, heads, D)).astype(np.float32)
    k = (rng.standard_normal((1, kv_heads, L, D)) * 3).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, L, D)).astype(np.float32)
    return q, k, v


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="module", params=["sim", "gpu"])
def run(request, tmp_path_factory):
    """The kernel's outputs under the simulator, and on a GPU where there is one (the same cases; the
    GPU's expf is ex2.approx, inside the tolerance)."""
    gpu = request.param == "gpu"
    if gpu and not _has_gpu():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(0)
    layouts = {"gqa4": _inputs(rng, *GQA4), "gqa1": _inputs(rng, *GQA1)}
    visible = rng.random((1, L)) > 0.3
    cases = [("gqa4", a, b) for a, b in PAIRS] + [("gqa1", "q4_0", "q4_0")]
    qt = {f"{lay}:{a}/{b}": (layouts[lay][0], kvlab.quantize(layouts[lay][1], a), kvlab.quantize(layouts[lay][2], b))
          for lay, a, b in cases}
    tmp = tmp_path_factory.mktemp("fd_sim")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"} if gpu else \
        dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    # GPU: numba compiles a kernel on one core for tens of seconds, so a process a case (5 at once took
    # over 140 s on the H200 machine's 16 cores)
    workers = min(len(qt), os.cpu_count() or 1) if gpu else WORKERS
    procs = []
    for i in range(workers):      # the simulator is pure Python (one core each): the cases in WORKERS processes
        arrays = {"mask": visible, **{"q/" + lay: x[0] for lay, x in layouts.items()}}
        for key, (_, kq, vq) in list(qt.items())[i::workers]:
            arrays["k/" + key], arrays["v/" + key] = kq.raw, vq.raw
        np.savez(tmp / f"in{i}.npz", **arrays)
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp / f"in{i}.npz"), str(tmp / f"out{i}.npz")],
                                      env=env))
    assert [p.wait() for p in procs] == [0] * workers
    return visible, qt, {k: v for i in range(workers) for k, v in np.load(tmp / f"out{i}.npz").items()}


@pytest.mark.parametrize("pair", [f"{a}/{b}" for a, b in PAIRS])
def test_matches_ggml_cuda_math(run, pair):
    """A GQA group of 4 query heads over one KV head, 2 splits."""
    _, qt, out = run
    q, kq, vq = qt["gqa4:" + pair]
    want = reference(q, kq, vq)
    got = out[f"gqa4:{pair}/2"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("pair", ["f16/f16", "q8_0/q8_0"])
def test_one_split_runs_the_tiles_in_turn(run, pair):
    """One split: a block takes both tiles, its K rows of the second staged (cp.async) while it computes the
    first (an f16 row's 16-byte chunks swizzled in shared memory, a q8_0 row's words as they are; the
    second tile partial)."""
    _, qt, out = run
    want = reference(*qt["gqa4:" + pair])
    assert np.abs(out[f"gqa4:{pair}/1"] - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("case", [f"gqa4:{a}/{b}/2" for a, b in PAIRS if a in ("f32", "f16", "bf16")])
def test_k_groups_give_the_same_bits(run, case):
    """K groups loaded together (f32/f16/bf16 K) move loads, no arithmetic: every count's output equals
    the default's bit for bit."""
    _, _, out = run
    others = [k for k in out if k.startswith(case + "/")]
    assert others
    for key in others:
        assert out[key].tobytes() == out[case].tobytes(), key


@pytest.mark.parametrize("case", ["gqa4:q4_0/q4_0/2", "gqa4:q8_0/q8_0/2", "gqa4:f16/f16/2", "gqa4:bf16/bf16/2",
                                  "gqa4:q4_0/f16/2"])
def test_staged_v_rows_give_the_same_bits(run, case):
    """V rows copied into shared memory by cp.async (VARIANT's fourth field) or read from global memory: the
    same loads from another place, the same bits (q4_0's and f16's rows in static and in dynamic shared memory,
    the latter shared with the end's column sums)."""
    _, _, out = run
    for stage_v in (False, True):
        assert out[f"{case}/stage_v_{stage_v}"].tobytes() == out[case].tobytes(), stage_v


@pytest.mark.parametrize("case", ["gqa1:q4_0/q4_0/3", "gqa4:f16/f16/2"])
def test_prefetch_modes_give_the_same_bits(run, case):
    """Every L2 prefetch mode (fd.PREFETCH: a tile ahead, this tile's V with or without the next K, none) only
    asks for lines, inside the arrays (the simulator's prefetch_l2 checks each address; partial and empty
    splits in the masked case): the output is the default mode's bit for bit."""
    _, _, out = run
    modes = [k for k in out if k.startswith(case + "/prefetch_")]
    assert len(modes) == 3
    for key in modes:
        assert out[key].tobytes() == out[case].tobytes(), key


def test_splits_and_mask(run):
    """GQA ratio 1 (2 KV heads): one split, three (the last empty) and five (three empty) give the masked
    result up to float32 order; masked cells are left out."""
    visible, qt, out = run
    q, kq, vq = qt["gqa1:q4_0/q4_0"]
    want = reference(q, kq, vq, visible)
    for splits in (1, 3, 5):
        assert np.abs(out[f"gqa1:q4_0/q4_0/{splits}"] - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(out["gqa1:q4_0/q4_0/3"] - reference(q, kq, vq)).max() > 1e-3    # the mask mattered


def _prmt(a, b, c):
    """prmt.b32's default mode on uint32 arrays: byte n of the result is byte (c's nibble n & 7) of {b, a}
    (no sign replication: these selectors have no bit 3)."""
    x = (a.astype(np.uint64) & 0xFFFFFFFF) | (b.astype(np.uint64) << np.uint64(32))
    r = np.zeros_like(x)
    for n in range(4):
        sel = (c >> (4 * n)) & 7
        r |= ((x >> np.uint64(8 * sel)) & np.uint64(0xFF)) << np.uint64(8 * n)
    return r.astype(np.uint32)


@pytest.mark.parametrize("off", [8, 16, 128])
def test_scaled_byte_is_exact(off):
    """The GPU's V dequantize d * (b - off) as scaled_byte computes it (prmt of 2^15's bits and the word
    by selector 0x3240 + 16 e, then fma(d, x, d * -(2^15 + off)) rounded once) equals float32 d times
    float32 (b - off) for every finite float16 d, every byte b (0..31 for the nibble types' offsets) at
    every byte position e of the word, up to the sign of a zero."""
    d = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    d = d[np.isfinite(d)].astype(np.float32)[:, None]                    # (n, 1)
    b = np.arange(256 if off == 128 else 32, dtype=np.uint32)
    for e in range(4):
        w = b << np.uint32(8 * e) | np.uint32(0xA5A5A5A5 & ~(0xFF << (8 * e)))   # byte e is b, others junk
        x = _prmt(np.full_like(w, 0x47000000), w, 0x3240 + 16 * e).view(np.float32)
        assert (x == np.float32(32768) + b.astype(np.float32)).all()
        c = d * np.float32(-(32768 + off))                              # float32 multiply, rounded
        got = (d.astype(np.float64) * x.astype(np.float64) + c.astype(np.float64)).astype(np.float32)   # exact, then rounded
        want = d * (b.astype(np.float32) - np.float32(off))[None, :]
        assert (got == want).all()
