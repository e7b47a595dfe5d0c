"""ggml's own flash_attn_ext (ggml-cpu: llama-cpp-python 0.3.36's libggml, the test extra; kvlab.ggml.fa.llama_lib)
against kvlab's cpu backend.

The claim: on the same cache bytes, kvlab.accuracy's model of ggml-cpu's flash attention gives the same
float32 bits as the real op, for all 81 K/V pairs, decode and prompt batches (the one-chunk and the
tiled path), rotation on and off (kvlab.ggml.check.fa_cases). The broad matrix (head_dim 64/128/256,
MHA/GQA/MQA, contexts 32..4096) is bench/fa_ggml.py.
"""
import importlib.util

import numpy as np
import pytest

import kvlab
from kvlab.accuracy import cpu_fa
from kvlab.accuracy.attention import attend, group_queries, quantized_logits, store_bytes
from kvlab.ggml import check
from kvlab.ggml.fa import MODELLED_ISA, cpu_features, flash_attn_ext, llama_lib, padded_n_kv

spec = importlib.util.find_spec("ggml")
if spec is None or not spec.submodule_search_locations:
    pytest.skip("ggml-python is not installed (pip install ggml-python==0.0.45)", allow_module_level=True)


@pytest.fixture(scope="module")
def lib():
    return llama_lib()


@pytest.fixture(scope="module")
def rows(lib):
    return check.check_fa(lib, check.fa_cases())


def test_all_81_pairs_match_ggml(lib, rows):
    assert len(rows) == 81 * len(check.fa_cases())
    assert {(r.type_k, r.type_v) for r in rows} == {(k, v) for k in kvlab.TYPES for v in kvlab.TYPES}
    features = cpu_features(lib)
    if all(features[f] for f in MODELLED_ISA):   # the build kvlab reproduces: every bit
        assert [f"{r.type_k}/{r.type_v} {r.case}: {r.differ} values" for r in rows if r.differ] == []
    assert [r for r in rows if not r.ok] == []   # any build: the difference far below quantization error
    assert all(r.quant_rel_l2 > 0 for r in rows)  # every pair has an error to compare with


def test_every_cpu_path_is_taken(rows):
    """f16 K and V (f32 is cast to f16) take the tiled path from 64 tokens on and the split-KV path in a
    decode over >= 512 cells on several threads; all else is one chunk."""
    floats = [(k, v) for k in ("f32", "f16") for v in ("f32", "f16")]
    for kernel, marker in (("cpu-tiled", "/t64/"), ("cpu-split-kv", "/thr4")):
        taken = {(r.type_k, r.type_v, r.case) for r in rows if r.kernel == kernel}
        assert taken == {(k, v, r.case) for r in rows if marker in r.case for k, v in floats}
    assert sum(r.kernel == "cpu" for r in rows) == len(rows) - 8 - 4


def test_report_counts_per_pair(lib, rows):
    rep = check.fa_report(rows, cpu_features(lib))
    assert len(rep["pairs"]) == 81 and rep["compared"] == len(rows)
    assert rep["bit_exact"] == sum(not r.differ for r in rows)
    text = check.fa_text(rep)
    assert len(text) == 3 + 81 and text[3].split()[:2] == ["f32", "f32"]


def _cache(k, v, type_k, type_v):
    return store_bytes(k, type_k, "cpu", None), store_bytes(v, type_v, "cpu", None)


def _kv(n_head_kv=2, n_kv=80, d=64, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32),
            rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32))


def test_ggml_output_is_attention(lib):
    """The harness computes attention: f16/f16 against float64 softmax attention on the f16 cache."""
    k, v = _kv()
    q = np.random.default_rng(4).standard_normal((4, 3, 64)).astype(np.float32)
    (kc, kr), (vc, vr) = _cache(k, v, "f16", "f16")
    out = flash_attn_ext(lib, q, kr, vr, "f16", "f16")
    logits = group_queries(q, 2).astype(np.float64) @ kc.swapaxes(1, 2) / 8.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    exact = ((p / p.sum(-1, keepdims=True)) @ vc).reshape(q.shape)
    assert np.abs(out - exact).max() < 2e-3 and np.abs(out - exact).max() > 0   # fp16 accumulator: not exact


