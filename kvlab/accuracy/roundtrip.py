"""One tensor through a cache type and back, as llama.cpp stores it (rotated first where it rotates):
the error of each type, with and without the Hadamard rotation, and which rotation llama.cpp picks.
Tables for notebooks 01 and 02; pandas is imported where a table is made."""
import numpy as np

from kvlab.accuracy.metrics import tensor_rel_l2
from kvlab.quant import dequantize, quantize
from kvlab.rotation import rotate, rotation_plan
from kvlab.types import TYPES

QUANTIZED = tuple(name for name, info in TYPES.items() if info.is_quantized)


def types_table(x: np.ndarray, flavor: str = "ref"):
    """All nine types on the same values x (..., n): bits per value and the error of the round trip."""
    import pandas as pd
    rows = []
    for name, info in TYPES.items():
        restored = dequantize(quantize(x, name, flavor))
        rows.append({"type": name, "bits_per_value": info.bits_per_weight, "bytes_per_block": info.type_size,
                     "values_per_block": info.block_size, "rel_l2": tensor_rel_l2(restored, x.astype(np.float64)),
                     "max_abs_err": float(np.max(np.abs(restored.astype(np.float64) - x)))})
    return pd.DataFrame(rows).set_index("type")


def rotated_round_trip(x: np.ndarray, type_name: str, size: int | None, flavor: str = "ref") -> np.ndarray:
    """Quantize x as llama.cpp stores it (rotated by H_size first, None = not rotated), back in x's space."""
    stored = x if size is None else rotate(x, size)
    restored = dequantize(quantize(stored, type_name, flavor))
    return restored if size is None else rotate(restored, size)  # H @ H = I


def rotation_error_table(x: np.ndarray, sizes=(None, 64, 128), types=QUANTIZED, flavor: str = "ref"):
    """Relative L2 error of x after the round trip, per type (rows) and rotation size (columns)."""
    import pandas as pd
    return pd.DataFrame({("none" if s is None else f"H{s}"): [tensor_rel_l2(rotated_round_trip(x, t, s, flavor),
                                                                            x.astype(np.float64)) for t in types]
                         for s in sizes}, index=pd.Index(types, name="type"))


def rotation_gate_table(head_dims=(64, 80, 96, 128, 192, 256), pairs=(("q4_0", "q4_0"), ("f16", "q8_0"))):
    """llama.cpp's rotation sizes (K, V) per head_dim for some K/V type pairs ("-" = not rotated)."""
    import pandas as pd
    rows = {}
    for hd in head_dims:
        plans = {f"{tk}/{tv}": rotation_plan(tk, tv, hd, disable=False) for tk, tv in pairs}
        rows[hd] = {name: f"K:{plan.k or '-'} V:{plan.v or '-'}" for name, plan in plans.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("head_dim")
