#!/usr/bin/env bash
# Builds ggml-cuda's flash-attention vector kernel (tools/cuda_golden/fattn_harness.cu) for sm_90, one
# shared library per default GGML_CUDA_FA_QUANTS pair (q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16), in
# parallel: OUTDIR/libfattn_<k>_<v>.so. bench/fa_cuda_ggml.py runs it and loads the libraries.
#
#   bash tools/cuda_golden/fattn_build.sh OUTDIR [LLAMA_CPP_DIR]
#
# Headers: .vendor_cuda/ggml (ignored by git, carried with the device call). With LLAMA_CPP_DIR (the
# vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist) they are copied there first, as
# tools/make_cuda_golden.sh describes.
set -euo pipefail
OUT=${1:?usage: fattn_build.sh OUTDIR [LLAMA_CPP_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
G=$ROOT/.vendor_cuda/ggml
if [ $# -ge 2 ]; then
    V=$2
    mkdir -p "$G/include" "$G/src/ggml-cuda/vendors"
    cp "$V"/ggml/include/*.h "$G/include/"; cp "$V"/ggml/src/*.h "$G/src/"
    cp "$V"/ggml/src/ggml-cuda/*.cuh "$G/src/ggml-cuda/"; cp "$V"/ggml/src/ggml-cuda/vendors/* "$G/src/ggml-cuda/vendors/"
fi
[ -f "$G/src/ggml-cuda/fattn-vec.cuh" ] || { echo "fattn_build.sh: no ggml headers in $G (pass LLAMA_CPP_DIR)" >&2; exit 1; }
mkdir -p "$OUT"

# ggml-cuda's CUDA_FLAGS (ggml/src/ggml-cuda/CMakeLists.txt) plus a Release build's -O3 -DNDEBUG.
FLAGS=(-use_fast_math -extended-lambda -arch=sm_90 -std=c++17 -O3 -DNDEBUG -Xcompiler -fPIC -shared
       -I "$G/include" -I "$G/src" -I "$G/src/ggml-cuda")
# common.cuh includes cublas_v2.h for the backend's host code; no kernel here uses it. A toolkit without
# the cuBLAS headers gets declarations of the four calls common.cuh names, never called.
if ! echo '#include <cublas_v2.h>' | nvcc -x cu -E - -o /dev/null 2>/dev/null; then
    STUB=$OUT/stub_include
    mkdir -p "$STUB"
    cat > "$STUB/cublas_v2.h" <<'EOF'
#pragma once
typedef int cublasStatus_t;
typedef void * cublasHandle_t;
#define CUBLAS_STATUS_SUCCESS 0
#define CUBLAS_TF32_TENSOR_OP_MATH 0
static inline const char * cublasGetStatusString(int) { return ""; }
static inline int cublasCreate(cublasHandle_t *) { return 0; }
static inline int cublasSetMathMode(cublasHandle_t, int) { return 0; }
static inline int cublasSetStream(cublasHandle_t, void *) { return 0; }
EOF
    FLAGS+=(-I "$STUB")
    echo "fattn_build.sh: no cublas_v2.h in this toolkit, using declarations only ($STUB)"
fi

pids=()
for pair in f16:F16 bf16:BF16 q4_0:Q4_0 q8_0:Q8_0; do
    name=${pair%%:*}; enum=GGML_TYPE_${pair##*:}
    nvcc "${FLAGS[@]}" -DFA_TYPE_K="$enum" -DFA_TYPE_V="$enum" \
        -o "$OUT/libfattn_${name}_${name}.so" "$HERE/fattn_harness.cu" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
