#!/usr/bin/env bash
# Build the ggml C library (CPU backend, shared, Release, -march=native) from the
# llama.cpp that a llama-cpp-python sdist vendors. The result is the ground truth
# kvlab's golden files are made from (tools/make_golden.py, kvlab/ggml.py).
#
#   tools/build_ggml.sh [ERA_VERSION]          # default 0.3.36 (post-#23792 llama.cpp)
#
# Environment:
#   KVLAB_VENDOR_DIR  where sdists are downloaded and unpacked   (default /work/vendor)
#   KVLAB_BUILD_DIR   build root; the build goes to <root>/ggml-<version> (default /work/vendor/build)
#   JOBS              parallel compile jobs                       (default 2)
# Prints the directory holding libggml-base.so and libggml-cpu.so on its last line
# (use it as KVLAB_GGML_LIB).
set -euo pipefail

VERSION="${1:-0.3.36}"
VENDOR_DIR="${KVLAB_VENDOR_DIR:-/work/vendor}"
BUILD_DIR="${KVLAB_BUILD_DIR:-/work/vendor/build}/ggml-${VERSION}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"

SRC_DIR="${VENDOR_DIR}/llama_cpp_python-${VERSION}"
SDIST="${VENDOR_DIR}/llama_cpp_python-${VERSION}.tar.gz"

mkdir -p "${VENDOR_DIR}"
if [[ ! -d "${SRC_DIR}/vendor/llama.cpp/ggml" ]]; then
    if [[ ! -f "${SDIST}" ]]; then
        "${PYTHON}" -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==${VERSION}" -d "${VENDOR_DIR}"
    fi
    tar -xzf "${SDIST}" -C "${VENDOR_DIR}"
fi

GGML_SRC="${SRC_DIR}/vendor/llama.cpp/ggml"
# ggml's CMakeLists configures ggml.pc from this template; the sdist omits it.
[[ -f "${GGML_SRC}/ggml.pc.in" ]] || : > "${GGML_SRC}/ggml.pc.in"

cmake -S "${GGML_SRC}" -B "${BUILD_DIR}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=ON \
    -DGGML_BUILD_TESTS=OFF \
    -DGGML_BUILD_EXAMPLES=OFF \
    -DGGML_OPENMP=OFF
cmake --build "${BUILD_DIR}" --config Release -j "${JOBS}" --target ggml-base ggml-cpu

LIB_DIR="$(dirname "$(find "${BUILD_DIR}" -name 'libggml-base.so' -print -quit)")"
echo "${LIB_DIR}"
