"""The CUDA kernels under the Numba CUDA simulator: bytes equal to the CPU kernels (every type x flavor
x case) and to ggml-cuda's own bytes (tests/golden/cuda_<type>.npz) for the cuda flavor.

One subprocess per session runs every kernel (cuda_sim_outputs.py: the simulator must be chosen before
numba.cuda is first imported); each output is then its own test here.
"""
from pathlib import Path

import numpy as np
import pytest

import kvlab
from kvlab.types import TYPES

from . import cuda_sim_outputs as sim_run
from .simulated import simulated_outputs

pytestmark = pytest.mark.cudasim


@pytest.fixture(scope="session")
def sim(tmp_path_factory) -> dict:
    inputs = Path(__file__).parents[1] / "golden" / "inputs.npz"
    return simulated_outputs(sim_run.__file__, tmp_path_factory.mktemp("cuda_sim"), inputs)


def assert_same_bits(got, want, unit, what):
    """Equal bytes (float32 compared as bits); else how many `unit`-byte blocks differ, and the first."""
    g = np.ascontiguousarray(got).view(np.uint8).reshape(-1)
    w = np.ascontiguousarray(want).view(np.uint8).reshape(-1)
    assert g.shape == w.shape, f"{what}: {g.size} bytes, expected {w.size}"
    differs = (g != w).reshape(-1, unit).any(axis=1)
    if differs.any():
        k = int(np.argmax(differs))
        pytest.fail(f"{what}: {int(differs.sum())} of {differs.size} blocks differ; first, block {k}: "
                    f"got {g.reshape(-1, unit)[k].tobytes().hex()}, expected {w.reshape(-1, unit)[k].tobytes().hex()}",
                    pytrace=False)


def sim_input(golden_inputs, case):
    return np.ascontiguousarray(golden_inputs[case][1:2])                      # (1, 256), as the run


@pytest.mark.parametrize("case", sim_run.CASES)
def test_quantize_equals_cpu_kernel(type_name, flavor, case, sim, golden_inputs):
    want = kvlab.quantize(sim_input(golden_inputs, case), type_name, flavor).raw
    assert_same_bits(sim[f"quantize/{type_name}/{flavor}/{case}"], want, TYPES[type_name].type_size,
                     f"{type_name} {flavor} on {case!r}, GPU vs CPU")


@pytest.mark.parametrize("case", sim_run.CASES)
def test_cuda_flavor_equals_ggml_cuda(type_name, case, sim, golden):
    want = golden(f"cuda_{type_name}.npz")[f"{case}.cuda"][1:2]               # row 1, as the run
    assert_same_bits(sim[f"quantize/{type_name}/cuda/{case}"], want, TYPES[type_name].type_size,
                     f"{type_name} cuda on {case!r}, GPU vs ggml-cuda")


@pytest.mark.parametrize("name,flavor,n", sim_run.LOOPED)
def test_blocks_looping_over_tiles_equal_cpu_kernel(name, flavor, n, sim, golden_inputs):
    """A lookahead type's CUDA block quantizes TILES_PER_BLOCK (here 2) tiles, the next one's copies in
    flight meanwhile (a copy landing before every row was read shows here: checked); 3 tiles, so one
    block takes a single, partial tile. The rotated case writes through row_ids, rows reversed."""
    x = golden_inputs["normal"][:sim_run.LOOPED_ROWS]
    want = kvlab.quantize(kvlab.rotate(x, n)[::-1] if n else x, name, flavor).raw
    assert_same_bits(sim[f"looped/{name}/{flavor}/{n}"], want, TYPES[name].type_size,
                     f"{name} {flavor} n={n} over 3 tiles, GPU vs CPU")


@pytest.mark.parametrize("case", sim_run.CASES)
def test_dequantize_equals_cpu_kernel(type_name, case, sim):
    raw = sim[f"quantize/{type_name}/cuda/{case}"]
    want = kvlab.dequantize(kvlab.QTensor.from_raw(raw, type_name, (1, 256)))
    assert_same_bits(sim[f"dequantize/{type_name}/{case}"], want, 4 * TYPES[type_name].block_size,
                     f"{type_name} to_float on {case!r}, GPU vs CPU")


@pytest.mark.parametrize("shape,n", sim_run.ROTATIONS)
def test_rotate_equals_cpu(shape, n, sim, golden_inputs):
    want = kvlab.rotate(sim_run.rotation_input(golden_inputs, shape), n)
    assert_same_bits(sim[f"rotate/{n}"], want, 4 * n, f"rotate n={n}")


