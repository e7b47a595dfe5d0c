"""Figures of notebooks 01 and 02: one block's values, the nine types' storage against error, and what
the Hadamard rotation does to K's outlier channels and to the round-trip error."""
import numpy as np

from kvlab.accuracy.metrics import tensor_rel_l2
from kvlab.rotation import rotate
from kvlab.viz.plots.style import color


def block_figure(values: np.ndarray, restored: np.ndarray, type_name: str):
    """One block: each input value and what the cache gives back."""
    import plotly.graph_objects as go
    j = np.arange(values.size)
    fig = go.Figure([
        go.Scatter(x=j, y=values, mode="markers", name="input", marker={"size": 9, "color": color(0)}),
        go.Scatter(x=j, y=restored, mode="markers", name=f"{type_name} → float",
                   marker={"symbol": "x", "size": 9, "color": color(1)}),
    ])
    err = tensor_rel_l2(restored, values.astype(np.float64))
    fig.update_layout(title=f"{type_name}: one block, relative L2 error {err:.3g}", xaxis_title="j",
                      yaxis_title="value", height=330, margin={"t": 40, "b": 40})
    return fig


def types_figure(table):
    """Bits per value against relative error, one point per type (log error axis)."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=table["bits_per_value"], y=table["rel_l2"].clip(lower=1e-9), text=table.index,
                               mode="markers+text", textposition="top center", marker={"size": 10, "color": color(0)}))
    fig.update_layout(title="Nine types: storage against round-trip error", xaxis_title="bits per value",
                      yaxis_title="relative L2 error, log scale (f32's 0 drawn at 1e-9)", yaxis_type="log",
                      height=380, margin={"t": 40, "b": 40})
    return fig


def channel_figure(x: np.ndarray, size: int):
    """Largest |value| per channel before and after the rotation: an outlier channel is spread out."""
    import plotly.graph_objects as go
    channels = np.arange(x.shape[-1])
    flat = x.reshape(-1, x.shape[-1])  # (tokens, head_dim)
    fig = go.Figure([
        go.Bar(x=channels, y=np.abs(flat).max(axis=0), name="K as computed", marker_color=color(0)),
        go.Bar(x=channels, y=np.abs(rotate(flat, size)).max(axis=0), name=f"K @ H{size} (what is stored)",
               marker_color=color(1)),
    ])
    fig.update_layout(barmode="overlay", title=f"max |K| per channel, before and after H{size}",
                      xaxis_title="channel", yaxis_title="max |value|", height=330, margin={"t": 40, "b": 40})
    fig.update_traces(opacity=0.7)
    return fig


def rotation_figure(table):
    """Error per type without and with each rotation size (grouped bars, log scale)."""
    import plotly.graph_objects as go
    fig = go.Figure([go.Bar(x=table.index, y=table[c], name=c, marker_color=color(i))
                     for i, c in enumerate(table.columns)])
    fig.update_layout(barmode="group", yaxis_type="log", title="Round-trip error per type and rotation",
                      yaxis_title="relative L2 error, log scale", height=330, margin={"t": 40, "b": 40},
                      legend={"title": "rotation"})
    return fig
