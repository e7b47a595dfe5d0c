#!/usr/bin/env bash
# Golden H_n from llama.cpp's own ggml_gen_hadamard: the static function is cut out of
# src/llama-kv-cache.cpp (0.3.36 sdist) and compiled into a tiny C++ program.
set -euo pipefail
SDIST=${1:-/work/vendor/llama_cpp_python-0.3.36}
OUT=${2:-tests/golden}
LLAMA=$SDIST/vendor/llama.cpp
work=$(mktemp -d)
{
  echo '#include "ggml.h"'
  echo '#include <cassert>'
  echo '#include <cmath>'
  echo '#include <cstdio>'
  echo '#include <cstdlib>'
  echo "#include <vector>"
  echo "static bool ggml_is_power_of_2(int n) { return (n & (n - 1)) == 0; }"
  # only reached for non-f32 tensors, never here
  echo "size_t ggml_quantize_chunk(enum ggml_type, const float *, void *, int64_t, int64_t, int64_t, const float *) { abort(); }"
  sed -n '/^static void ggml_gen_hadamard(ggml_tensor \* tensor) {/,/^}/p' "$LLAMA/src/llama-kv-cache.cpp"
  cat <<'CPP'
int main() {
    for (int n = 64; n <= 512; n *= 2) {
        std::vector<float> data(n * n);
        ggml_tensor t = {};
        t.type = GGML_TYPE_F32; t.ne[0] = n; t.ne[1] = n; t.ne[2] = 1; t.ne[3] = 1;
        t.data = data.data();
        ggml_gen_hadamard(&t);
        char path[4096];
        snprintf(path, sizeof path, "%s/hadamard_%d.f32", getenv("OUT"), n);
        FILE * f = fopen(path, "wb");
        fwrite(data.data(), sizeof(float), n * n, f);
        fclose(f);
    }
}
CPP
} > "$work/gen.cpp"
grep -q "data\[0\*n + 0\]" "$work/gen.cpp" || { echo "ggml_gen_hadamard not found in $LLAMA" >&2; exit 1; }
g++ -O0 -std=c++17 -I"$LLAMA/ggml/include" "$work/gen.cpp" -o "$work/gen"
mkdir -p "$OUT"
OUT=$work "$work/gen"
python3 - "$work" "$OUT" <<'PY'
import sys, numpy as np
work, out = sys.argv[1:]
np.savez_compressed(f"{out}/hadamard.npz", **{str(n): np.fromfile(f"{work}/hadamard_{n}.f32", np.float32).reshape(n, n)
                                            for n in (64, 128, 256, 512)})
PY
rm -rf "$work"
echo "wrote $OUT/hadamard.npz"
