"""kvlab check-llama: kvlab's KLD per pair and its cache bytes against a real llama.cpp (llama-cpp-python)."""
import json

import numpy as np
import pytest
import torch

from kvlab.cli import main
from kvlab.ggml.llama_check import (DEFAULT_PAIRS, CheckConfig, ModelSpec, PairResult, format_report,
                                    identical_blocks, run_check)
from kvlab.ggml.state import read_state
from kvlab.hf.cache import GGMLQuantizedCache
from kvlab.hf.evaluate import TokenStats
from kvlab.types import TYPES


def test_default_pairs_meet_the_goal_on_both_head_dims():
    """The CI set: every pair's ggml-cpu KLD within 10% of llama.cpp's, >= 99% identical blocks at layer 0,
    rotation on and off, head_dim 64 and 128; no pair ranked the other way beyond the noise."""
    config = CheckConfig(models=(ModelSpec(64, n_layer=2), ModelSpec(128, n_layer=2)), pairs=DEFAULT_PAIRS,
                         n_ctx=64, n_chunks=2)
    report = run_check(config)
    rows = report["rows"]
    assert len(rows) == 2 * 2 * len(DEFAULT_PAIRS)
    for r in rows:
        name = f"{r['model']} {r['type_k']}/{r['type_v']} rotation={r['rotation']}"
        assert r["llama_kld"] > 0, name                                   # every CI pair quantizes something
        assert abs(r["ratio_ggml_cpu"] - 1) <= 0.10, name
        for side, t in (("k", r["type_k"]), ("v", r["type_v"])):
            if TYPES[t].is_quantized:
                assert r[f"identical_{side}"][0] >= 0.99, name
        assert r["ok"], name
    assert report["ok"]
    assert all(o["swapped_beyond_noise"] == 0 for o in report["ordering"].values())
    assert "OK: 20 of 20 rows" in format_report(report)


def test_llama_cpp_order_of_k_channels_is_what_makes_the_blocks_identical(llama_pair):
    """llama.cpp holds each K head in the GGUF's RoPE order: kvlab matches it byte for byte only with
    k_order='gguf'; in the model's own order the blocks group other channels."""
    spec, model, llama = llama_pair
    tokens = np.random.default_rng(3).integers(0, spec.vocab, 32)
    state = read_state(llama.run(tokens, "q8_0", "q8_0", rotation=False)[1])
    fractions = {}
    for order in ("model", "gguf"):
        cache = GGMLQuantizedCache(model.config, "q8_0", "q8_0", "cpu", False, order)
        with torch.no_grad():
            model(torch.as_tensor(tokens).view(1, -1), cache=cache, use_cache=True)
        same, total = identical_blocks(state.layers[0].k, cache.layers[0].quantized_keys)
        fractions[order] = same / total
    assert fractions["gguf"] >= 0.99
    assert fractions["model"] < 0.5


def _stats(kld):
    n = len(kld)
    return TokenStats(kld=np.asarray(kld, float), nll=np.ones(n), nll_base=np.ones(n), same_top=np.ones(n, bool))


@pytest.mark.parametrize("scale,identical,ok", [(1.05, 1.0, True), (1.2, 1.0, False), (0.85, 1.0, False),
                                                (1.0, 0.98, False)])
def test_a_row_misses_when_kld_or_bytes_are_off(scale, identical, ok):
    kld = np.random.default_rng(0).exponential(0.01, 400)
    res = PairResult("hd64", True, "q4_0", "q8_0")
    res.llama.add(_stats(kld))
    for side in res.kvlab.values():
        side.add(_stats(kld * scale))
    res.add_blocks([(int(identical * 1000), 1000)], [(1000, 1000)])
    row = res.summary(CheckConfig())
    assert row["ratio_ggml_cpu"] == pytest.approx(scale)
    assert row["ok"] is ok


def test_cli_json_report(capsys):
    code = main(["check-llama", "--pairs", "q4_0/q8_0", "--head-dims", "64", "--layers", "2", "-c", "32",
                 "--chunks", "1", "--rotation", "on", "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    (row,) = report["rows"]
    assert (row["type_k"], row["type_v"], row["rotation"], row["tokens"]) == ("q4_0", "q8_0", True, 15)
    assert {"llama_kld", "kvlab_model_kld", "kvlab_ggml_cpu_kld", "ratio_ggml_cpu", "identical_k"} <= set(row)


@pytest.mark.parametrize("argv,message", [
    (["--pairs", "q4_0/q9_9"], "unknown KV type 'q9_9'"),
    (["--head-dims", "80"], "--head-dims: 80 is not a multiple of 64"),
    (["--tolerance", "3"], "--tolerance: expected a fraction"),
    (["-c", "4"], "need n_ctx >= 8"),
])
def test_cli_usage_errors_are_one_line(capsys, argv, message):
    assert main(["check-llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab check-llama: error:") and message in err and "\n" not in err


def test_the_two_kvlab_attentions_really_differ_where_ggml_casts():
    """llama.cpp casts an f32 cache to f16 for flash attention: against its f16 base the KLD is exactly 0,
    and so is kvlab's with ggml-cpu attention; the model's own attention reads the f32 values (KLD > 0)."""
    config = CheckConfig(models=(ModelSpec(64, n_layer=2),), pairs=(("f32", "f32"),), rotations=(True,),
                         n_ctx=32, n_chunks=1)
    (row,) = run_check(config)["rows"]
    assert row["llama_kld"] == 0.0 and row["kvlab_ggml_cpu_kld"] == 0.0 and row["ratio_ggml_cpu"] == 1.0
    assert row["kvlab_model_kld"] > 0.0
