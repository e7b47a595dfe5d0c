"""Plotly figures of a sweep table (kvlab.accuracy.sweep), shared by `kvlab report` and the notebooks.

Every builder takes the tidy table and returns a plotly Figure; errors spanning decades are shown
as log10. Types are ordered by bits per value, so cheaper caches sit to the left / bottom.
"""
import numpy as np

from kvlab.types import TYPES

METRIC_LABELS = {
    "kl": "softmax KL (nats)", "out_rel_l2": "output relative L2", "out_cos": "output cosine",
    "logit_rel_l2": "logit relative L2", "k_rel_l2": "K relative L2", "v_rel_l2": "V relative L2",
    "topk_overlap": "top-k overlap", "hidden_rel_l2": "residual stream relative L2",
    "attn_rel_l2": "attention output relative L2",
}
TINY = 1e-12  # floor before log10: f32/f32 is exactly lossless
ERROR_FLOOR = 1e-6  # flavor ratios: below this (float32 rounding level) an error counts as zero


def type_order(types) -> list:
    return sorted(set(types), key=lambda t: (-TYPES[t].bits_per_weight, t))


def _log10(x):
    return np.log10(np.maximum(np.asarray(x, dtype=float), TINY))


def _grid(table, metric: str, **where):
    """(K types, V types, values[K, V]) of one slice of the table."""
    sel = table
    for column, value in where.items():
        sel = sel[sel[column] == value]
    grid = sel.pivot_table(index="type_k", columns="type_v", values=metric, aggfunc="mean")
    ks, vs = type_order(grid.index), type_order(grid.columns)
    return ks, vs, grid.loc[ks, vs].to_numpy()


def _kv_panel(fig, col, z, ks, vs, colorscale, zmin, zmax, bar_x, sign=""):
    """One K type x V type heatmap with its values written in the cells, in column col of fig's row 1;
    sign="+" writes differences with their sign."""
    import plotly.graph_objects as go
    fig.add_trace(go.Heatmap(z=z, x=vs, y=ks, colorscale=colorscale, zmin=zmin, zmax=zmax,
                             text=np.vectorize(lambda x: f"{x:{sign}.2f}")(z), texttemplate="%{text}",
                             colorbar=dict(x=bar_x, len=0.9, thickness=12),
                             hovertemplate=f"K %{{y}} / V %{{x}}: %{{z:{sign}.3f}}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="V type", row=1, col=col)
    fig.update_yaxes(title_text="K type", row=1, col=col)


def rotation_heatmaps(table, metric: str = "kl", flavor: str = "ref", n_ctx=None):
    """K type x V type: log10(metric) without rotation, with it, and log10(with / without)."""
    from plotly.subplots import make_subplots
    n_ctx = n_ctx or int(table.n_ctx.max())
    panels = []
    for rotation in (False, True):
        panels.append(_grid(table, metric, flavor=flavor, n_ctx=n_ctx, rotation=rotation))
    ks, vs, off = panels[0]
    on = panels[1][2]
    gain = _log10(on) - _log10(off)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09, subplot_titles=(
        "rotation off", "rotation on (llama.cpp default)", "log10(on / off): < 0 means rotation helps"))
    lo, hi = float(np.min(_log10([off, on]))), float(np.max(_log10([off, on])))
    for col, (z, scale, zmin, zmax, bar_x) in enumerate((
            (_log10(off), "Viridis", lo, hi, 0.27), (_log10(on), "Viridis", lo, hi, 0.63),
            (gain, "RdBu_r", -max(abs(gain).max(), 1e-3), max(abs(gain).max(), 1e-3), 1.0)), start=1):
        _kv_panel(fig, col, z, ks, vs, scale, zmin, zmax, bar_x)
    fig.update_layout(height=430, title=f"log10 {METRIC_LABELS[metric]} per K/V pair "
                                        f"({flavor}, context {n_ctx})")
    return fig


def context_growth(table, pairs, metric: str = "kl", flavor: str = "ref"):
    """metric vs context length for some pairs, rotation on (solid) and off (dashed)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for i, (type_k, type_v) in enumerate(pairs):
        for rotation in (True, False):
            sel = table[(table.type_k == type_k) & (table.type_v == type_v) & (table.flavor == flavor)
                        & (table.rotation == rotation)].sort_values("n_ctx")
            fig.add_trace(go.Scatter(
                x=sel.n_ctx, y=np.maximum(sel[metric], TINY), mode="lines+markers",
                name=f"{type_k}/{type_v} rot {'on' if rotation else 'off'}", legendgroup=f"{type_k}/{type_v}",
                line=dict(dash="solid" if rotation else "dash", color=_color(i))))
    fig.update_xaxes(type="log", title="context length (tokens)")
    fig.update_yaxes(type="log", title=METRIC_LABELS[metric])
    fig.update_layout(height=450, title=f"{METRIC_LABELS[metric]} vs context length ({flavor}; K/V pair)")
    return fig


def depth_growth(depth_table, pairs, flavor: str = "ref"):
    """Error vs the number of layers it passed through (kvlab.accuracy.depth), rotation on (solid) / off (dashed).

    Left: the residual stream's relative error after each layer. Right: how much worse each layer's
    attention is than it would be on exact input (attn_rel_l2 / attn_local_rel_l2; 1 = no compounding).
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "residual stream relative L2 after each layer", "compounding: attention error / its error on exact input"))
    for i, (type_k, type_v) in enumerate(pairs):
        for rotation in (True, False):
            sel = depth_table[(depth_table.type_k == type_k) & (depth_table.type_v == type_v)
                              & (depth_table.flavor == flavor) & (depth_table.rotation == rotation)].sort_values("depth")
            if not len(sel):
                continue
            style = dict(mode="lines+markers", legendgroup=f"{type_k}/{type_v}",
                         line=dict(dash="solid" if rotation else "dash", color=_color(i)))
            name = f"{type_k}/{type_v} rot {'on' if rotation else 'off'}"
            fig.add_trace(go.Scatter(x=sel.depth, y=np.maximum(sel.hidden_rel_l2, TINY), name=name, **style), row=1, col=1)
            compounding = sel.attn_rel_l2 / np.maximum(sel.attn_local_rel_l2, TINY)
            fig.add_trace(go.Scatter(x=sel.depth, y=compounding, name=name, showlegend=False, **style), row=1, col=2)
    fig.update_xaxes(title_text="layers passed through (depth)", dtick=1)
    fig.update_yaxes(type="log", title_text=METRIC_LABELS["hidden_rel_l2"], row=1, col=1)
    fig.update_yaxes(title_text="attn_rel_l2 / attn_local_rel_l2", row=1, col=2)
    fig.update_layout(height=450, title=f"error vs depth in a stack of {int(depth_table.n_layers.iloc[0])} layers "
                                        f"({flavor} cache bytes, exact attention on the dequantized cache)")
    return fig


