"""kvlab.types: the type table (ggml's type_traits) and its kernels."""
import pickle
import subprocess
import sys

import pytest

from kvlab.types import FLAVORS, TYPES, flavor_code, type_info


def test_sizes_are_ggml_type_traits():
    # ggml.c type_traits: blck_size and type_size, and the enum ggml_type values (ggml.h)
    want = {"f32": (0, 1, 4), "f16": (1, 1, 2), "bf16": (30, 1, 2), "q8_0": (8, 32, 34), "q4_0": (2, 32, 18),
            "q4_1": (3, 32, 20), "iq4_nl": (20, 32, 18), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24)}
    assert {name: (t.ggml_type, t.block_size, t.type_size) for name, t in TYPES.items()} == want


def test_row_kernels_come_from_the_type_s_own_module(type_name):
    info = TYPES[type_name]
    assert info.quantize_row.py_func.__module__ == f"kvlab.kernels.{type_name}"
    assert info.quantize_row.__name__ == f"quantize_row_{type_name}"
    assert info.dequantize_row.__name__ == f"dequantize_row_{type_name}"


def test_a_type_info_pickles_to_the_table_s_entry(type_name):
    assert pickle.loads(pickle.dumps(TYPES[type_name])) is TYPES[type_name]


def test_flavor_codes_index_the_one_enum():
    from kvlab.kernels import CPU, CUDA, REF
    assert [flavor_code(f) for f in FLAVORS] == [REF, CPU, CUDA] == [0, 1, 2]


@pytest.mark.parametrize("bad", ["q4", "", None, 3])
def test_unknown_names_are_refused(bad):
    with pytest.raises(ValueError, match="unknown KV type"):
        type_info(bad)
    with pytest.raises(ValueError, match="unknown flavor"):
        flavor_code(bad)


def test_gpu_codec_is_not_loaded_by_import():
    code = "import sys, kvlab; print('numba.cuda' in sys.modules, 'kvlab.kernels.cuda.quantizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
