"""kvlab.accuracy.attention: the exact reference, the llama.cpp path, the backends, and the field's orderings.

The orderings (K more sensitive than V, rotation helps 4-bit K, q8_0 near-lossless, growth with
context) are checked on seeded synthetic data with outlier channels; thresholds are ratios that
follow from the quantizers (an 8-bit step is 16x a 4-bit one: squared errors differ ~256x).
"""
import numpy as np
import pytest

from kvlab.accuracy.attention import attention_error, exact_attention, pair_path, q8_blocks
from kvlab.accuracy.cpu_fa import online_softmax
from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv

CFG = SyntheticConfig(n_head=4, n_head_kv=2, head_dim=128, n_q=4, seed=1)


@pytest.fixture(scope="module")
def qkv():
    return synthetic_kv(1024, CFG)


def test_exact_attention_matches_a_loop_over_heads_with_gqa():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 3, 64)).astype(np.float32)
    k = rng.standard_normal((2, 10, 64)).astype(np.float32)
    v = rng.standard_normal((2, 10, 64)).astype(np.float32)
    got = exact_attention(q, k, v).out.reshape(2, 3, 3, 64).reshape(6, 3, 64)  # (n_head, n_q, D)
    for h in range(6):
        kv = h // 3  # GQA: 3 query heads per KV head
        s = q[h].astype(np.float64) @ k[kv].T.astype(np.float64) / 8.0
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got[h], p @ v[kv], rtol=1e-12)


@pytest.mark.parametrize("rotation", [False, True])
def test_f32_cache_on_ref_backend_is_lossless(qkv, rotation):
    m = attention_error(*qkv, "f32", "f32", rotation=rotation)
    assert m["kl"] < 1e-12 and m["out_rel_l2"] < 1e-12 and m["k_rel_l2"] == 0 and m["topk_overlap"] == 1


def test_torch_input_gives_the_same_metrics(qkv):
    torch = pytest.importorskip("torch")
    a = attention_error(*qkv, "q4_0", "q8_0")
    b = attention_error(*(torch.from_numpy(x) for x in qkv), "q4_0", "q8_0")
    assert a == b


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q8_0"])
def test_k_is_more_sensitive_than_v_at_the_same_bits(qkv, quant):
    k_side = attention_error(*qkv, quant, "f16")
    v_side = attention_error(*qkv, "f16", quant)
    assert k_side["out_rel_l2"] > v_side["out_rel_l2"]
    assert k_side["kl"] > 100 * v_side["kl"]  # V never enters the logits: only f16 K rounding remains


def test_rotation_helps_4bit_k_and_not_8bit_k(qkv):
    kl = {(t, r): attention_error(*qkv, t, "f16", rotation=r)["kl"] for t in ("q4_0", "q8_0") for r in (False, True)}
    assert kl["q4_0", True] < kl["q4_0", False] / 1.5
    gain4 = kl["q4_0", False] - kl["q4_0", True]
    gain8 = kl["q8_0", False] - kl["q8_0", True]
    assert abs(gain8) < gain4 / 100  # 8-bit steps are 16x finer: squared errors ~256x smaller


def test_q8_0_pair_is_near_lossless(qkv):
    q8 = attention_error(*qkv, "q8_0", "q8_0")
    q4 = attention_error(*qkv, "q4_0", "q4_0")
    assert q8["kl"] < q4["kl"] / 100
    assert q8["out_rel_l2"] < q4["out_rel_l2"] / 10
    assert q8["k_rel_l2"] < 2 ** -6 and q8["v_rel_l2"] < 2 ** -6


@pytest.mark.parametrize("rotation", [False, True])
def test_error_grows_with_context_for_low_bit_k(rotation):
    q_long, k, v = synthetic_kv(4096, CFG)
    q_short, _, _ = synthetic_kv(128, CFG)
    short = attention_error(q_short, k[:, :128], v[:, :128], "q4_0", "f16", rotation=rotation)
    long = attention_error(q_long, k, v, "q4_0", "f16", rotation=rotation)
    assert long["kl"] > short["kl"]


def test_cuda_kernel_choice_follows_the_default_fa_quants():
    cuda = lambda k, v, head_dim=128: (lambda p: (p.backend, p.kernel, p.read_k, p.read_v))(
        pair_path(k, v, "cuda", head_dim=head_dim))
    assert cuda("q4_0", "q4_0") == ("cuda", "vec", "q4_0", "q4_0")
    assert cuda("f32", "f16") == ("cuda", "vec", "f16", "f16")          # f32 goes through the F16 instance
    assert cuda("q8_0", "q4_0") == ("cuda", "vec-f16", "f16", "f16")    # not compiled: converted to f16
    assert cuda("iq4_nl", "f16")[:2] == ("cpu", "cpu")                  # no CUDA FA kernel for iq4_nl: the CPU runs it
    assert cuda("q8_0", "q8_0", head_dim=160)[:2] == ("cpu", "cpu")     # nor for a head size fattn.cu lacks


