#!/usr/bin/env bash
# Ground truth for the `cuda` flavor, made ON THE GPU MACHINE with ggml-cuda's own block writers.
#
# Needs the ggml headers copied into .vendor_cuda/ (ignored by git, carried with the device call):
#   V=<llama.cpp of llama-cpp-python 0.3.36>; mkdir -p .vendor_cuda/ggml/{include,src/ggml-cuda/vendors}
#   cp $V/ggml/include/*.h .vendor_cuda/ggml/include/; cp $V/ggml/src/*.h .vendor_cuda/ggml/src/
#   cp $V/ggml/src/ggml-cuda/*.cuh .vendor_cuda/ggml/src/ggml-cuda/
#   cp $V/ggml/src/ggml-cuda/vendors/* .vendor_cuda/ggml/src/ggml-cuda/vendors/
# Then, on the device:  bash tools/make_cuda_golden.sh "$OUT"
# Writes to OUT: golden_raw.npz (harness bytes for tests/golden/inputs.npz, by type), large_{a,b,c}.npz
# (the 2^18-block check set of tools/cuda_golden/large_inputs.py), approx.npz (rcp.approx table),
# asm.tar.gz (PTX and SASS of the harness and the probe) and log.txt. Locally,
# tools/cuda_golden/split_golden.py turns golden_raw.npz into tests/golden/cuda_<type>.npz.
set -euo pipefail
OUT=${1:?usage: make_cuda_golden.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
G=$ROOT/.vendor_cuda/ggml
WORK=$(mktemp -d)
exec > >(tee "$OUT/log.txt") 2>&1

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvcc --version | tail -2
# ggml-cuda's CUDA_FLAGS (ggml/src/ggml-cuda/CMakeLists.txt) plus a Release build's -O3 -DNDEBUG.
FLAGS=(-use_fast_math -extended-lambda -arch=sm_90 -std=c++17 -O3 -DNDEBUG
       -I "$G/include" -I "$G/src" -I "$G/src/ggml-cuda")
time nvcc "${FLAGS[@]}" -o "$WORK/harness" "$HERE/cuda_golden/harness.cu"
nvcc "${FLAGS[@]}" -ptx -o "$WORK/harness.ptx" "$HERE/cuda_golden/harness.cu"
nvcc "${FLAGS[@]}" -cubin -o "$WORK/harness.cubin" "$HERE/cuda_golden/harness.cu"
cuobjdump -sass "$WORK/harness.cubin" > "$WORK/harness.sass"
nvcc -use_fast_math -arch=sm_90 -O3 -o "$WORK/approx_probe" "$HERE/cuda_golden/approx_probe.cu"
nvcc -use_fast_math -arch=sm_90 -O3 -cubin -o "$WORK/approx_probe.cubin" "$HERE/cuda_golden/approx_probe.cu"
cuobjdump -sass "$WORK/approx_probe.cubin" > "$WORK/approx_probe.sass"

cd "$ROOT"
python3 - "$WORK" <<'PY'
import sys, numpy as np
sys.path.insert(0, "tools"); sys.path.insert(0, "tools/cuda_golden")
from large_inputs import large_inputs
import hashlib
work = sys.argv[1]
cases = np.load("tests/golden/inputs.npz")
names = sorted(cases.files)
np.concatenate([cases[n].reshape(-1) for n in names]).astype(np.float32).tofile(f"{work}/golden.bin")
open(f"{work}/golden_cases.txt", "w").write("\n".join(names))
x = large_inputs()
x.tofile(f"{work}/large.bin")
print("large inputs sha256", hashlib.sha256(x.tobytes()).hexdigest())
PY
mkdir -p "$WORK/g" "$WORK/l" "$WORK/a"
"$WORK/harness" "$WORK/golden.bin" "$WORK/g"
"$WORK/harness" "$WORK/large.bin" "$WORK/l"
"$WORK/approx_probe" "$WORK/a"

python3 - "$WORK" "$OUT" <<'PY'
import sys, numpy as np
work, out = sys.argv[1:]
names = open(f"{work}/golden_cases.txt").read().split("\n")
types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
raw = {t: np.fromfile(f"{work}/g/{t}.bin", np.uint8) for t in types}
np.savez_compressed(f"{out}/golden_raw.npz", cases=np.array(names), **raw)
large = {t: np.fromfile(f"{work}/l/{t}.bin", np.uint8) for t in types[3:]}
small = {t: np.fromfile(f"{work}/l/{t}.bin", np.uint8)[: (1 << 15) * 32 * 2] for t in ("f16", "bf16")}
np.savez_compressed(f"{out}/large_a.npz", q8_0=large["q8_0"], q4_0=large["q4_0"])
np.savez_compressed(f"{out}/large_b.npz", q4_1=large["q4_1"], iq4_nl=large["iq4_nl"])
np.savez_compressed(f"{out}/large_c.npz", q5_0=large["q5_0"], q5_1=large["q5_1"], **small)
np.savez_compressed(f"{out}/approx.npz", rcp_delta=np.fromfile(f"{work}/a/rcp_delta.bin", np.int8))
print("saved", sorted(raw), "large", sorted(large))
PY
tar -C "$WORK" -czf "$OUT/asm.tar.gz" harness.ptx harness.sass approx_probe.sass
ls -la "$OUT"
