"""`kvlab check-ggml` against ggml-python's libggml (PyPI, the test extra): bytes of all nine types, and
the real meta backend's split states against kvlab.split on the whole configuration matrix, each
configuration in its own process (an abort kills only that child).

ggml-python 0.0.45's ggml (version 0.15.3) is an early post-#23792 state: where it differs from the
October-2026 rules kvlab's era pr23792 follows, the difference must be exactly the documented drift
(EXPECTED_MQA_DRIFT below, check_ggml.EXPECTED_DRIFT in the docs), no more and no fewer.
"""
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

import kvlab

from kvlab.cli import main
from kvlab.ggml import check as check_ggml
from kvlab.ggml.lib import llama_cpp_lib_dir
from kvlab.ggml.meta import BlockSpec, infer_split_states, parse_child_output, parse_state_line

spec = importlib.util.find_spec("ggml")
if spec is None or not spec.submodule_search_locations:
    pytest.skip("ggml-python is not installed (pip install ggml-python==0.0.45)", allow_module_level=True)
LIB = Path(next(iter(spec.submodule_search_locations))) / "lib"

# Written out, not derived from check_ggml: MQA (one KV head) on every device count.
EXPECTED_MQA_DRIFT = {f"mqa/{n}dev/{case}" for n in (1, 2, 3, 4)
                      for case in ("decode/rot-off", "prompt/rot-on", "prompt/rot-off")}


def run_cli(*argv):
    return main(["check-ggml", *argv])


@pytest.fixture(scope="module")
def report():
    """The whole `kvlab check-ggml --format json` run, once: (exit code, parsed JSON)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli("--lib", str(LIB), "--format", "json")
    return code, json.loads(out.getvalue())


def test_flash_attention_is_checked_on_llama_cpps_ggml_unless_a_library_is_named(report, monkeypatch):
    """With --lib every section reads that library; without, the flash-attention section reads
    llama-cpp-python's libggml (ggml-python's older ggml sums f16 dots in half precision on AVX512-FP16)."""
    assert report[1]["flash_attn_library"] == str(LIB)
    monkeypatch.delenv("KVLAB_GGML_LIB", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_cli("--format", "json")
    rep = json.loads(out.getvalue())
    assert rep["library"] == str(LIB) and rep["flash_attn_library"] == str(llama_cpp_lib_dir())
    if rep["flash_attn"]["modelled_isa"]:
        assert rep["flash_attn"]["failed"] == []


def test_library_has_the_nr_layout(report):
    _, rep = report
    assert rep["split_state_layout"] == "nr" and rep["era"] == "pr23792"


def test_bytes_agree_on_all_types_and_paths(report):
    _, rep = report
    rows = {(r["type"], r["path"]): r for r in rep["bytes"]}
    assert len(rows) == 9 * 3
    assert all(r["blocks"] > 0 for r in rows.values())
    bad = {k: r["first"] for k, r in rows.items() if r["differ"]}
    assert not bad, f"kvlab's bytes differ from ggml's: {bad}"


def test_split_matrix_differs_exactly_by_the_known_drift(report):
    code, rep = report
    assert len(rep["split"]) == 64
    differing = {r["config"] for r in rep["split"] if not r["agrees"]}
    assert differing == EXPECTED_MQA_DRIFT
    assert all(r["known_drift"] for r in rep["split"] if not r["agrees"])
    assert sum(r["compared"] for r in rep["split"]) > 1500
    assert code == 1                     # any difference, known or not, is a non-zero exit


def test_drifted_nodes_are_the_mqa_head_reshapes(report):
    _, rep = report
    for r in rep["split"]:
        for d in r["differences"]:
            if not d.startswith("stops:"):
                assert d.split(" [")[0] in {"Kcur-0 (reshaped)", "Vcur-0 (reshaped)", "Kcur-0 (rope)",
                                            "cache_k_l0 (view)", "cache_v_l0 (view)",
                                            "cache_k_l0 (view) (permuted)", "cache_v_l0 (view) (permuted)"}, d


def test_library_aborts_are_caught_per_configuration():
    """MQA with the rotation: both ggml and kvlab stop at the Hadamard mul_mat; the test process lives on."""
    cfg = check_ggml.Config("mqa", 2, "decode", True)
    block = check_ggml._model_block(cfg, "pr23792")
    meta = infer_split_states(check_ggml._spec(block), LIB)
    assert meta.abort and not meta.error
    res = check_ggml.compare(cfg, "pr23792", block, meta)
    assert res.agrees and res.ggml_stop.startswith("Kcur-0 (rot):") and res.kvlab_stop.startswith("Kcur-0 (rot):")


def test_a_wrong_era_is_caught():
    """The comparison can fail: the pre-fix rules disagree with a post-#23792 library on a prompt batch."""
    configs = [check_ggml.Config("gqa", 2, "prompt", True), check_ggml.Config("gqa", 2, "prompt", False)]
    layout, era, results = check_ggml.check_split(LIB, "flatten", configs)
    assert (layout, era) == ("nr", "flatten")
    assert not results[0].agrees and "stops:" in " ".join(results[0].differences)
    assert results[1].agrees