def pareto_front(points):
    """Indices of the (bits, error) points that no other point beats on both (lower is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], np.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def bits_vs_error(table, metric: str = "kl", flavor: str = "ref", n_ctx=None, rotation: bool = True):
    """Every pair at its bits per value, with the Pareto frontier of bits vs error."""
    import plotly.graph_objects as go
    n_ctx = n_ctx or int(table.n_ctx.max())
    sel = table[(table.flavor == flavor) & (table.n_ctx == n_ctx) & (table.rotation == rotation)]
    sel = sel.groupby(["type_k", "type_v"], as_index=False).agg(bits=("bits_per_value", "first"),
                                                                err=(metric, "mean"))
    err = np.maximum(sel.err.to_numpy(), TINY)
    labels = (sel.type_k + "/" + sel.type_v).to_numpy()
    front = pareto_front(list(zip(sel.bits.to_numpy(), err)))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=sel.bits, y=err, mode="markers", name="K/V pair", text=labels,
                             marker=dict(size=8, color="#8da0cb"),
                             hovertemplate="%{text}: %{x:.3g} bits, %{y:.3g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=sel.bits.to_numpy()[front], y=err[front], mode="lines+markers+text",
                             name="Pareto frontier", text=labels[front], textposition="top right",
                             marker=dict(size=10, color="#d95f02"), line=dict(color="#d95f02")))
    fig.update_yaxes(type="log", title=METRIC_LABELS[metric])
    fig.update_xaxes(title="bits per cached value (mean of K and V)")
    fig.update_layout(height=480, title=f"{METRIC_LABELS[metric]} vs bits per value "
                                        f"({flavor}, rotation {'on' if rotation else 'off'}, context {n_ctx})")
    return fig, labels[front].tolist()


def flavor_disagreement(table, metric: str = "out_rel_l2", n_ctx=None, rotation: bool = True):
    """K x V: log10(metric of cpu / ref) and log10(cuda / ref): what each backend path costs."""
    from plotly.subplots import make_subplots
    n_ctx = n_ctx or int(table.n_ctx.max())
    flavors = [f for f in ("cpu", "cuda") if f in set(table.flavor)]
    ks, vs, ref = _grid(table, metric, flavor="ref", n_ctx=n_ctx, rotation=rotation)
    fig = make_subplots(rows=1, cols=max(len(flavors), 1), horizontal_spacing=0.12,
                        subplot_titles=[f"log10({f} / ref), errors floored at 1e-6" for f in flavors] or ["only ref in this table"])
    floor = lambda x: np.log10(np.maximum(x, ERROR_FLOOR))
    ratios = [floor(_grid(table, metric, flavor=f, n_ctx=n_ctx, rotation=rotation)[2]) - floor(ref) for f in flavors]
    span = max([float(np.abs(r).max()) for r in ratios] + [1e-3])
    for col, r in enumerate(ratios, start=1):
        _kv_panel(fig, col, r, ks, vs, "RdBu_r", -span, span, 0.45 if col == 1 else 1.0, sign="+")
    fig.update_layout(height=430, title=f"where the backends disagree: {METRIC_LABELS[metric]} relative to "
                                        f"exact attention on the same cache (context {n_ctx})")
    return fig


def _color(i: int) -> str:
    palette = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
    return palette[i % len(palette)]
