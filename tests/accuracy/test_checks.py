"""Domain checks where llama.cpp has them (head_dim in whole blocks), and small bad inputs that used to slip
through: configs, topk, rotation sizes, masked arrays (issue 16)."""
import numpy as np
import pytest

import kvlab
from kvlab.accuracy.sample import as_sample


def _qkv(head_dim, n_head=4, n_head_kv=2, n_kv=16, n_q=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_head, n_q, head_dim)).astype(np.float32),
            rng.standard_normal((n_head_kv, n_kv, head_dim)).astype(np.float32),
            rng.standard_normal((n_head_kv, n_kv, head_dim)).astype(np.float32))


@pytest.mark.parametrize("type_k,type_v", [("q4_0", "f16"), ("f16", "q8_0"), ("iq4_nl", "q5_1")])
def test_head_dim_must_hold_whole_blocks_in_every_entry_point(type_k, type_v, tmp_path):
    q, k, v = _qkv(48)                                  # 2 KV heads of 48: a q4_0 block would straddle them
    with pytest.raises(ValueError, match="head_dim 48 is not a multiple of .* block size 32"):
        kvlab.attention_error(q, k, v, type_k, type_v)
    cfg = kvlab.SweepConfig(lengths=(16,), n_q=2, types_k=(type_k,), types_v=(type_v,), rotations=(False,),
                            flavors=("ref",))
    with pytest.raises(ValueError, match="run_sweep: head_dim 48"):
        kvlab.run_sweep((q, k, v), cfg, cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())                  # refused before any work
    m = kvlab.attention_error(q, k, v, "f16", "f32")     # per-value types take any head_dim
    assert m["out_rel_l2"] < 1e-3


@pytest.mark.parametrize("make,match", [
    (lambda: kvlab.SyntheticConfig(n_head=0), "positive int"),
    (lambda: kvlab.SyntheticConfig(n_head_kv=0), "positive int"),     # ZeroDivisionError before
    (lambda: kvlab.SyntheticConfig(n_q=0), "at least 1"),
    (lambda: kvlab.SyntheticConfig(rope_base=0), "rope_base"),
    (lambda: kvlab.SyntheticConfig(v_dof=-1), "v_dof"),
    (lambda: kvlab.SweepConfig(topk=0), "topk"),
    (lambda: kvlab.SweepConfig(topk=-3), "topk"),
    (lambda: kvlab.SweepConfig(types_k=()), "types_k is empty"),
    (lambda: kvlab.SweepConfig(rotations=("yes",)), "True/False"),
    (lambda: kvlab.SweepConfig(lengths=(128.5,)), "integers"),
    (lambda: kvlab.attention_error(*_qkv(64), topk=0), "topk"),
    (lambda: kvlab.attention_error(*_qkv(64), topk=True), "topk"),
    (lambda: kvlab.hadamard(True), "power of two"),
    (lambda: kvlab.rotate(np.zeros((2, 64), np.float32), True), "power of two"),
    (lambda: kvlab.empty_cache(4.5, 32, "q8_0"), "integers"),
])
def test_small_bad_inputs_get_a_value_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_masked_arrays_are_refused_not_unmasked():
    x = np.ma.masked_array(np.ones((2, 64), np.float32), mask=np.zeros((2, 64), bool))
    for call in (lambda: kvlab.quantize(x, "q8_0"), lambda: kvlab.rotate(x, 64),
                 lambda: kvlab.attention_error(*(np.ma.masked_array(a) for a in _qkv(64))),
                 lambda: as_sample(tuple(np.ma.masked_array(a) for a in _qkv(64))),
                 lambda: kvlab.set_rows(kvlab.empty_cache(4, 64, "q8_0"), np.array([0, 1]), x)):
        with pytest.raises(TypeError, match="mask would be ignored"):
            call()
