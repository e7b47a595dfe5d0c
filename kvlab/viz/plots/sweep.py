"""Plotly figures of a sweep table (kvlab.accuracy.sweep), shared by `kvlab report` and the notebooks.

Every builder takes the tidy table and returns a plotly Figure. Errors spanning decades are drawn on
log10 scales that say so (axis, colourbar, hover); similarity metrics (cosine, top-k overlap) on linear
ones. Heatmaps follow style.ORIENTATION, and their colour scales are fitted to the pairs with a quantized
side: the f32/f16/bf16-only pairs, orders of magnitude below, are drawn as grey cells of their own.
"""
import numpy as np

from kvlab.accuracy.table import select
from kvlab.types import TYPES
from kvlab.viz.plots.style import (FLOAT_CELL, K_AXIS_TITLE, METRIC_LABELS, TINY, ERROR_FLOOR, V_AXIS_TITLE,
                                   color, is_log_metric, log10, quantized_pair, short, type_order)

ANY_V = "any V type"
LOSSLESS = 1e-10   # below this an error is float64 rounding of a lossless pair (accuracy.table.sig prints 0)


def _grid(table, metric: str, **where):
    """(K types, V types, values[K, V]) of one slice of the table, most bits first."""
    grid = select(table, **where).pivot_table(index="type_k", columns="type_v", values=metric, aggfunc="mean")
    ks, vs = type_order(grid.index), type_order(grid.columns)
    return ks, vs, grid.loc[ks, vs].to_numpy()


def varies_with_v(values) -> bool:
    """False when every row of a K x V grid is one value (KL: V never enters the logits)."""
    values = np.asarray(values, dtype=float)
    return bool(np.any(np.abs(values - values[:, :1]) > 1e-9 * np.maximum(np.abs(values[:, :1]), TINY)))


def _float_mask(ks, vs):
    """True where neither side is quantized; on a collapsed V axis K alone decides."""
    return np.array([[not TYPES[k].is_quantized if v == ANY_V else not quantized_pair(k, v) for v in vs] for k in ks])


def _heatmap(fig, col, z, text, hover, ks, vs, colorscale, zmin, zmax, colorbar):
    """One K x V heatmap in column col of row 1; NaN cells are left for _float_cells."""
    import plotly.graph_objects as go
    fig.add_trace(go.Heatmap(z=z, x=vs, y=ks, colorscale=colorscale, zmin=zmin, zmax=zmax, text=text,
                             texttemplate="%{text}", textfont={"size": 10}, customdata=hover,
                             hovertemplate="K %{y} / V %{x}<br>%{customdata}<extra></extra>",
                             showscale=colorbar is not None, colorbar=colorbar, hoverongaps=False),
                  row=1, col=col)
    fig.update_xaxes(title_text=V_AXIS_TITLE, row=1, col=col, side="bottom")
    fig.update_yaxes(title_text=K_AXIS_TITLE if col == 1 else None, autorange="reversed", row=1, col=col)


def _float_cells(fig, col, ks, vs, mask, text, hover):
    """The float-only pairs in grey, with their values written in: outside the colour scale."""
    import plotly.graph_objects as go
    if not mask.any():
        return
    z = np.where(mask, 0.0, np.nan)
    fig.add_trace(go.Heatmap(z=z, x=vs, y=ks, colorscale=[[0, FLOAT_CELL], [1, FLOAT_CELL]], showscale=False,
                             text=np.where(mask, text, ""), texttemplate="%{text}", textfont={"size": 10},
                             customdata=hover, hoverongaps=False,
                             hovertemplate="K %{y} / V %{x} (no quantized side)<br>%{customdata}<extra></extra>"),
                  row=1, col=col)


def _colorbar(fig, col, title: str) -> dict:
    """A colourbar just right of panel col, below the panel titles."""
    domain = fig.layout[f"xaxis{'' if col == 1 else col}"].domain
    return dict(title={"text": title, "side": "right"}, x=domain[1] + 0.008, xanchor="left", len=0.78, y=0.42,
                yanchor="middle", thickness=12)


def _collapse_v(ks, vs, values):
    """A grid whose rows do not vary with V shrinks to one column ("any V type")."""
    return (vs, values) if varies_with_v(values) else ([ANY_V], values[:, :1])


