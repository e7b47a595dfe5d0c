"""Figures of the split model (kvlab.split): the attention graph coloured by split state, and which K/V
pairs run under --split-mode tensor (one grid per era; counts per era, head layout and device count)."""
from kvlab.split.compat import OUTCOMES
from kvlab.viz.plots.style import (AXIS_COLORS, FAILED_COLOR, K_AXIS_TITLE, NOT_REACHED_COLOR, OUTCOME_COLORS,
                                   V_AXIS_TITLE, type_order)


def graph_layout(order) -> dict:
    """id(tensor) -> (x, y) for drawing a graph left to right.

    x is an op's depth (a read of a cache counts as depending on the SET_ROWS that wrote it); an op
    continues the lane of one of its sources where it can; a leaf (weight, cache, input) sits just
    before its first consumer, below that consumer's lane.
    """
    ops = [t for t in order if t.op != "NONE"]
    pos, taken, leaves_of, writer = {}, set(), {}, {}
    for t in ops:
        deps = [pos[id(s)] for s in t.src if s is not None and id(s) in pos]
        deps += [writer[id(s)] for s in t.src if s is not None and id(s) in writer and t.op != "SET_ROWS"]
        x = 1 + max((d[0] for d in deps), default=0)
        lanes = [d[1] for d in deps]
        y = next((lane for lane in lanes if (x, lane) not in taken), None)
        if y is None:
            y = next(lane for lane in range(min(lanes, default=0), 10 ** 6) if (x, lane) not in taken)
        pos[id(t)] = (x, y)
        taken.add((x, y))
        if t.op == "SET_ROWS":
            writer.update((id(s), (x, y)) for s in t.src if s is not None and s.static)
    for t in order:
        if t.op != "NONE":
            continue
        consumer = next(c for c in ops if any(s is t for s in c.src))
        k = leaves_of[id(consumer)] = leaves_of.get(id(consumer), 0) + 1
        x, y = pos[id(consumer)]
        pos[id(t)] = (x - 0.5, y + 0.3 * k)
    return pos


def split_graph_figure(block, tr):
    """The attention block as a graph, left to right, each node coloured by its split state.

    The node where a rule fails is red (and larger); nodes the walk never reached are light grey.
    Hover a node for its op, shape (ggml ne order) and state.
    """
    import plotly.graph_objects as go
    order = block.graph.order
    pos = graph_layout(order)
    states = {id(n.tensor): n.state for n in tr.nodes}
    failed = tr.error.node if tr.error is not None else None
    edge_x, edge_y = [], []
    for t in order:
        for s in t.src:
            if s is not None and id(s) in pos:
                (x0, y0), (x1, y1) = pos[id(s)], pos[id(t)]
                edge_x += [x0, x1, None]
                edge_y += [y0, y1, None]
    fig = go.Figure(go.Scatter(x=edge_x, y=edge_y, mode="lines", line={"color": "#bbbbbb", "width": 1},
                               hoverinfo="skip", showlegend=False))
    groups = {}
    for t in order:
        if id(t) in states:
            key = states[id(t)].axis.label
            text = states[id(t)].describe()
        elif t.name == failed:
            key, text = "failed", f"ABORT: {tr.error.rule}"
        else:
            key, text = "not reached", "not reached"
        groups.setdefault(key, []).append((t, text))
    for key, members in groups.items():
        color = {"failed": FAILED_COLOR, "not reached": NOT_REACHED_COLOR}.get(key, AXIS_COLORS.get(key))
        name = f"axis {key}" if key.isdigit() else key
        fig.add_trace(go.Scatter(
            x=[pos[id(t)][0] for t, _ in members], y=[pos[id(t)][1] for t, _ in members],
            name=name, marker={"color": color, "size": 18 if key == "failed" else 11,
                               "line": {"color": "black", "width": 1}},
            text=["" if t.op == "NONE" else t.op.lower() for t, _ in members], textposition="top center",
            textfont={"size": 8}, mode="markers+text",
            hovertext=[f"{t.name}<br>{t.op} ne={list(t.ne)}<br>{text}" for t, text in members],
            hoverinfo="text"))
    from kvlab.split.tables import block_outcome
    status = block_outcome(block, tr) + ("" if tr.ok else f" at {failed!r}")
    cfg = block.config
    fig.update_layout(title={"text": f"{cfg.era}: K {cfg.type_k} / V {cfg.type_v} on {cfg.n_devices} devices: {status}",
                             "x": 0.01},   # left: clear of the modebar
                      xaxis={"visible": False}, yaxis={"visible": False, "autorange": "reversed"}, height=420, margin={"t": 50, "b": 10},
                      plot_bgcolor="white", legend={"title": "split state"})
    return fig


