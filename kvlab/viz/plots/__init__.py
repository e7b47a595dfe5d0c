"""kvlab.viz.plots: every plotly figure of the report and the notebooks, one module per subject.

style (palette, metric names and scales, heatmap orientation), sweep (the error tables), formats
(blocks and rotation, notebooks 01-02), split (graph and compatibility), flow (the split of each
tensor, era by era: the signature figure), tp (decode speed). All builders are re-exported here.
"""
from kvlab.viz.plots.style import (DEVICE_COLORS, ERROR_FLOOR, METRIC_LABELS, ORIENTATION, PALETTE,
                                   SIMILARITY_METRICS, TINY, color, is_log_metric, type_order)
from kvlab.viz.plots.sweep import (bits_vs_error, context_growth, depth_growth, error_grid_figure,
                                   flavor_disagreement, k_type_figure, pareto_front, rotation_heatmaps,
                                   sources_figure, varies_with_v)
from kvlab.viz.plots.formats import block_figure, channel_figure, rotation_figure, types_figure
from kvlab.viz.plots.split import compat_counts_figure, compat_figure, graph_layout, split_graph_figure
from kvlab.viz.plots.flow import first_divergence, split_flow_figure
from kvlab.viz.plots.tp import decode_figure, measured_figure