@pytest.mark.parametrize("n,flavor", sim_run.FUSED)
def test_rotate_quantize_with_row_ids_equals_rotate_then_quantize(n, flavor, sim, golden_inputs):
    a = sim_run.rotation_input(golden_inputs, (2, max(256, n)))
    q = kvlab.quantize(kvlab.rotate(a, n), "q4_0", flavor).raw                  # (2, row_bytes)
    want = np.zeros((3, q.shape[1]), np.uint8)                                  # row 1 untouched
    want[list(sim_run.FUSED_ROW_IDS)] = q
    assert_same_bits(sim[f"rotate_quantize/{n}/{flavor}"], want, 18, f"rotate_quantize n={n} {flavor}")


@pytest.mark.parametrize("n", [n for n, _ in sim_run.FUSED])
def test_dequantize_unrotate_equals_dequantize_then_rotate(n, sim, golden_inputs):
    a = sim_run.rotation_input(golden_inputs, (2, max(256, n)))
    flavor = dict((m, fl) for m, fl in sim_run.FUSED)[n]
    q = kvlab.quantize(kvlab.rotate(a, n), "q4_0", flavor)
    assert_same_bits(sim[f"dequantize_unrotate/{n}"], kvlab.rotate(kvlab.dequantize(q), n), 4 * n,
                     f"dequantize_unrotate n={n}")


@pytest.mark.parametrize("cols", [256, 6])
def test_set_rows_f16_equals_cpu(cols, sim, golden_inputs):
    v = np.ascontiguousarray(golden_inputs["nan"][:2, :cols])
    want = np.zeros((3, 2 * cols), np.uint8)
    want[1:] = kvlab.quantize(v, "f16", "cpu").raw
    assert_same_bits(sim[f"set_rows_f16/{cols}"], want, 2, f"set_rows f16 cols={cols}")


@pytest.mark.parametrize("n_ids", sim_run.SET_ROWS_IDS)
def test_set_rows_checks_ids_on_the_gpu(n_ids, sim, golden_inputs):
    """In range: the rows land (ids reversed); one id past the cache: not a byte written, ValueError."""
    v = np.ascontiguousarray(golden_inputs["normal"][:n_ids, :32])
    assert not sim[f"set_rows_ids_raised/{n_ids}/False"]
    assert_same_bits(sim[f"set_rows_ids/{n_ids}/False"], kvlab.quantize(v, "q8_0", "ref").raw[::-1], 34,
                     f"set_rows of {n_ids} ids")
    assert sim[f"set_rows_ids_raised/{n_ids}/True"]
    assert (sim[f"set_rows_ids/{n_ids}/True"] == 0xAB).all(), "a refused set_rows wrote bytes"


@pytest.mark.parametrize("name", ["q4_1", "f16"])
def test_public_api_on_device_arrays_equals_host_calls(name, sim, golden_inputs):
    h = np.ascontiguousarray(golden_inputs["ties_pm"][:2, :64])
    q = kvlab.quantize(h, name, "cuda")
    assert_same_bits(sim[f"api/quantize/{name}"], q.raw, TYPES[name].type_size, f"kvlab.quantize {name}")
    assert_same_bits(sim[f"api/dequantize/{name}"], kvlab.dequantize(q), 4, f"kvlab.dequantize {name}")
    assert sim[f"api/out_is_the_buffer/{name}"]
    assert_same_bits(sim[f"api/quantize_out/{name}"], q.raw, TYPES[name].type_size, f"quantize(out=) {name}")
    assert_same_bits(sim[f"api/dequantize_out/{name}"], kvlab.dequantize(q), 4, f"dequantize(out=) {name}")


def test_public_rotate_and_set_rows_on_device_arrays_equal_host_calls(sim, golden_inputs):
    h = np.ascontiguousarray(golden_inputs["ties_pm"][:2, :64])
    assert_same_bits(sim["api/rotate"], kvlab.rotate(h, 64), 4, "kvlab.rotate")
    cache = kvlab.empty_cache(4, 64, "q4_1", "cuda")
    kvlab.set_rows(cache, np.array([3, 1]), h)
    assert_same_bits(sim["api/set_rows"], cache.raw, 20, "kvlab.set_rows")