def compat_figure(frame):
    """One K x V grid per era, coloured by what happens to the pair (kvlab.split.compat OUTCOMES)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    eras = list(dict.fromkeys(frame["era"]))
    types = type_order(frame["type_k"])
    fig = make_subplots(1, len(eras), subplot_titles=eras, horizontal_spacing=0.05)
    n = len(OUTCOMES)
    colors = list(OUTCOME_COLORS.values())
    scale = [[edge, colors[i]] for i in range(n) for edge in (i / n, (i + 1) / n)]  # one flat band each
    for col, era in enumerate(eras, start=1):
        cells = frame[frame["era"] == era].set_index(["type_k", "type_v"])
        grid = [[OUTCOMES.index(cells.loc[(k, v), "outcome"]) for v in types] for k in types]
        hover = [[f"K {k} / V {v}: {cells.loc[(k, v), 'outcome']}<br>{cells.loc[(k, v), 'split'] or cells.loc[(k, v), 'cuda']}"
                  for v in types] for k in types]
        fig.add_trace(go.Heatmap(z=grid, x=types, y=types, zmin=-0.5, zmax=n - 0.5, colorscale=scale, xgap=1, ygap=1,
                                 hovertext=hover, hoverinfo="text", showscale=col == len(eras),
                                 colorbar={"tickvals": list(range(n)), "ticktext": list(OUTCOMES), "len": 0.8, "y": 0.42}),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col, showticklabels=col == 1,
                         title_text=K_AXIS_TITLE if col == 1 else None)
        fig.update_xaxes(title_text=V_AXIS_TITLE, row=1, col=col)
    fig.update_layout(title="K/V pairs under --split-mode tensor, per era (hover a cell for the rule or kernel)",
                      height=430, margin={"t": 80, "b": 40})
    return fig


def compat_counts_figure(frame):
    """Per era (panels) and head layout x device count (rows): how many of the pairs have each outcome."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    eras = list(dict.fromkeys(frame["era"]))
    frame = frame.assign(config=frame["layout"] + ", " + frame["devices"].astype(str) + " devices")
    configs = list(dict.fromkeys(frame["config"]))
    fig = make_subplots(1, len(eras), subplot_titles=eras, shared_yaxes=True, horizontal_spacing=0.03)
    for col, era in enumerate(eras, start=1):
        counts = frame[frame["era"] == era].groupby(["config", "outcome"]).size().unstack(fill_value=0)
        for name in OUTCOMES:
            values = [int(counts.loc[c, name]) if name in counts.columns else 0 for c in configs]
            fig.add_trace(go.Bar(y=configs, x=values, orientation="h", name=name, legendgroup=name,
                                 marker_color=OUTCOME_COLORS[name], showlegend=col == 1,
                                 text=[str(v) if v else "" for v in values], textposition="inside",
                                 hovertemplate=f"{era}, %{{y}}: %{{x}} pairs {name}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="K/V pairs", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    n_pairs = frame.groupby(["era", "config"]).size().max()
    fig.update_layout(barmode="stack", height=120 + 26 * len(configs), legend={"orientation": "h", "y": -0.15},
                      title=f"What happens to the {n_pairs} K/V pairs, per era, head layout and device count",
                      margin={"t": 70})
    return fig
