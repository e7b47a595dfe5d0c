"""kvlab.accuracy.depth: the layer stack is exact without quantization, agrees with the one-layer API, and
its error grows with depth the way the math says (fixed seeds; thresholds are ratios that follow
from the quantizers, as in test_attention: an 8-bit step is 16x finer than a 4-bit one)."""
from dataclasses import replace

import numpy as np
import pytest

from kvlab.accuracy.attention import attention_error, store
from kvlab.accuracy.depth import DEPTH_METRICS, StackConfig, _attention, exact_stack, layer_growth
from kvlab.accuracy.table import layers_path, select
from kvlab.rotation import rotation_plan
from kvlab.accuracy.synthetic import SyntheticConfig

CFG = StackConfig(n_layers=6, n_tokens=128, heads=SyntheticConfig(n_head=4, n_head_kv=2, head_dim=64, seed=1))
PAIRS = (("q4_0", "f16"), ("f16", "q4_0"), ("q4_0", "q4_0"), ("q8_0", "q8_0"), ("f32", "f32"))


@pytest.fixture(scope="module")
def table():
    return layer_growth(PAIRS, CFG, device="cpu")


def series(table, type_k, type_v, metric, rotation=True):
    sel = select(table, type_k=type_k, type_v=type_v, rotation=rotation)
    return sel.sort_values("depth")[metric].to_numpy()


def test_one_row_per_pair_rotation_and_depth(table):
    assert len(table) == len(PAIRS) * 2 * CFG.n_layers
    assert not table.duplicated(["type_k", "type_v", "rotation", "flavor", "depth"]).any()
    assert sorted(set(table.depth)) == list(range(1, CFG.n_layers + 1))
    assert table[list(DEPTH_METRICS)].notna().all().all()


def test_an_f32_cache_reproduces_the_exact_stack_at_every_depth(table):
    f32 = table[table.type_k == "f32"]
    assert (f32[list(DEPTH_METRICS)] == 0).all().all()


def test_the_first_layer_agrees_with_attention_error():
    """The stack's cache and attention path is kvlab.attention_error's (the last token sees every key)."""
    stack = exact_stack(CFG)
    first = stack.exact[0]
    plan = rotation_plan("q4_0", "q8_0", CFG.heads.head_dim)
    k_cache, v_cache = store(first.k, "q4_0", "ref", plan.k), store(first.v, "q8_0", "ref", plan.v)
    _, out = _attention(first.q, k_cache, v_cache, plan, stack.mask)
    last, exact_last = out[:, -1:], first.out[:, -1:]  # (n_head, 1, D)
    mine = np.linalg.norm(last - exact_last) / np.linalg.norm(exact_last)
    one = attention_error(first.q[:, -1:], first.k, first.v, "q4_0", "q8_0", rotation=True)
    assert mine == pytest.approx(one["out_rel_l2"], rel=1e-9)


def test_at_depth_one_nothing_is_inherited(table):
    assert np.array_equal(table[table.depth == 1].attn_rel_l2, table[table.depth == 1].attn_local_rel_l2)
    # without an MLP the first layer's residual error is its attention branch's error alone
    attention_only = layer_growth((("q4_0", "q4_0"),), replace(CFG, n_layers=1, mlp_ratio=0), (True,), device="cpu")
    row = attention_only.iloc[0]
    assert row.hidden_rel_l2 == pytest.approx(row.hidden_own_rel_l2, rel=1e-9)


@pytest.mark.parametrize("rotation", [False, True])
def test_error_grows_with_depth_for_low_bit_k(table, rotation):
    """The skip connection carries every earlier error forward while each layer adds a fresh one."""
    hidden = series(table, "q4_0", "f16", "hidden_rel_l2", rotation)
    half = len(hidden) // 2
    assert hidden[-1] > hidden[0] and hidden[half:].mean() > hidden[:half].mean()
    kl = series(table, "q4_0", "f16", "kl", rotation)
    assert kl[-1] > kl[0]  # later layers' keys also drift with the residual stream


def test_a_v_error_becomes_a_k_error_one_layer_later(table):
    kl = series(table, "f16", "q4_0", "kl")
    k_err = series(table, "f16", "q4_0", "k_rel_l2")
    assert kl[1] > 100 * kl[0]        # layer 1's weights see only the f16 rounding of K
    assert k_err[1] > 10 * k_err[0]   # layer 2's keys come from a perturbed residual stream


def test_q8_0_pair_stays_near_lossless_through_depth(table):
    q8, q4 = (series(table, t, t, "hidden_rel_l2") for t in ("q8_0", "q4_0"))
    assert (q8 < q4 / 10).all()
    kl8, kl4 = (series(table, t, t, "kl") for t in ("q8_0", "q4_0"))
    assert (kl8 < kl4 / 100).all()
    ratio = q4 / q8  # small errors propagate linearly: the ratio set by the first layer holds at every depth
    assert ratio.max() < 1.5 * ratio.min()


def test_the_torch_path_on_the_cpu_equals_the_numpy_path(table):
    torch = pytest.importorskip("torch")
    on_torch = layer_growth(PAIRS, CFG, device=torch.device("cpu"))
    assert set(on_torch.device) == {"torch-cpu"} and set(table.device) == {"cpu"}
    for metric in DEPTH_METRICS:
        np.testing.assert_allclose(on_torch[metric], table[metric], rtol=1e-8, atol=1e-14, err_msg=metric)


def test_layers_path_sits_beside_the_table():
    assert layers_path("out/t.parquet").name == "t.layers.parquet"


@pytest.mark.parametrize("bad", [dict(n_layers=0), dict(n_tokens=0), dict(branch_scale=0.0), dict(mlp_ratio=-1)])
def test_bad_stack_config_is_named(bad):
    with pytest.raises(ValueError, match="StackConfig"):
        replace(CFG, **bad)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown KV type"):
        layer_growth((("q3_k", "f16"),), CFG, device="cpu")
    with pytest.raises(ValueError, match="unknown device"):
        layer_growth(PAIRS, CFG, device="tpu")
