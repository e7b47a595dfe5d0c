"""kvlab's bytes against real ggml's, byte for byte, on every golden input.

Golden files (tests/golden/): inputs.npz from tools/golden_inputs.py; ggml_<type>.npz from the ggml C
library (tools/make_golden.py: `.ref`, `.cpu`, `.deq`, and `.<flavor>_defined` masks); cuda_<type>.npz
from ggml-cuda's cpy-utils.cuh compiled by nvcc on the GPU machine (`.cuda`).
Where ggml's own bytes depend on more than the block's input (iq4_nl ref packs stale qs for blocks with
amax < 1e-15: all zeros, float32 subnormals, all NaN),
the mask leaves them out, and the dequantize test still checks what those blocks decode to.
"""
import hashlib
import importlib.util
import json

import numpy as np
import pytest

import kvlab
from kvlab.types import TYPES
from tests.conftest import GOLDEN, ROOT

GOLDEN_INPUTS_PY = ROOT / "tools" / "golden_inputs.py"   # tools/ is not a package
GOLDEN_FILE = {"ref": "ggml_{}.npz", "cpu": "ggml_{}.npz", "cuda": "cuda_{}.npz"}


def describe_first_difference(differs, x, expected, got, show, what):
    """'k of n blocks differ' plus the first differing block: its input, expected and got.

    differs: (rows, n_blocks) bool; expected, got: (rows, n_blocks, ...) blocks; show: block -> text."""
    row, block = np.unravel_index(int(np.argmax(differs)), differs.shape)
    block_size = x.shape[1] // differs.shape[1]
    values = x[row, block * block_size:(block + 1) * block_size]
    return (f"{int(differs.sum())} of {differs.size} blocks differ ({what}); first: row {row}, block {block}\n"
            f"  input    {float_bits(values)}\n"
            f"  expected {show(expected[row, block])}\n"
            f"  got      {show(got[row, block])}")


def float_bits(values):
    """float32 values exactly, each with its bit pattern (NaN payloads and -0 show)."""
    return " ".join(f"{v!r}({b:08x})" for v, b in zip(values.tolist(), values.view(np.uint32).tolist()))


def hex_bytes(block):
    return bytes(block).hex()


def test_quantize_bytes_equal_ggml(type_name, flavor, case, golden_inputs, golden):
    info, x = TYPES[type_name], golden_inputs[case]
    gold = golden(GOLDEN_FILE[flavor].format(type_name))
    expected = gold[f"{case}.{flavor}"]
    defined = gold.get(f"{case}.{flavor}_defined", np.ones(expected.shape, bool))
    got = np.asarray(kvlab.quantize(x, type_name, flavor=flavor).raw)
    assert got.shape == expected.shape and got.dtype == np.uint8, f"raw is {got.dtype} {got.shape}"
    by_block = (x.shape[0], -1, info.type_size)                          # (rows, n_blocks, type_size)
    differs = ((got != expected) & defined).reshape(by_block).any(axis=2)
    if differs.any():
        pytest.fail(describe_first_difference(differs, x, expected.reshape(by_block), got.reshape(by_block),
                                              hex_bytes, f"{type_name} {flavor} on {case!r}"), pytrace=False)


def test_dequantize_bits_equal_ggml(type_name, case, golden_inputs, golden):
    """to_float of ggml's ref bytes, compared as float32 bit patterns (NaN payloads and -0 included)."""
    info, x = TYPES[type_name], golden_inputs[case]
    gold = golden(GOLDEN_FILE["ref"].format(type_name))
    expected = gold[f"{case}.deq"]
    got = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(gold[f"{case}.ref"], type_name, x.shape)))
    assert got.shape == expected.shape and got.dtype == np.float32, f"dequantize gave {got.dtype} {got.shape}"
    by_block = (x.shape[0], -1, info.block_size)                         # (rows, n_blocks, block_size)
    differs = (got.view(np.uint32) != expected.view(np.uint32)).reshape(by_block).any(axis=2)
    if differs.any():
        pytest.fail(describe_first_difference(differs, x, expected.reshape(by_block), got.reshape(by_block),
                                              float_bits, f"{type_name} to_float on {case!r}"), pytrace=False)


def test_inputs_file_matches_golden_cases(golden_inputs):
    """tests/golden/inputs.npz is what tools/golden_inputs.py generates: edit both or neither."""
    spec = importlib.util.spec_from_file_location("golden_inputs", GOLDEN_INPUTS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = module.golden_cases()
    stored = golden_inputs
    assert sorted(stored) == sorted(cases)
    for name, x in cases.items():
        assert stored[name].dtype == x.dtype and stored[name].shape == x.shape, name
        assert stored[name].tobytes() == x.tobytes(), f"inputs.npz[{name!r}] differs from golden_cases()"


def test_ggml_golden_files_match_manifest():
    """The ggml_*.npz files are the ones tools/make_golden.py wrote from inputs.npz (MANIFEST.json)."""
    manifest = json.loads((GOLDEN / "MANIFEST.json").read_text())
    assert manifest["inputs_sha256"] == hashlib.sha256((GOLDEN / "inputs.npz").read_bytes()).hexdigest()
    assert sorted(manifest["files"]) == sorted(f"ggml_{t}.npz" for t in TYPES)
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == entry["sha256"], name