def test_backends_model_their_precision(qkv):
    # ggml-cpu accumulates an f16 V cache in an fp16 vector; ref and the f32-accumulating CUDA do not
    ref = attention_error(*qkv, "f32", "f16", backend="ref")
    cpu = attention_error(*qkv, "f32", "f16", backend="cpu")
    assert cpu["out_rel_l2"] > 1.5 * ref["out_rel_l2"]
    # ggml-cuda converts an f32 cache to f16 and quantizes Q to q8_1 for a quantized K
    assert attention_error(*qkv, "f32", "f32", backend="cuda")["k_rel_l2"] == 0
    assert attention_error(*qkv, "f32", "f32", backend="cuda")["kl"] > 0
    assert attention_error(*qkv, "q4_0", "q4_0", backend="cuda")["logit_rel_l2"] != \
        attention_error(*qkv, "q4_0", "q4_0", backend="ref")["logit_rel_l2"]


def test_q8_activation_rounding_cpu_even_cuda_away():
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = 127.0, 2.5   # amax 127: d = 1, 2.5 is a tie
    assert q8_blocks(x, "cpu")[0, 1] == 2.0 and q8_blocks(x, "cuda")[0, 1] == 3.0


def test_fp16_accumulator_rounds_every_update():
    logits = np.zeros((1, 1, 3), np.float32)           # equal weights 1, 1, 1
    v = np.array([[[2048.0], [1.0], [1.0]]], np.float32)  # 2048 + 1 is not an fp16: rounds back to 2048
    out = np.empty((1, 1, 1), np.float32)
    online_softmax(logits, v, True, out)
    assert out[0, 0, 0] == np.float32(2048.0) / 3  # exact would be 2050/3


@pytest.mark.parametrize("bad, error", [
    (dict(type_k="q3_k"), ValueError), (dict(backend="metal"), ValueError), (dict(flavor="x"), ValueError)])
def test_bad_arguments_are_named(qkv, bad, error):
    with pytest.raises(error):
        attention_error(*qkv, **bad)


def test_bad_shapes_are_named(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="float32"):
        attention_error(q.astype(np.float64), k, v)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        attention_error(q[:3], k, v)
    with pytest.raises(ValueError, match="same"):
        attention_error(q, k, v[:, :5])


@pytest.mark.parametrize("type_k", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])
def test_cpu_backend_kernel_outputs_are_the_online_softmax_bit_for_bit(type_k):
    """Given the V bytes, the cpu backend's outputs come from the flash-decoding kernel (kvlab.flash); without
    them, from cpu_fa's model of ggml's online softmax: the same bits for every V type (fp16 accumulator of
    f16/f32 V included), GQA 2 with 3 query rows a head, rotation on."""
    from kvlab.accuracy.attention import VCaches, attend_cache, kernel_runs, store_bytes
    from kvlab.rotation import rotate, rotation_plan
    from kvlab.types import TYPES
    q, k, v = synthetic_kv(48, SyntheticConfig(n_head=4, n_head_kv=2, head_dim=64, n_q=3, seed=2))
    plan_k = rotation_plan(type_k, type_k, 64).k
    k_stored = store_bytes(k, type_k, "cpu", plan_k)
    v_stored = {t: store_bytes(v, t, "cpu", rotation_plan(t, t, 64).v) for t in TYPES}
    values = {t: s[0] for t, s in v_stored.items()}
    q_rot = rotate(q, plan_k) if plan_k else q
    kernel = attend_cache(q_rot, k_stored, type_k, VCaches(values, {t: s[1] for t, s in v_stored.items()}), 48,
                          "cpu", 0.125)
    model = attend_cache(q_rot, k_stored, type_k, VCaches(values), 48, "cpu", 0.125)
    outs = {}
    for results in (kernel, model):
        for logits, cells in results:
            for i, path, out in cells:
                assert kernel_runs(path, q_rot)
                outs.setdefault(i, []).append(np.asarray(out, np.float32))
    assert len(outs) == len(TYPES)
    for i, (a, b) in outs.items():
        assert a.shape == (2, 6, 64) and np.array_equal(a.view(np.uint32), b.view(np.uint32)), list(TYPES)[i]
