"""kvlab.accuracy.sweep: the full grid, agreement with the one-cell API, the disk cache, the saved table, the CLI."""
import json

import numpy as np
import pandas as pd
import pytest

from kvlab import FLAVORS, TYPES
from kvlab.accuracy.attention import attention_error
from kvlab.accuracy.metrics import METRICS
from kvlab.accuracy.synthetic import SyntheticConfig
from kvlab._xp import resolve_device
from kvlab import save_table, synthetic_sample
from kvlab.accuracy.sweep import SweepConfig, run_sweep
from kvlab.accuracy.table import select
from kvlab.cli import build_parser

SMALL = SweepConfig(lengths=(64, 128), n_q=2,
                    synthetic=SyntheticConfig(n_head=4, n_head_kv=2, head_dim=64, n_q=2, seed=3))


@pytest.fixture(scope="module")
def sample():
    return synthetic_sample(SMALL.lengths, SMALL.n_q, SMALL.synthetic)


@pytest.fixture(scope="module")
def table(sample, tmp_path_factory):
    return run_sweep(sample, SMALL, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_table_has_every_cell_once(table):
    assert len(table) == 81 * 2 * len(FLAVORS) * 2
    keys = ["type_k", "type_v", "rotation", "flavor", "n_ctx"]
    assert not table.duplicated(keys).any()
    assert set(table.type_k) == set(table.type_v) == set(TYPES)
    assert set(METRICS) <= set(table.columns)
    assert table[list(METRICS)].notna().all().all()


@pytest.mark.parametrize("type_k, type_v, rotation, flavor, n_ctx", [
    ("q4_0", "q8_0", True, "ref", 128), ("q5_1", "f16", False, "cpu", 64), ("iq4_nl", "q4_1", True, "cuda", 128),
    ("q8_0", "q4_0", True, "cuda", 64), ("bf16", "f16", True, "cpu", 128), ("f32", "f32", False, "cuda", 128)])
def test_vectorized_cells_equal_the_one_cell_api(table, sample, type_k, type_v, rotation, flavor, n_ctx):
    row = select(table, type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor, n_ctx=n_ctx).iloc[0]
    one = attention_error(sample.queries_for(n_ctx, SMALL.n_q), sample.k[:, :n_ctx], sample.v[:, :n_ctx],
                          type_k, type_v, rotation=rotation, flavor=flavor, backend=flavor)
    for metric in METRICS:
        assert row[metric] == pytest.approx(one[metric], rel=1e-5, abs=1e-9), metric


def test_the_torch_path_on_the_cpu_equals_the_numpy_path(table, sample, tmp_path):
    """What runs on a GPU (CUDA tensors through kvlab.quantize, attention in torch), run on the CPU."""
    torch = pytest.importorskip("torch")
    on_torch = run_sweep(sample, SMALL, cache_dir=tmp_path, progress=False, device=torch.device("cpu"))
    assert set(on_torch.device) == {"torch-cpu"} and set(table.device) == {"cpu"}
    keys = ["type_k", "type_v", "rotation", "flavor", "n_ctx"]
    both = table.merge(on_torch, on=keys, suffixes=("", "_torch"), validate="one_to_one")
    assert len(both) == len(table)
    for metric in METRICS:
        ref = both.flavor == "ref"  # float64 attention: equal to rounding
        np.testing.assert_allclose(both[metric][ref], both[f"{metric}_torch"][ref], rtol=1e-9, atol=1e-14)
        # cpu/cuda backends: float32 sums in another order (numpy vs torch), nothing else
        np.testing.assert_allclose(both[metric], both[f"{metric}_torch"], rtol=1e-4, atol=1e-6, err_msg=metric)
    for metric in ("k_rel_l2", "v_rel_l2"):  # the same cache bytes
        np.testing.assert_allclose(both[metric], both[f"{metric}_torch"], rtol=1e-12)


def test_backend_column_names_what_read_the_cell(table):
    """ggml-cuda has no flash-attention kernel for iq4_nl: its cuda-flavor cells are read by ggml-cpu."""
    cuda = table[table.flavor == "cuda"]
    on_cpu = cuda.type_k.eq("iq4_nl") | cuda.type_v.eq("iq4_nl")
    assert set(cuda[on_cpu].backend) == {"cpu"} and set(cuda[~on_cpu].backend) == {"cuda"}
    assert set(table[table.flavor == "cpu"].backend) == {"cpu"} and set(table[table.flavor == "ref"].backend) == {"ref"}


def test_rotation_columns_follow_rotation_plan(table):
    on = table[table.rotation]
    assert set(on[on.type_k == "q4_0"].rot_k) == {64} and set(on[on.type_k == "f16"].rot_k) == {0}
    assert set(table[~table.rotation].rot_k) == {0}


def test_second_run_is_read_from_the_cache(sample, tmp_path):
    cfg = SweepConfig(lengths=(64,), n_q=2, types_k=("q4_0", "f16"), types_v=("q8_0",), flavors=("ref",),
                      synthetic=SMALL.synthetic)
    first = run_sweep(sample, cfg, cache_dir=tmp_path, progress=False)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2  # one per (flavor, rotation) chunk
    for f in files:  # a cached chunk is what the second run returns
        pd.read_parquet(f).assign(kl=-1.0).to_parquet(f, index=False)
    second = run_sweep(sample, cfg, cache_dir=tmp_path, progress=False)
    assert (second.kl == -1.0).all() and len(second) == len(first)


def test_saved_table_carries_settings_and_versions(table, tmp_path):
    for suffix in (".parquet", ".csv"):
        path, meta = save_table(table, tmp_path / f"t{suffix}")
        back = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        assert len(back) == len(table)
        info = json.loads(meta.read_text())
        assert info["settings"]["lengths"] == [64, 128] and "numba" in info["versions"]
    with pytest.raises(ValueError, match="parquet or .csv"):
        save_table(table, tmp_path / "t.xlsx")


def test_cli_writes_the_table(tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "s.csv"
    args = parser.parse_args(["sweep", "--lengths", "32", "--n-q", "2", "--types", "q4_0,f16", "--flavors", "ref",
                              "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert args.run(args) == 0
    assert len(pd.read_csv(out)) == 2 * 2 * 2 and "wrote" in capsys.readouterr().out
    assert not (tmp_path / "s.layers.csv").exists()


def test_cli_writes_the_layer_growth_table_beside(tmp_path):
    parser = build_parser()
    out = tmp_path / "s.parquet"
    args = parser.parse_args(["sweep", "--lengths", "32", "--n-q", "2", "--types", "q4_0,f16", "--flavors", "ref",
                              "--layers", "2", "--layer-tokens", "32", "--device", "cpu", "--out", str(out),
                              "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert args.run(args) == 0
    depth = pd.read_parquet(tmp_path / "s.layers.parquet")
    assert len(depth) == 2 * 2 * 2 * 2  # K types x V types x rotations x depths
    assert json.loads((tmp_path / "s.layers.parquet.json").read_text())["settings"]["n_layers"] == 2


def test_a_missing_gpu_is_named():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") is None  # no GPU: numpy on the CPU


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="unknown KV type"):
        SweepConfig(types_k=("q3_k",))
    with pytest.raises(ValueError, match="lengths"):
        SweepConfig(lengths=(2,), n_q=4)