def rotation_heatmaps(table, metric: str = "out_rel_l2", flavor: str = "ref", n_ctx=None):
    """K type x V type: the metric without rotation, with it, and the ratio on / off (log10 colours)."""
    from plotly.subplots import make_subplots
    n_ctx = n_ctx or int(table.n_ctx.max())
    ks, vs, off = _grid(table, metric, flavor=flavor, n_ctx=n_ctx, rotation=False)
    on = _grid(table, metric, flavor=flavor, n_ctx=n_ctx, rotation=True)[2]
    vs_shown, off = _collapse_v(ks, vs, off)
    on = on[:, :off.shape[1]]
    label = METRIC_LABELS[metric]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09, subplot_titles=(
        "rotation off", "rotation on (llama.cpp's default)", "on / off: below 1 (blue) the rotation helps"))
    mask = _float_mask(ks, vs_shown)
    scaled = log10(np.concatenate([off[~mask], on[~mask]])) if (~mask).any() else np.array([0.0])
    lo, hi = float(scaled.min()), float(scaled.max())
    for col, values in ((1, off), (2, on)):
        text = np.vectorize(short)(values)
        hover = np.vectorize(lambda x: f"{label} = {x:.3g} (log10 {np.log10(max(x, TINY)):.2f})")(values)
        bar = _colorbar(fig, 2, f"log10 {label}") if col == 2 else None
        _heatmap(fig, col, np.where(mask, np.nan, log10(values)), text, hover, ks, vs_shown, "Viridis", lo, hi, bar)
        _float_cells(fig, col, ks, vs_shown, mask, text, hover)
    ratio = np.maximum(on, TINY) / np.maximum(off, TINY)
    gain = np.log10(ratio)
    span = max(float(np.abs(gain[~mask]).max()) if (~mask).any() else 0.0, 1e-3)
    text = np.vectorize(lambda r: f"{r:.2f}×")(ratio)
    hover = np.vectorize(lambda r: f"on / off = {r:.3g} (log10 {np.log10(r):+.2f})")(ratio)
    _heatmap(fig, 3, np.where(mask, np.nan, gain), text, hover, ks, vs_shown, "RdBu_r", -span, span,
             _colorbar(fig, 3, "log10(on / off)"))
    _float_cells(fig, 3, ks, vs_shown, mask, np.where(mask, "no rot.", text), hover)
    fig.update_layout(height=520, margin={"t": 90, "r": 40}, title=(
        f"{label} per K/V pair ({flavor}, context {n_ctx}); grey: no quantized side, outside the colour scale"))
    return fig


def k_type_figure(table, metric: str = "kl", flavor: str = "ref", n_ctx=None):
    """The metric per K type, rotation off and on: the view for a metric V does not change (KL)."""
    import plotly.graph_objects as go
    n_ctx = n_ctx or int(table.n_ctx.max())
    fig = go.Figure()
    label = METRIC_LABELS[metric]
    for i, rotation in enumerate(sorted(set(table.rotation))):
        sel = select(table, flavor=flavor, n_ctx=n_ctx, rotation=rotation).groupby("type_k")[metric].mean()
        ks = [k for k in type_order(sel.index) if sel[k] > LOSSLESS]   # f32 K: lossless, no place on a log axis
        fig.add_trace(go.Bar(x=ks, y=sel[ks], name=f"rotation {'on' if rotation else 'off'}", marker_color=color(i),
                             text=[short(sel[k]) for k in ks], textposition="outside",
                             hovertemplate=f"K %{{x}}: {label} = %{{y:.3g}}<extra>rotation {'on' if rotation else 'off'}</extra>"))
    fig.update_yaxes(type="log", title=f"{label}, log scale")
    fig.update_xaxes(title="K type (any V type: V does not enter the logits); f32 K is lossless (below 1e-10)")
    fig.update_layout(barmode="group", height=420, title=f"{label} per K type ({flavor}, context {n_ctx})")
    return fig


