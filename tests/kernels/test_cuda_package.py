"""kvlab.kernels.cuda without a GPU and without the simulator: what importing and calling it does to the
process before any kernel runs."""
import os
import subprocess
import sys

import numpy as np
import pytest

NUMPY_WITHOUT_ROW_STACK = r"""
import numpy as np
del np.row_stack                        # as numpy 2.5, which dropped it (numba-cuda 0.30.4 still names it)
import kvlab.kernels.cuda               # the entry points: numba.cuda is not loaded yet
assert not hasattr(np, "row_stack")
import kvlab.kernels.cuda.kernels       # loads numba-cuda's array overloads, as the first compile would
import numba.cuda.np.arrayobj
assert not hasattr(np, "row_stack"), "numpy changed for everyone"
print("numpy unchanged")
"""


def test_loading_the_kernels_leaves_numpy_unchanged():
    """numba-cuda 0.30.4 needs np.row_stack while it loads its array overloads; the alias exists for that
    moment only (without it the import fails on numpy 2.5; left set, every numpy user would see it)."""
    res = subprocess.run([sys.executable, "-c", NUMPY_WITHOUT_ROW_STACK], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "numpy unchanged"


def test_entry_points_take_a_type_info_not_a_name():
    """The kernels sit below the type table: a caller passes kvlab.TYPES[name], and a name is refused
    before anything loads numba.cuda."""
    import kvlab.kernels.cuda as kc
    with pytest.raises(TypeError, match=r"expected a kvlab.types.TypeInfo \(kvlab.TYPES\[name\]\), got str"):
        kc.quantize(np.zeros((1, 32), np.float32), np.zeros((1, 18), np.uint8), "q4_0", 0)


@pytest.mark.parametrize("setting", ["0", "-2", "four", ""])
def test_a_bad_tiles_per_block_setting_is_refused_when_the_kernels_load(setting):
    """KVLAB_CUDA_TILES_PER_BLOCK (a measuring knob) must be a positive integer: anything else stops the
    import with the variable named, not a division by zero at the first quantize."""
    env = {**os.environ, "KVLAB_CUDA_TILES_PER_BLOCK": setting}
    env.pop("NUMBA_ENABLE_CUDASIM", None)               # the simulator fixes the setting at 2
    res = subprocess.run([sys.executable, "-c", "import kvlab.kernels.cuda.kernels"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode != 0
    assert f"KVLAB_CUDA_TILES_PER_BLOCK={setting!r}: expected a positive integer" in res.stderr
