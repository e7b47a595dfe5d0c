"""Fixtures shared by every test package.

Layout: tests/ mirrors the package. A module of kvlab/ (types, quant, rotation, _xp) is tested in
tests/test_<module>.py; a subpackage kvlab/<sub>/ in tests/<sub>/test_*.py (accuracy, split, tp, ggml, hf,
viz, cli), the kernels (kvlab.kernels, CPU and CUDA) in tests/kernels/. Every test folder has an
__init__.py, so two folders may hold files of the same name.

Golden data (tests/golden/, made by tools/: see test_golden.py): ``golden_inputs`` (the input cases)
and ``golden(name)`` (any .npz there, loaded once). A test taking the argument ``type_name``,
``flavor`` or ``case`` and not parametrizing it itself runs for every KV type, every flavor, every
golden input case (ggml's test-backend-ops style: the whole cross product, each its own test).
"""
import functools
from pathlib import Path

import numpy as np
import pytest

from kvlab.types import FLAVORS, TYPES

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


@functools.cache
def _npz(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing (made by tools/: make golden, or the nvcc harness of "
                    "tools/cuda_golden on the GPU machine for cuda_*.npz)", pytrace=False)
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


_CROSS_PRODUCT = {"type_name": tuple(TYPES), "flavor": FLAVORS, "case": tuple(_npz("inputs.npz"))}


def pytest_sessionstart(session):
    """numba's disk cache (cache=True) checks only a function's own source file, so a kernel that inlines a
    helper from another module (kernels/fp.py, scalar.py, ...) keeps its old machine code after that helper
    changes, and the tests would pass on code that is gone. In a checkout, the package's caches are dropped
    whenever one of them is older than its newest source (an install writes sources and caches anew)."""
    trees = [ROOT / "kernels", ROOT / "kvlab"]
    newest = max(p.stat().st_mtime for tree in trees for p in tree.rglob("*.py"))
    caches = [p for tree in trees for p in tree.rglob("__pycache__/*.nb[ic]")]
    if any(p.stat().st_mtime < newest for p in caches):
        for p in caches:
            p.unlink(missing_ok=True)


def pytest_generate_tests(metafunc):
    explicit = {name.strip() for mark in metafunc.definition.iter_markers("parametrize")
                for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])}
    for name, values in _CROSS_PRODUCT.items():
        if name in metafunc.fixturenames and name not in explicit:
            metafunc.parametrize(name, values)


@pytest.fixture(scope="session")
def golden_inputs() -> dict:
    """tests/golden/inputs.npz: case name -> (rows, 256) float32 (tools/golden_inputs.py)."""
    return _npz("inputs.npz")


@pytest.fixture(scope="session")
def golden():
    """golden("ggml_q4_0.npz") -> its arrays by name (loaded once per session)."""
    return _npz