def test_parse_both_debug_formats():
    with_nr = "SPLIT_STATE: {Kcur-0 (rope)[ROPE, 1, {4x1, 4x1}]} -> Kcur-0 (rot in)[RESHAPE, 1, {4x6, 4x6}]"
    without = "SPLIT_STATE: {} -> cache_k_l0[NONE, 0, {512, 512}]"
    assert parse_state_line(with_nr) == ("Kcur-0 (rot in)", "RESHAPE", ("1", (4, 4), 6))
    assert parse_state_line(without) == ("cache_k_l0", "NONE", ("0", (512, 512), 1))
    assert parse_state_line("llama: something else") is None


def test_abort_message_and_failure_parsing():
    res = parse_child_output("KVLAB_LAYOUT no-nr\n", "x\n/src/ggml-backend-meta.cpp:733: GGML_ASSERT(a) failed\n", -6)
    assert (res.layout, res.abort, res.error) == ("no-nr", "GGML_ASSERT(a) failed", "")
    res = parse_child_output("", "Traceback ...\nAttributeError: ggml_backend_meta_device\n", 1)
    assert res.error.startswith("AttributeError") and not res.ok


def test_bad_library_path_is_a_clear_error(tmp_path, capsys):
    assert run_cli("--lib", str(tmp_path)) == 2
    assert "libggml-base.so" in capsys.readouterr().err


def test_the_child_reports_graph_layout_and_states_even_when_it_aborts():
    """Nothing split (the callback answers MIRRORED for everything): ggml 0.15.3's flash_attn_ext has no
    all-MIRRORED case yet and asserts Q on axis 2; what came before the abort is still reported."""
    meta = infer_split_states(BlockSpec(64, 1, 1, 1, 256, 64, 0, 0, n_devices=1), LIB)
    assert meta.layout == "nr" and not meta.error
    assert meta.abort == "GGML_ASSERT(src_ss[0].axis == GGML_BACKEND_SPLIT_AXIS_2) failed"
    assert meta.states["attn_norm-0"] == ("MIRRORED", (0,), 1)
    assert [n[0] for n in meta.graph][-1] == "attn_out-0" and "__fattn__-0" not in meta.states


@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16"])
def test_per_value_types_match_live_ggml_on_odd_rows_with_nan_payloads(type_name):
    """ggml-cpu converts a row's body with F16C and its tail in software: NaN payloads differ between the
    two, so rows whose length is not a multiple of the vector width must be converted row by row."""
    from kvlab.ggml import lib as ggml
    lib = ggml.load()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    bits = x.view(np.uint32)
    bits[:, [1, 20, 33, 35, 36]] = np.array([0x7FC12345, 0x7F812345, 0xFFC00001, 0x7F800001, 0x7FBFFFFF],
                                            dtype=np.uint32)
    for flavor, ground_truth in (("ref", lib.quantize_ref), ("cpu", lib.quantize_cpu)):
        assert kvlab.quantize(x, type_name, flavor).raw.tobytes() == ground_truth(x, type_name).tobytes(), flavor
    if type_name == "f16":  # f16 is the type whose row tail differs: a flat conversion must not match
        flat = lib.quantize_cpu(x.reshape(1, -1), type_name).reshape(x.shape[0], -1)
        assert flat.tobytes() != kvlab.quantize(x, type_name, "cpu").raw.tobytes()
