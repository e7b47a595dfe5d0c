"""A wheel built from the tree works with no repository beside it: every module and data file of kvlab/ and
kernels/ ships (kernels/ as kvlab.kernels), and, installed into a directory of its own and run from outside
the repository, kvlab imports and its CUDA kernels run under the Numba CUDA simulator with the CPU's bytes
(the simulator's rcp.approx reads the table shipped with the kernels, not a file of tools/)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "kvlab", "kernels")   # what the build reads
INSTALLED_RUN = r"""
import sys
import numpy as np
from numba import cuda
import kvlab, kvlab.kernels.cuda as kc
from kvlab.types import TYPES

site = sys.argv[1]
for module in (kvlab, kvlab.kernels, kc):
    assert module.__file__.startswith(site), f"{module.__name__} imported from {module.__file__}, not the wheel"
x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)       # (2, 64)
for name in ("q4_1", "iq4_nl", "f16"):
    info = TYPES[name]
    raw = cuda.to_device(np.zeros((2, info.row_bytes(64)), np.uint8))
    kc.quantize(cuda.to_device(x), raw, info, 2)                                # the cuda flavor: rcp.approx
    back = cuda.to_device(np.zeros((2, 64), np.float32))
    kc.dequantize(raw, back, info)
    cpu = kvlab.quantize(x, name, "cuda")
    assert raw.copy_to_host().tobytes() == cpu.raw.tobytes(), name
    assert back.copy_to_host().tobytes() == kvlab.dequantize(cpu).tobytes(), name
print("wheel ok")
"""


def _copy_sources(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """kvlab-*.whl built offline from a copy of the tree (the build writes nothing into the checkout)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _copy_sources(src)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return next(dist.glob("kvlab-*.whl"))


def test_wheel_holds_every_module_and_data_file(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for folder, in_wheel, kept in ((ROOT / "kvlab", "kvlab", lambda p: p.suffix == ".py" or p.parent.name == "data"),
                                   (ROOT / "kernels", "kvlab/kernels", lambda p: p.suffix in (".py", ".npz"))):
        want |= {f"{in_wheel}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*")
                 if p.is_file() and kept(p) and "__pycache__" not in p.parts}
    assert "kvlab/kernels/rcp_approx_sm90.npz" in want
    assert sorted(want - shipped) == []


def test_installed_wheel_runs_the_cuda_simulator_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", INSTALLED_RUN, str(site)], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "wheel ok"
