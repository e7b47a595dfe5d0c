"""The public names: callables that are not modules, type names in any case, what quantize converts."""
import importlib.util

import numpy as np
import pytest
import torch

import kvlab


def test_sweep_is_a_function_and_no_module_shadows_it():
    assert callable(kvlab.sweep) and kvlab.sweep is kvlab.accuracy.sweep.sweep
    assert importlib.util.find_spec("kvlab.sweep") is None
    for name in kvlab.__all__:
        assert importlib.util.find_spec(f"kvlab.{name}") is None, f"kvlab.{name} is also a module"


def test_sweep_runs_on_what_synthetic_kv_returns(tmp_path):
    q, k, v = kvlab.synthetic_kv(64, kvlab.SyntheticConfig(n_q=2))
    cfg = kvlab.SweepConfig(lengths=(64,), n_q=2, types_k=("Q4_0",), types_v=("f16", "Q8_0"), flavors=("ref",))
    table = kvlab.run_sweep((q, k, v), cfg, cache_dir=tmp_path, progress=False)
    assert sorted(zip(table.type_k, table.type_v)) == [("q4_0", "f16"), ("q4_0", "f16"), ("q4_0", "q8_0"),
                                                       ("q4_0", "q8_0")]
    again = kvlab.sweep(cfg, kvlab.as_sample((q, k, v)), cache_dir=tmp_path, progress=False)
    assert again[["kl", "out_rel_l2"]].equals(table[["kl", "out_rel_l2"]])
    with pytest.raises(TypeError, match=r"\(q, k, v\) tuple"):
        kvlab.run_sweep([q, k, v], cfg, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="n_q <= n_kv"):
        kvlab.as_sample((k, q, v))


def test_type_names_in_any_case():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q = kvlab.quantize(x, "IQ4_NL")
    assert q.type == "iq4_nl" and q.raw.tobytes() == kvlab.quantize(x, "iq4_nl").raw.tobytes()
    assert kvlab.QTensor.from_raw(q.raw, "Iq4_Nl", x.shape).type == "iq4_nl"
    assert kvlab.empty_cache(4, 64, "Q8_0").type == "q8_0"
    assert kvlab.rotation_plan("Q4_0", "F16", 128) == kvlab.rotation_plan("q4_0", "f16", 128)
    qq, k, v = kvlab.synthetic_kv(64, kvlab.SyntheticConfig(n_q=2))
    assert kvlab.attention_error(qq, k, v, "Q8_0", "Q4_0") == kvlab.attention_error(qq, k, v, "q8_0", "q4_0")
    with pytest.raises(ValueError, match="unknown KV type 'Q9_9'"):
        kvlab.quantize(x, "Q9_9")


@pytest.mark.parametrize("type_name", ["q4_0", "q8_0", "iq4_nl", "f16"])
def test_quantize_converts_f16_bf16_f64_to_f32_first(type_name):
    x64 = np.random.default_rng(1).standard_normal((3, 64)) * 3
    for x, x32 in ((x64, x64.astype(np.float32)),
                   (x64.astype(np.float16), x64.astype(np.float16).astype(np.float32)),
                   (torch.from_numpy(x64).to(torch.bfloat16), torch.from_numpy(x64).to(torch.bfloat16).float()),
                   (torch.from_numpy(x64).half(), torch.from_numpy(x64).half().float())):
        want = kvlab.quantize(x32, type_name).raw
        got = kvlab.quantize(x, type_name).raw
        assert type(got) is type(want) and bytes(np.asarray(got)) == bytes(np.asarray(want))
    cache = kvlab.empty_cache(4, 64, type_name)
    kvlab.set_rows(cache, np.array([2, 0, 1]), x64)
    assert cache.raw[:3].tobytes() == kvlab.quantize(x64.astype(np.float32)[[1, 2, 0]], type_name).raw.tobytes()
    with pytest.raises(TypeError, match="expected dtype float32"):
        kvlab.quantize(np.zeros((2, 64), np.int32), type_name)
