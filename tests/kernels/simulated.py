"""Run a script under the Numba CUDA simulator and read back what it saved.

The simulator must be chosen before numba.cuda is first imported, so the GPU code runs in its own
process: `script OUT.npz [args...]` saves its outputs, and each test compares one of them."""
import os
import subprocess
import sys

import numpy as np


def simulated_outputs(script, out_dir, *args) -> dict:
    out = out_dir / "outputs.npz"
    res = subprocess.run([sys.executable, str(script), *map(str, args), str(out)],
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}
