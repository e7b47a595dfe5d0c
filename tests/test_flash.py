"""kvlab.flash.flash_decode on the CPU (kernels/flash_decode.py): attention of one query per head over
a cache held as ggml bytes, against ggml's own flash_attn_ext (ggml-cpu through ctypes, the test extra)
and kvlab's model of it (kvlab.accuracy.cpu_fa), float32 bits compared, never a tolerance."""
import importlib.util

import numpy as np
import pytest

import kvlab
from kvlab.accuracy import cpu_fa
from kvlab.flash import flash_decode
from kvlab.ggml.fa import MODELLED_ISA, cpu_features, flash_attn_ext, llama_lib

TYPES = tuple(kvlab.TYPES)
H, HKV, L, D = 4, 2, 70, 64


def _qkv(seed, b=1, n_kv=L, d=D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, H, d)).astype(np.float32)
    k = (rng.standard_normal((b, HKV, n_kv, d)) * 2).astype(np.float32)
    v = rng.standard_normal((b, HKV, n_kv, d)).astype(np.float32)
    return q, k, v


def _bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def lib():
    if importlib.util.find_spec("llama_cpp") is None and importlib.util.find_spec("ggml") is None:
        pytest.fail("llama-cpp-python or ggml-python (the test extra) is needed")
    return llama_lib()


@pytest.mark.parametrize("type_k", TYPES)
def test_equals_ggml_flash_attn_ext(lib, type_k):
    """Decode over each K type with every V type: the same bits as ggml-cpu's flash_attn_ext, masked cells
    included (the cells a query does not see are skipped, as ggml skips -inf mask entries)."""
    if not all(cpu_features(lib)[f] for f in MODELLED_ISA):
        pytest.fail(f"this libggml lacks part of {MODELLED_ISA}, the build the kernel reproduces")
    q, k, v = _qkv(1)
    visible = np.random.default_rng(2).random(L) > 0.2
    bad = []
    for type_v in TYPES:
        kq, vq = kvlab.quantize(k, type_k, "cpu"), kvlab.quantize(v, type_v, "cpu")
        got = flash_decode(q, kq.raw, vq.raw, type_k, type_v, mask=visible[None])[0]        # (H, D)
        want = flash_attn_ext(lib, q[0][:, None], kq.raw[0], vq.raw[0], type_k, type_v,
                              visible=visible[None])[:, 0]                                  # (H, D)
        if not np.array_equal(_bits(got), _bits(want)):
            bad.append(f"{type_k}/{type_v}: {int((_bits(got) != _bits(want)).sum())} values differ")
    assert bad == []


