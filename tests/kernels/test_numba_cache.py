"""numba's disk cache of the kernels is keyed by every kernel source (kernels/numba_cache.py): an edit of a
helper file alone re-makes the kernels that inline it. Before, numba keyed a kernel by its own file and
loaded the old bf16 kernel after fp.py's rounding changed."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import kvlab.kernels

SCRIPT = """
import numpy as np
from kvlab.kernels.bf16 import quantize_row_bf16
out = np.zeros((1, 8), np.uint8)
quantize_row_bf16(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), out, 0)
print(out.view(np.uint16)[0].tolist())
"""
ROUNDING = "return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))"


def _bf16_of_1234(tree) -> list:
    """quantize_row_bf16 of [1, 2, 3, 4] in a fresh process that imports kvlab from `tree` (site off: the
    editable install's finder would import this checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}     # the cache beside the sources
    env["PYTHONPATH"] = f"{tree}{os.pathsep}{sysconfig.get_paths()['purelib']}"
    res = subprocess.run([sys.executable, "-S", "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tree)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_edit_of_an_inlined_helper_remakes_the_cached_kernel(tmp_path):
    src = kvlab.kernels.__path__[0]
    kvlab_src = sys.modules["kvlab"].__path__[0]
    shutil.copytree(kvlab_src, tmp_path / "kvlab", ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(src, tmp_path / "kvlab" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    assert _bf16_of_1234(tmp_path) == [0x3F80, 0x4000, 0x4040, 0x4080]
    assert list((tmp_path / "kvlab" / "kernels" / "__pycache__").glob("bf16.quantize_row_bf16-*.nbi"))  # cached
    fp = tmp_path / "kvlab" / "kernels" / "fp.py"
    text = fp.read_text()
    assert text.count(ROUNDING) == 1
    fp.write_text(text.replace(ROUNDING, "return np.uint16(7)"))      # bf16.py itself unchanged
    assert _bf16_of_1234(tmp_path) == [7, 7, 7, 7]
