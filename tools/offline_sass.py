"""sm_90 SASS of a quantize kernel (kernels/cuda/kernels.py) on a machine with no GPU: count instructions
before spending device time on a variant.

numba -> PTX through libNVVM, ptxas with the tile kernels' register limit (TILE_JIT) -> cubin, cuobjdump -> SASS
(an opcode histogram and the static count; a kernel of a type holds its whole block code once, the
rotation's paths for every n beside it). The toolchain is pip's, outside the project's environment:

    pip install --target /tmp/cudatk "nvidia-cuda-nvrtc==13.*" "nvidia-nvvm==13.*" "nvidia-cuda-nvcc==13.*" \
        "nvidia-cuda-cuobjdump==13.*"
    pip install --no-deps --target /tmp/tritonpkg triton                 # for its nvdisasm
    CUDA_HOME=/tmp/cudatk/nvidia/cu13 LD_LIBRARY_PATH=/tmp/cudatk/nvidia/cu13/lib \
    PATH=/tmp/tritonpkg/triton/backends/nvidia/bin:$PATH PYTHONPATH=/tmp/cudatk \
        python tools/offline_sass.py iq4_nl ref [OUT.sass]

The numbers are ptxas's for these sources, not a timing: the device still decides (bench/gpu_quant.py).
"""
import collections
import os
import re
import subprocess
import sys
import tempfile
import types

import numba.cuda.dispatcher
from numba import cuda
from numba import types as nt

import kvlab
from kvlab.kernels.cuda import kernels
from kvlab.types import FLAVORS

# numba asks the current device for its compute capability when it compiles a device function
numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))


def quantize_signature():
    """The argument types quantize_kernel's kernels are launched with (kvlab.kernels.cuda._write_checked)."""
    f32, u8, i64, i32 = (nt.Array(t, 1, "C") for t in (nt.float32, nt.uint8, nt.int64, nt.int32))
    return (f32, u8, nt.int64, nt.int64, nt.boolean, nt.int64, nt.int64, nt.int64, nt.float32, nt.int64, i64,
            nt.int64, nt.int64, i32, i32)


def sass_of(py_func, signature, max_registers: int) -> tuple[str, str]:
    """(ptxas -v's report, cuobjdump's SASS) of a kernel compiled for sm_90."""
    ptx, _ = cuda.compile_ptx(py_func, signature, cc=(9, 0))
    tools = os.path.join(os.environ["CUDA_HOME"], "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90", "-O3", f"-maxrregcount={max_registers}",
                                 "-v", src, "-o", cubin], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    return report, sass


def opcodes(sass: str) -> collections.Counter:
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return ops


def main(type_name: str, flavor: str, out_path: str | None = None) -> None:
    kernel = kernels.quantize_kernel(kvlab.types.TYPES[type_name], FLAVORS.index(flavor))
    report, sass = sass_of(kernel.py_func, quantize_signature(), kernels.TILE_JIT["max_registers"])
    ops = opcodes(sass)
    print(" ".join(line.strip() for line in report.splitlines() if "Used" in line))
    print(f"quantize {type_name} {flavor}: {sum(ops.values())} SASS instructions;", dict(ops.most_common(24)))
    if out_path:
        with open(out_path + ".part", "w") as f:
            f.write(sass)
        os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