def context_growth(table, pairs, metric: str = "kl", flavor: str = "ref"):
    """metric vs context length for some pairs, rotation on (solid) and off (dashed)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    label = METRIC_LABELS[metric]
    for i, (type_k, type_v) in enumerate(pairs):
        for rotation in (True, False):
            sel = select(table, type_k=type_k, type_v=type_v, flavor=flavor, rotation=rotation).sort_values("n_ctx")
            fig.add_trace(go.Scatter(
                x=sel.n_ctx, y=np.maximum(sel[metric], TINY), mode="lines+markers",
                name=f"{type_k}/{type_v} rot {'on' if rotation else 'off'}", legendgroup=f"{type_k}/{type_v}",
                line=dict(dash="solid" if rotation else "dash", color=color(i)),
                hovertemplate=f"{type_k}/{type_v}: %{{y:.3g}} at %{{x}} tokens<extra></extra>"))
    fig.update_xaxes(type="log", title="context length (tokens, log scale)")
    fig.update_yaxes(type="log" if is_log_metric(metric) else "linear",
                     title=f"{label}{', log scale' if is_log_metric(metric) else ''}")
    fig.update_layout(height=450, title=f"{label} vs context length ({flavor}; K/V pair, rotation on solid / off dashed)")
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
            sel = select(depth_table, type_k=type_k, type_v=type_v, flavor=flavor, rotation=rotation).sort_values("depth")
            if not len(sel):
                continue
            style = dict(mode="lines+markers", legendgroup=f"{type_k}/{type_v}",
                         line=dict(dash="solid" if rotation else "dash", color=color(i)))
            name = f"{type_k}/{type_v} rot {'on' if rotation else 'off'}"
            fig.add_trace(go.Scatter(x=sel.depth, y=np.maximum(sel.hidden_rel_l2, TINY), name=name, **style), row=1, col=1)
            compounding = sel.attn_rel_l2 / np.maximum(sel.attn_local_rel_l2, TINY)
            fig.add_trace(go.Scatter(x=sel.depth, y=compounding, name=name, showlegend=False, **style), row=1, col=2)
    fig.update_xaxes(title_text="layers passed through (depth)", dtick=1)
    fig.update_yaxes(type="log", title_text=f"{METRIC_LABELS['hidden_rel_l2']}, log scale", row=1, col=1)
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


def bits_vs_error(table, metric: str = "out_rel_l2", flavor: str = "ref", n_ctx=None, rotation: bool = True):
    """Every pair at its bits per value; the Pareto frontier labelled, the other pairs named on hover.

    Exactly lossless pairs (error 0: f32/f32) have no place on a log axis and are listed in the legend;
    the y range follows the pairs with a quantized side, so the float floor does not stretch it.
    """
    import plotly.graph_objects as go
    n_ctx = n_ctx or int(table.n_ctx.max())
    sel = select(table, flavor=flavor, n_ctx=n_ctx, rotation=rotation)
    sel = sel.groupby(["type_k", "type_v"], as_index=False).agg(bits=("bits_per_value", "first"), err=(metric, "mean"))
    labels = (sel.type_k + "/" + sel.type_v).to_numpy()
    bits, err = sel.bits.to_numpy(), sel.err.to_numpy()
    exact = err <= LOSSLESS
    front = [i for i in pareto_front(list(zip(bits, np.where(exact, TINY, err)))) if not exact[i]]
    label = METRIC_LABELS[metric]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=bits[~exact], y=err[~exact], mode="markers", name="K/V pair (hover for its name)",
                             text=labels[~exact], marker=dict(size=8, color="#8da0cb"),
                             hovertemplate="%{text}: %{x:.3g} bits, " + label + " %{y:.3g}<extra></extra>"))
    numbers = [str(j + 1) for j in range(len(front))]   # names beside the plot: labels at 0.25-bit spacing overlap
    fig.add_trace(go.Scatter(x=bits[front], y=err[front], mode="lines+markers+text", name="Pareto frontier",
                             text=numbers, textposition=["top right" if j % 2 else "bottom left" for j in range(len(front))],
                             textfont={"size": 12, "color": color(1)}, customdata=labels[front],
                             marker=dict(size=10, color=color(1)), line=dict(color=color(1)),
                             hovertemplate="%{customdata}: %{x:.3g} bits, " + label + " %{y:.3g}<extra></extra>"))
    listing = "<br>".join(f"{n}  {labels[i]}  ({bits[i]:g} bits, {err[i]:.2g})" for n, i in zip(numbers, front))
    fig.add_annotation(x=1.02, y=0.0, xref="paper", yref="paper", xanchor="left", yanchor="bottom", align="left",
                       showarrow=False, font={"size": 11}, text="<b>Pareto frontier</b><br>" + listing)
    if exact.any():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=8, color="white"),
                                 name="exactly 0 (not drawn): " + ", ".join(labels[exact])))
    quantized = np.array([quantized_pair(k, v) for k, v in zip(sel.type_k, sel.type_v)])
    shown = err[quantized & ~exact] if (quantized & ~exact).any() else err[~exact]
    fig.update_yaxes(type="log", title=f"{label}, log scale",
                     range=[np.log10(shown.min()) - 0.3, np.log10(err.max()) + 0.3])
    fig.update_xaxes(title="bits per cached value (mean of K and V)")
    fig.update_layout(height=560, margin={"r": 260}, legend={"x": 1.02, "y": 1, "xanchor": "left"},
                      title=f"{label} vs bits per value ({flavor}, rotation {'on' if rotation else 'off'}, "
                            f"context {n_ctx}); pairs below the range have no quantized side")
    return fig, labels[front].tolist()


def flavor_disagreement(table, metric: str = "out_rel_l2", n_ctx=None, rotation: bool = True):
    """K x V: the metric of cpu / ref and cuda / ref (log10 colours): what each backend path costs."""
    from plotly.subplots import make_subplots
    n_ctx = n_ctx or int(table.n_ctx.max())
    flavors = [f for f in ("cpu", "cuda") if f in set(table.flavor)]
    ks, vs, ref = _grid(table, metric, flavor="ref", n_ctx=n_ctx, rotation=rotation)
    fig = make_subplots(rows=1, cols=max(len(flavors), 1), horizontal_spacing=0.16,
                        subplot_titles=[f"{f} / ref (errors below 1e-6 count as 1e-6)" for f in flavors]
                        or ["only ref in this table"])
    floor = lambda x: np.maximum(x, ERROR_FLOOR)
    ratios = [floor(_grid(table, metric, flavor=f, n_ctx=n_ctx, rotation=rotation)[2]) / floor(ref) for f in flavors]
    mask = _float_mask(ks, vs)
    span = max([float(np.abs(np.log10(r[~mask])).max()) for r in ratios if (~mask).any()] + [1e-3])
    for col, (f, r) in enumerate(zip(flavors, ratios), start=1):
        text = np.vectorize(lambda x: f"{x:.2f}×")(r)
        hover = np.vectorize(lambda x: f"{f} / ref = {x:.3g} (log10 {np.log10(x):+.2f})")(r)
        _heatmap(fig, col, np.where(mask, np.nan, np.log10(r)), text, hover, ks, vs, "RdBu_r", -span, span,
                 _colorbar(fig, col, f"log10({f} / ref)"))
        _float_cells(fig, col, ks, vs, mask, text, hover)
    fig.update_layout(height=520, margin={"t": 90, "r": 40},
                      title=f"where the backends disagree: {METRIC_LABELS[metric]} relative to ref (context {n_ctx}); "
                            "grey: no quantized side, outside the colour scale")
    return fig


def error_grid_figure(table, metric: str = "kl", flavor: str = "ref", n_ctx=None, rotation: bool = True):
    """One K x V heatmap of any metric: log10 colours for errors, linear ones for similarities."""
    from plotly.subplots import make_subplots
    n_ctx = n_ctx or int(table.n_ctx.max())
    ks, vs, values = _grid(table, metric, flavor=flavor, n_ctx=n_ctx, rotation=rotation)
    vs, values = _collapse_v(ks, vs, values)
    mask = _float_mask(ks, vs)
    label = METRIC_LABELS[metric]
    fig = make_subplots(rows=1, cols=1)
    if is_log_metric(metric):
        z, title = log10(values), f"log10 {label}"
        text = np.vectorize(short)(values)
        hover = np.vectorize(lambda x: f"{label} = {x:.3g} (log10 {np.log10(max(x, TINY)):.2f})")(values)
    else:
        z, title = values, label
        text = np.vectorize(lambda x: f"{x:.4f}" if metric == "out_cos" else f"{x:.2f}")(values)
        hover = np.vectorize(lambda x: f"{label} = {x:.6f}")(values)
    fitted = z[~mask] if (~mask).any() else z.ravel()
    _heatmap(fig, 1, np.where(mask, np.nan, z), text, hover, ks, vs,
             "Viridis" if is_log_metric(metric) else "Viridis_r", float(fitted.min()), float(fitted.max()),
             _colorbar(fig, 1, title))
    _float_cells(fig, 1, ks, vs, mask, text, hover)
    if len(vs) == 1:
        fig.update_xaxes(title_text="V type: any (V does not change it)")
    fig.update_layout(title=f"{label}: {flavor}, context {n_ctx}, rotation {'on' if rotation else 'off'}", height=480,
                      width=None if len(vs) > 1 else 640, margin={"t": 60})
    return fig


def sources_figure(tables: dict, metric: str = "kl"):
    """Same-type pairs (K = V) on several data sources (names: the model or generator): grouped bars."""
    import plotly.graph_objects as go
    fig = go.Figure()
    label = METRIC_LABELS[metric]
    for i, (name, t) in enumerate(tables.items()):
        n_ctx = int(t.n_ctx.max())
        sel = select(t[t.type_k == t.type_v], flavor="ref", n_ctx=n_ctx, rotation=True)
        sel = sel.set_index("type_k").loc[[x for x in type_order(sel.type_k)]]
        if is_log_metric(metric):
            sel = sel[sel[metric] > LOSSLESS]   # f32/f32 is lossless: no place on a log axis
        fig.add_trace(go.Bar(x=sel.index, y=sel[metric], name=f"{name} (context {n_ctx})", marker_color=color(i)))
    fig.update_layout(barmode="group", yaxis_type="log" if is_log_metric(metric) else "linear",
                      yaxis_title=f"{label}{', log scale' if is_log_metric(metric) else ''}", height=400,
                      title=f"{label} with K = V type, per data source (f32/f32: lossless, not drawn)", margin={"t": 50},
                      legend={"title": "data source"})
    return fig
