"""gguf-py (llama.cpp's own numpy port, `gguf.quants`) as a second, independent check of kvlab's `ref` bytes.

gguf-py quantizes every type here but iq4_nl, and dequantizes all nine. Its numpy differs from the C
reference on a few kinds of block, each for a reason in the code, so those blocks are left out (EXCLUDED).
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import kvlab
from kvlab.types import TYPES

gguf = pytest.importorskip("gguf", reason="gguf-py is the independent numpy reference (pip install gguf)")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

GGUF_QUANTIZES = [t for t in TYPES if t != "iq4_nl"]      # gguf.quants has no IQ4_NL quantize


@dataclass(frozen=True)
class Exclusion:
    types: tuple
    applies: Callable          # (n_blocks, block_size) floats -> (n_blocks,) bool
    reason: str


EXCLUDED = (
    Exclusion(("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"), lambda b: np.isnan(b).any(axis=1),
              "a block with a NaN: C finds amax/min/max with < and > comparisons, which never pick a NaN; "
              "gguf-py's np.max/np.min/np.abs propagate it, so its d is NaN and every quant 0"),
    Exclusion(("q4_0", "q5_0"), lambda b: (b == 0).all(axis=1) & np.signbit(b).all(axis=1),
              "a block of -0.0: C keeps its initial max = +0.0 (no |v| is larger), d = +0/-8 = -0.0 (0x8000); "
              "gguf-py takes max = the element -0.0, d = -0/-8 = +0.0"),
    Exclusion(("q4_1", "q5_1"), lambda b: (b == np.inf).all(axis=1),
              "a block of only +Inf: C starts min at FLT_MAX and no value is below it, d = (inf-FLT_MAX)/n = "
              "inf; gguf-py's min is inf, d = inf-inf = NaN"),
)


def excluded_blocks(type_name, x):
    """(rows, n_blocks) bool: blocks where gguf-py differs from C by design."""
    info = TYPES[type_name]
    blocks = x.reshape(-1, info.block_size)                              # (n_blocks, block_size)
    mask = np.zeros(len(blocks), bool)
    for exclusion in EXCLUDED:
        if type_name in exclusion.types:
            mask |= exclusion.applies(blocks)
    return mask.reshape(x.shape[0], -1)                                  # (rows, n_blocks per row)


def first_difference(differs, what):
    row, block = np.unravel_index(int(np.argmax(differs)), differs.shape)
    return f"{int(differs.sum())} of {differs.size} blocks differ ({what}); first: row {row}, block {block}"


@pytest.mark.parametrize("type_name", GGUF_QUANTIZES)
def test_gguf_py_quantize_equals_kvlab_ref(type_name, case, golden_inputs):
    info, x = TYPES[type_name], golden_inputs[case]
    ours = np.asarray(kvlab.quantize(x, type_name, flavor="ref").raw)
    theirs = np.asarray(gguf_quantize(x, gguf.GGMLQuantizationType[type_name.upper()])).view(np.uint8)
    theirs = theirs.reshape(ours.shape)                                  # (rows, row_bytes)
    by_block = (x.shape[0], -1, info.type_size)                          # (rows, n_blocks, type_size)
    differs = (ours != theirs).reshape(by_block).any(axis=2) & ~excluded_blocks(type_name, x)
    assert not differs.any(), first_difference(differs, f"{type_name} kvlab ref vs gguf-py on {case!r}")


def test_gguf_py_dequantize_equals_kvlab(type_name, case, golden_inputs, golden):
    """Both decode ggml's own ref bytes to the same float32 bits (no exclusions needed)."""
    info, x = TYPES[type_name], golden_inputs[case]
    raw = golden(f"ggml_{type_name}.npz")[f"{case}.ref"]
    ours = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(raw, type_name, x.shape)))
    theirs = np.asarray(gguf_dequantize(raw, gguf.GGMLQuantizationType[type_name.upper()]), np.float32)
    by_block = (x.shape[0], -1, info.block_size)                         # (rows, n_blocks, block_size)
    differs = (ours.view(np.uint32) != theirs.reshape(ours.shape).view(np.uint32)).reshape(by_block).any(axis=2)
    assert not differs.any(), first_difference(differs, f"{type_name} to_float kvlab vs gguf-py on {case!r}")


def test_exclusions_are_needed(golden_inputs, golden):
    """Each exclusion covers blocks where gguf-py really differs from ggml's C bytes (else drop it)."""
    for exclusion in EXCLUDED:
        for type_name in exclusion.types:
            info = TYPES[type_name]
            f = golden(f"ggml_{type_name}.npz")
            found = False
            for case, x in golden_inputs.items():
                blocks = exclusion.applies(x.reshape(-1, info.block_size))     # (n_blocks,)
                theirs = np.asarray(gguf_quantize(x, gguf.GGMLQuantizationType[type_name.upper()]))
                diff = (theirs.view(np.uint8).reshape(-1, info.type_size) !=
                        f[f"{case}.ref"].reshape(-1, info.type_size)).any(axis=1)   # (n_blocks,)
                found |= bool((diff & blocks).any())
            assert found, f"{type_name}: no golden block shows '{exclusion.reason[:40]}...'"
