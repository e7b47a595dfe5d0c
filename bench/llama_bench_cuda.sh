#!/usr/bin/env bash
# llama.cpp's own decode speed on the GPU, for flash_decode.py's hf part to stand beside (issue 18):
# llama.cpp 0.3.36 (the llama-cpp-python sdist's tree) built with CUDA for one architecture, then llama-bench on a
# random-weight Llama-3.2-1B-shaped f16 GGUF (random_llama_gguf.py) at a 32768-token depth, per cache type.
#
#   bash bench/llama_bench_cuda.sh trim SDIST DEST   # here: the parts a llama-bench build reads (~26 MB of 76)
#   bash bench/llama_bench_cuda.sh run SRC [ARCH]    # on the device (carry DEST): JSON lines under $OUT
#
# run builds into $LLAMA_BUILD (default /tmp/llama-build); point it inside the working tree and a build cut short by
# the call's time limit goes on where it stopped in the next call.
#
# trim drops the other backends, the server and its web UI, docs, models and tests, so that the tree fits the
# device tool's 64 MiB carry. Checked on this repo's CPU machine (the trimmed tree configures and builds
# llama-bench, which runs -ctk/-ctv q4_0 at a depth); on the H200 (ARCH 90) build and runs took 237 s.
set -euo pipefail
case "${1:-}" in
trim)
  sdist=$2 dest=$3
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  tar -xzf "$sdist" -C "$tmp"
  S=$(echo "$tmp"/*/vendor/llama.cpp)
  rm -rf "$dest"; mkdir -p "$dest/tools" "$dest/ggml/src"
  cp -r "$S"/{CMakeLists.txt,LICENSE,cmake,src,include,common,vendor,gguf-py,licenses} "$dest/"
  for t in CMakeLists.txt batched-bench gguf-split imatrix llama-bench completion perplexity quantize tokenize tts \
           mtmd cvector-generator export-lora fit-params results; do cp -r "$S/tools/$t" "$dest/tools/"; done
  cp -r "$S"/ggml/{CMakeLists.txt,cmake,include} "$dest/ggml/"
  find "$S/ggml/src" -maxdepth 1 -type f -exec cp {} "$dest/ggml/src/" \;
  cp -r "$S"/ggml/src/{ggml-cpu,ggml-cuda} "$dest/ggml/src/"
  du -sh "$dest" ;;
run)
  S=$(cd "$2" && pwd) arch=${3:-90} out=${OUT:-llama-bench-out} B=${LLAMA_BUILD:-/tmp/llama-build}; mkdir -p "$out"
  here=$(cd "$(dirname "$0")" && pwd)
  cmake -S "$S" -B "$B" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF -DCMAKE_BUILD_TYPE=Release > "$out/cmake.log" 2>&1
  cmake --build "$B" -j "$(nproc)" --target llama-bench > "$out/build.log" 2>&1 &
  build=$!
  PYTHONPATH="$S/gguf-py" python3 "$here/random_llama_gguf.py" /tmp/random-1b.gguf
  wait $build
  for ct in q4_0 q8_0 f16; do        # -ctk/-ctv as llama.cpp spells them; -fa 1: a quantized V needs flash attention
    "$B"/bin/llama-bench -m /tmp/random-1b.gguf -ngl 99 -fa 1 -ctk $ct -ctv $ct -p 0 -n 32 -d 32768 -r 2 \
      -o jsonl >> "$out/llama_bench.jsonl"
  done ;;
*) sed -n 2,10p "$0"; exit 2 ;;
esac
