"""Turn the GPU run's golden_raw.npz (tools/make_cuda_golden.sh) into tests/golden/cuda_<type>.npz.

Each file holds `<case>.cuda`: uint8 (16, row_bytes), the bytes ggml-cuda's set_rows wrote for the
case's (16, 256) float32 rows of tests/golden/inputs.npz.
    python tools/cuda_golden/split_golden.py /work/.device/N/golden_raw.npz tests/golden
"""
import sys
from pathlib import Path

import numpy as np

from kvlab._io import atomic_path
from kvlab.types import TYPES


def split(raw_path: str, out_dir: str) -> None:
    raw = np.load(raw_path)
    cases = [str(c) for c in raw["cases"]]
    inputs = np.load(Path(out_dir) / "inputs.npz")
    for name, info in TYPES.items():
        data = raw[name]
        per_case = []
        offset = 0
        for case in cases:
            rows, cols = inputs[case].shape
            n = rows * info.row_bytes(cols)
            per_case.append((case, data[offset:offset + n].reshape(rows, info.row_bytes(cols))))  # (16, row_bytes)
            offset += n
        if offset != data.size:
            raise ValueError(f"{name}: {data.size} bytes from the GPU, {offset} expected")
        with atomic_path(Path(out_dir) / f"cuda_{name}.npz") as tmp:
            np.savez_compressed(tmp, **{f"{c}.cuda": b for c, b in per_case})


if __name__ == "__main__":
    split(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tests/golden")
