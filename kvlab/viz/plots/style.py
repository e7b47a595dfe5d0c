"""What every kvlab figure shares: one palette, the metric names and scales, the type order, the
heatmap orientation, and compact number formats for cell labels."""
import numpy as np

from kvlab.types import TYPES

# One palette for lines and bars (ColorBrewer Dark2), one for devices (the split-state figures).
PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
DEVICE_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
FLOAT_CELL = "#d9d9d9"     # f32/f16/bf16-only pairs: drawn apart from the quantized colour scale
# Meanings, not series: a split state's axis, and what happens to a pair (kvlab.split.compat.OUTCOMES order)
AXIS_COLORS = {"0": "#1f77b4", "1": "#2ca02c", "2": "#9467bd", "3": "#8c564b", "MIRRORED": "#7f7f7f",
               "PARTIAL": "#ff7f0e"}
FAILED_COLOR, NOT_REACHED_COLOR = "#d62728", "#dddddd"
OUTCOME_COLORS = {"runs": "#2ca02c", "runs (slow FA)": "#bcbd22", "no CUDA FA kernel": "#ff7f0e",
                  "split abort": "#d62728", "refused at init": "#7f7f7f"}

METRIC_LABELS = {
    "kl": "softmax KL (nats)", "out_rel_l2": "output relative L2", "out_cos": "output cosine similarity",
    "logit_rel_l2": "logit relative L2", "k_rel_l2": "K relative L2", "v_rel_l2": "V relative L2",
    "topk_overlap": "top-k overlap (fraction)", "hidden_rel_l2": "residual stream relative L2",
    "attn_rel_l2": "attention output relative L2",
}
SIMILARITY_METRICS = ("out_cos", "topk_overlap")   # 1 is exact: plotted on a linear scale, higher is better
TINY = 1e-12  # floor before log10: f32/f32 is exactly lossless
ERROR_FLOOR = 1e-6  # flavor ratios: below this (float32 rounding level) an error counts as zero

# The one heatmap orientation of kvlab: rows K types, columns V types, both from the most bits to the least,
# so f32/f32 sits top-left and the cheapest pair bottom-right, as a table reads.
ORIENTATION = "rows: K type, columns: V type; most bits top-left, cheapest pair bottom-right"
K_AXIS_TITLE = "K type (rows)"
V_AXIS_TITLE = "V type (columns)"


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def is_log_metric(metric: str) -> bool:
    return metric not in SIMILARITY_METRICS


def type_order(types) -> list:
    """Most bits first (f32, f16, bf16, q8_0, ...), ties by name."""
    return sorted(set(types), key=lambda t: (-TYPES[t].bits_per_weight, t))


def quantized_pair(type_k: str, type_v: str) -> bool:
    return TYPES[type_k].is_quantized or TYPES[type_v].is_quantized


def log10(x):
    return np.log10(np.maximum(np.asarray(x, dtype=float), TINY))


def short(x: float) -> str:
    """A cell label of at most 6 characters: 0.042, 3.1e-4, <1e-9 (float64 rounding of a lossless pair)."""
    if not np.isfinite(x):
        return ""
    if abs(x) < 1e-9:
        return "<1e-9"
    if 0.01 <= abs(x) < 100:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"
