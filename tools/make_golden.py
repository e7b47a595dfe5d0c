"""Write the golden files from the real ggml C library: tests/golden/ggml_<type>.npz + MANIFEST.json.

    tools/build_ggml.sh                           # prints the library directory
    KVLAB_GGML_LIB=<that dir> python tools/make_golden.py [--golden tests/golden]

Per type and per input case of tests/golden/inputs.npz (tools/golden_inputs.py), each (16, 256) float32:
  <case>.ref          uint8 (16, row_bytes): from_float_ref (quantize_row_<type>_ref, ggml-quants.c)
  <case>.cpu          uint8 (16, row_bytes): the CPU backend's from_float (what its set_rows writes)
  <case>.ref_defined  bool  (16, row_bytes): bytes that depend on the block's own input only (see below); likewise .cpu_defined
  <case>.deq          float32 (16, 256): to_float (dequantize_row_<type>) of the .ref bytes
Some C paths do not write every byte from the block's own input: iq4_nl's quantize_row_iq4_nl_ref packs
an all-zero block's qs from a stack array that only earlier blocks of the same call (or nothing) filled.
So each path runs three times: plain (output prefilled 0x00), and with every block preceded, in the
same call, by one of two context blocks (output prefilled 0xA5). A byte is defined where all
three runs agree; undefined bytes are stored as 0, so the files do not depend on stack garbage.
"""
import argparse
import datetime
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

from kvlab._io import atomic_path, write_text
from kvlab.ggml import lib as ggml
from kvlab.types import TYPES



CPU_FLAGS = ("sse4_2", "f16c", "fma", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "avx_vnni", "amx_bf16")


def golden_for_type(lib, inputs, type_name):
    arrays, undefined = {}, {}
    for case, x in inputs.items():
        for path in ("ref", "cpu"):
            raw, defined = lib.quantize_defined(x, type_name, path)
            arrays[f"{case}.{path}"] = np.where(defined, raw, 0).astype(np.uint8)  # no stack garbage
            arrays[f"{case}.{path}_defined"] = defined
            if not defined.all():
                undefined[f"{case}.{path}"] = int((~defined).sum())
        arrays[f"{case}.deq"] = lib.dequantize(arrays[f"{case}.ref"], type_name, x.shape[-1])
    return arrays, undefined


def cpu_flags():
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        words = set()
    return {flag: flag in words for flag in CPU_FLAGS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "golden")
    parser.add_argument("--lib", default=None, help="directory of libggml-base.so/libggml-cpu.so "
                                                     "(default: KVLAB_GGML_LIB)")
    parser.add_argument("--source", default="llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/ggml",
                        help="where the library was built from (recorded in MANIFEST.json)")
    args = parser.parse_args(argv)

    lib = ggml.load(args.lib)
    with np.load(args.golden / "inputs.npz") as f:
        inputs = {name: f[name] for name in f.files}
    files = {}
    for type_name in TYPES:
        arrays, undefined = golden_for_type(lib, inputs, type_name)
        path = args.golden / f"ggml_{type_name}.npz"
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)
        n_blocks = sum(x.size // TYPES[type_name].block_size for x in inputs.values())
        files[path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "cases": len(inputs), "blocks": n_blocks, "undefined_bytes": undefined}
        print(f"{path.name}: {len(inputs)} cases, {n_blocks} blocks, undefined bytes {undefined or 'none'}")
    manifest = {
        "source": args.source,
        "ggml_version": lib.version,
        "library": str(lib.lib_dir),
        "build": "tools/build_ggml.sh: Release, BUILD_SHARED_LIBS=ON, GGML_NATIVE=ON (-march=native)",
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
        "undefined_bytes": "run plain and after +1/-1 context blocks; bytes that differ are stored as 0",
        "inputs_sha256": hashlib.sha256((args.golden / "inputs.npz").read_bytes()).hexdigest(),
        "date": datetime.date.today().isoformat(),
        "files": files,
    }
    write_text(args.golden / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