def test_equals_cpu_backend_model_all_pairs():
    """The fused kernel (one pass over the bytes) and kvlab.accuracy.cpu_fa (logits, then softmax) agree
    bit for bit on all 81 pairs, at head_dim 128 over two KV heads of a GQA group of 2."""
    q, k, v = _qkv(3, d=128)
    bad = []
    for type_k in TYPES:
        for type_v in TYPES:
            kq, vq = kvlab.quantize(k, type_k), kvlab.quantize(v, type_v)
            got = flash_decode(q, kq.raw, vq.raw, type_k, type_v)[0]
            want = cpu_fa.flash_attn(q[0].reshape(HKV, H // HKV, 128), kq.raw[0], kvlab.dequantize(kq)[0],
                                     kvlab.dequantize(vq)[0], type_k, type_v,
                                     np.float32(1) / np.sqrt(np.float32(128)), 1).reshape(H, 128)
            if not np.array_equal(_bits(got), _bits(want)):
                bad.append(f"{type_k}/{type_v}")
    assert bad == []


def test_batch_rows_are_independent_and_mask_skips_cells():
    """Row (b, h) of a batch equals the same row alone; a masked cell counts as absent (the result over
    the cache without it, bit for bit); query head h reads KV head h // (H / Hkv)."""
    q, k, v = _qkv(4, b=2)
    kq, vq = kvlab.quantize(k, "q4_0"), kvlab.quantize(v, "q8_0")
    keep = np.ones((2, L), bool)
    keep[1, :10] = False                                        # sequence 1 is left-padded by 10
    both = flash_decode(q, kq.raw, vq.raw, "q4_0", "q8_0", mask=keep)
    first = flash_decode(q[:1], kq.raw[:1], vq.raw[:1], "q4_0", "q8_0")
    second = flash_decode(q[1:], kq.raw[1:, :, 10:], vq.raw[1:, :, 10:], "q4_0", "q8_0")
    assert np.array_equal(_bits(both[:1]), _bits(first))
    assert np.array_equal(_bits(both[1:]), _bits(second))
    one_head = flash_decode(q[:1, 2:3], kq.raw[:1, 1:2], vq.raw[:1, 1:2], "q4_0", "q8_0")   # head 2 -> KV head 1
    assert np.array_equal(_bits(first[:, 2:3]), _bits(one_head))


@pytest.mark.parametrize("pair", ["q4_0/q8_0", "iq4_nl/f16", "f16/q4_1", "bf16/bf16"])
def test_work_items_give_every_head_the_same_bits(pair):
    """The kernel's work items (a GQA group's query heads together, split over more items when there are
    fewer groups than threads; each K/V row decoded once per item) change no value: a group of 5 over one
    KV head, as one item and as 2, 3 and 5 items (n_threads 1, 2, 3, 4, 8), equals each head run alone."""
    from kvlab.flash import cpu_query
    from kvlab.kernels.flash_decode import flash_decode as kernel
    type_k, type_v = pair.split("/")
    rng = np.random.default_rng(7)
    q = rng.standard_normal((5, D)).astype(np.float32)                                   # (H, D), Hkv 1
    kq = kvlab.quantize((rng.standard_normal((1, 1, L, D)) * 2).astype(np.float32), type_k)
    vq = kvlab.quantize(rng.standard_normal((1, 1, L, D)).astype(np.float32), type_v)
    ik, iv = kvlab.types.type_info(type_k), kvlab.types.type_info(type_v)
    no_mask, scale = np.zeros((1, 0), np.float32), np.float32(0.125)

    def run(rows, n_threads):
        out = np.full((1, len(rows), D), np.nan, np.float32)        # an unwritten value shows
        kernel(*cpu_query(q[rows], type_k), kq.raw, vq.raw, ik.ggml_type, iv.ggml_type, D, no_mask, scale, out,
               n_threads)
        return out[0]
    alone = np.concatenate([run([h], 1) for h in range(5)])
    for n_threads in (1, 2, 3, 4, 8):
        assert np.array_equal(_bits(run(list(range(5)), n_threads)), _bits(alone)), n_threads


def test_rotation_is_llama_cpp_s():
    """rotation=plan: Q rotated with H_k before the kernel, the output rotated back with H_v after."""
    q, k, v = _qkv(5)
    plan = kvlab.rotation_plan("q4_0", "q4_0", D)
    kq, vq = kvlab.quantize(kvlab.rotate(k, plan.k), "q4_0"), kvlab.quantize(kvlab.rotate(v, plan.v), "q4_0")
    got = flash_decode(q, kq.raw, vq.raw, "q4_0", "q4_0", rotation=plan)
    want = kvlab.rotate(flash_decode(kvlab.rotate(q, plan.k), kq.raw, vq.raw, "q4_0", "q4_0"), plan.v)
    assert plan.k == plan.v == D and np.array_equal(_bits(got), _bits(want))


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    q, k, v = _qkv(6)
    kq, vq = kvlab.quantize(k, "q8_0"), kvlab.quantize(v, "f16")
    got = flash_decode(torch.from_numpy(q), torch.from_numpy(kq.raw), torch.from_numpy(vq.raw), "q8_0", "f16")
    assert isinstance(got, torch.Tensor)
    assert np.array_equal(_bits(got.numpy()), _bits(flash_decode(q, kq.raw, vq.raw, "q8_0", "f16")))


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v, m: (q, k.astype(np.int8), v, m), "uint8"),
    (lambda q, k, v, m: (q, k[..., :-1], v, m), "whole q4_0 blocks"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), "multiple of n_head_kv"),
    (lambda q, k, v, m: (q[..., :32], k, v, m), "head_dim"),
    (lambda q, k, v, m: (q, k, v[:, :, :5], m), "share"),
    (lambda q, k, v, m: (q, k, v, m[:, :5]), "mask"),
])
def test_bad_input_is_refused_before_the_kernel(change, message):
    q, k, v = _qkv(7)
    kq, vq = kvlab.quantize(k, "q4_0"), kvlab.quantize(v, "q4_0")
    args = change(q, kq.raw, vq.raw, np.ones((1, L), bool))
    with pytest.raises(ValueError, match=message):
        flash_decode(*args[:3], "q4_0", "q4_0", mask=args[3])