def test_mask_hides_cells_and_heads_broadcast(lib):
    k, v = _kv()
    q = np.random.default_rng(5).standard_normal((4, 2, 64)).astype(np.float32)
    (_, kr), (_, vr) = _cache(k, v, "q8_0", "q4_0")
    visible = np.zeros((2, 80), bool)
    visible[:, :50] = True
    hidden = flash_attn_ext(lib, q, kr, vr, "q8_0", "q4_0", visible=visible)
    short = flash_attn_ext(lib, q, kr[:, :50], vr[:, :50], "q8_0", "q4_0")
    assert np.array_equal(hidden, short)
    # GQA: head h reads KV head h // 2, the same bits as MHA over the repeated cache
    mha = flash_attn_ext(lib, q, np.repeat(kr, 2, axis=0), np.repeat(vr, 2, axis=0), "q8_0", "q4_0")
    assert np.array_equal(mha, flash_attn_ext(lib, q, kr, vr, "q8_0", "q4_0"))


@pytest.mark.parametrize("type_k, type_v", [("q4_1", "q8_0"), ("q8_0", "f16"), ("f16", "f16")])
def test_the_comparison_sees_each_rounding_point(lib, type_k, type_v):
    """Dropping one modelled detail breaks the bits: the check can fail."""
    k, v = _kv()
    q = np.random.default_rng(6).standard_normal((4, 1, 64)).astype(np.float32)
    (kc, kr), (vc, vr) = _cache(k, v, type_k, type_v)
    want = flash_attn_ext(lib, q, kr, vr, type_k, type_v).reshape(2, 2, 64)
    logits = quantized_logits(q, kc, type_k, "cpu", 0.125, k_raw=kr)
    f16_acc = type_v == "f16"
    assert np.array_equal(attend(logits, vc[None], "cpu", f16_acc)[0], want)
    if f16_acc:   # an f32 accumulator instead of ggml's fp16 one
        assert not np.array_equal(attend(logits, vc[None], "cpu", False)[0], want)
    else:         # the dot product without K's vec_dot order (and q8_1's fp16 s)
        rough = quantized_logits(q, kc, type_k, "cpu", 0.125)
        assert not np.array_equal(attend(rough, vc[None], "cpu", False)[0], want)


# 80 only for per-value types: a block type needs whole blocks per head
@pytest.mark.parametrize("head_dim, type_k, type_v", [
    (d, k, v) for d in (32, 80, 96) for k, v in (("f16", "f16"), ("bf16", "q8_0"), ("f32", "bf16"), ("q8_0", "f16"))
    if d % 32 == 0 or not (kvlab.TYPES[k].is_quantized or kvlab.TYPES[v].is_quantized)])
def test_head_dims_past_whole_simd_steps(lib, head_dim, type_k, type_v):
    """f16/bf16 dot products step 64 values; the rest goes through ggml's leftover loop (in double)."""
    k, v = _kv(d=head_dim)
    q = np.random.default_rng(7).standard_normal((4, 2, head_dim)).astype(np.float32)
    (kc, kr), (vc, vr) = _cache(k, v, type_k, type_v)
    want = flash_attn_ext(lib, q, kr, vr, type_k, type_v).reshape(2, 4, head_dim)   # (n_head_kv, gqa * T, D)
    logits = quantized_logits(q, kc, type_k, "cpu", float(np.float32(1) / np.sqrt(np.float32(head_dim))),
                              k_raw=kr)
    got = attend(logits, vc[None], "cpu", cpu_fa.read_type(type_v) == "f16")[0]
    assert np.isfinite(got).all() and np.array_equal(got, want)


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q5_0", "iq4_nl"])
def test_block_integers_give_the_dequantized_values(type_name):
    x = np.random.default_rng(7).standard_normal((3, 128)).astype(np.float32)
    qt = kvlab.quantize(x, type_name, "cpu")
    q, d, _ = cpu_fa.decode_blocks(np.asarray(qt.raw), type_name)
    values = (q.astype(np.float32) * d[..., None]).reshape(x.shape)
    assert np.array_equal(values.view(np.uint32), np.asarray(kvlab.dequantize(qt)).view(np.uint32))


def test_kv_padding_and_bad_input(lib):
    assert [padded_n_kv(n) for n in (1, 256, 257, 4096)] == [256, 256, 512, 4096]
    assert padded_n_kv(300, n_cells=400) == 400
    k, v = _kv()
    q = np.zeros((4, 1, 64), np.float32)
    (_, kr), (_, vr) = _cache(k, v, "q4_0", "q4_0")
    with pytest.raises(ValueError, match="k cache"):
        flash_attn_ext(lib, q, kr[..., :-1], vr, "q4_0", "q4_0")
    with pytest.raises(ValueError, match="visible"):
        flash_attn_ext(lib, q, kr, vr, "q4_0", "q4_0", visible=np.ones((2, 80), bool))
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        flash_attn_ext(lib, q[:3], kr, vr, "q4_0", "q4_0")
