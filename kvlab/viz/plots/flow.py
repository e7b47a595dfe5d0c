"""kvlab's signature figure: where each era's meta backend keeps or loses the head split, node by node.

For one attention-block config, every tensor of the graph is drawn as its four `ne` boxes (ggml order),
the split dimension cut into one piece per device and repetition (coloured by device, counts written
in), in the three eras side by side. A slider walks the graph in ggml's order; it opens at the first node
where the eras disagree (the rotation's reshape: the flatten era calls two contiguous slices what is an
interleaving of heads and tokens, PR #23225's 4D reshape keeps the heads on an axis of their own, PR
#23792's `nr` records the interleaving). Everything is plotly shapes and a slider: it works in a static
HTML file and in a stored notebook, without a kernel.
"""
from kvlab.split.eras import ERAS
from kvlab.split.tables import trace_block
from kvlab.viz.plots.style import DEVICE_COLORS

ROW_H, BOX_H, BOX_W, GAP, X0 = 10.0, 3.2, 16.5, 2.5, 20.0
MAX_PIECES = 64           # more pieces than this are drawn as a band with the pattern written out
DIVERGED = "#e6550d"      # frame of an era whose state differs from the others at this node
ABORT, UNREACHED, WHOLE = "#d62728", "#f2f2f2", "#d9d9d9"
ERA_NOTES = {"flatten": "2D flatten, rules without nr", "pr23225": "4D rotation + mirrored mul_mat rule",
             "pr23792": "2D flatten, segments repeat nr times"}


def _steps(order):
    """The nodes a reader steps through: every op, and the weights and caches (inputs are mirrored)."""
    return [t for t in order if t.op != "NONE" or t.static]


def _cell(era, tr, name):
    """(kind, state or error) of one node in one era's trace: "state", "abort" or "unreached"."""
    for n in tr.nodes:
        if n.tensor.name == name:
            return "state", n.state
    if tr.error is not None and tr.error.node == name:
        return "abort", tr.error
    return "unreached", None


def _key(cell) -> str:
    kind, value = cell
    return value.describe() if kind == "state" else kind


def first_divergence(cells_per_step) -> int | None:
    """Index of the first step at which the eras' states (or abort / not reached) are not all the same."""
    for i, cells in enumerate(cells_per_step):
        if len({_key(c) for c in cells}) > 1:
            return i
    return None


def _pieces(state, ne_axis: int):
    """(device, count) along the split dimension in memory order: per segment, nr repetitions of the
    devices' slices (ggml-backend.h's layout)."""
    out = []
    for seg, nr in zip(state.ne, state.nr):
        out += [(j, n) for _ in range(nr) for j, n in enumerate(seg) if n]
    return out if sum(n for _, n in out) == ne_axis else [(None, ne_axis)]


def _row(y, tensor, cell, n_devices, diverged):
    """Shapes and annotations of one era's drawing of one tensor at height y."""
    kind, value = cell
    shapes, notes = [], []
    split_dim = value.axis if kind == "state" and value.axis.is_dim else None
    for d in range(4):
        x = X0 + d * (BOX_W + GAP)
        ne = int(tensor.ne[d])
        notes.append(dict(x=x + BOX_W / 2, y=y + BOX_H + 0.9, text=f"ne{d} = {ne}", showarrow=False, font={"size": 11},
                          yanchor="bottom"))
        outline = dict(type="rect", x0=x, x1=x + BOX_W, y0=y, y1=y + BOX_H, line={"color": "#444", "width": 1})
        if d == split_dim:
            pieces = _pieces(value, ne)
            if len(pieces) <= MAX_PIECES:
                left = x
                for j, n in pieces:
                    w = BOX_W * n / ne
                    shapes.append(dict(type="rect", x0=left, x1=left + w, y0=y, y1=y + BOX_H, line={"width": 0.5, "color": "white"},
                                       fillcolor=DEVICE_COLORS[j % len(DEVICE_COLORS)] if j is not None else WHOLE))
                    if len(pieces) <= 16:
                        notes.append(dict(x=left + w / 2, y=y + BOX_H / 2, text=str(n), showarrow=False,
                                          font={"size": 10, "color": "white"}))
                    left += w
            else:
                shapes.append(dict(type="rect", x0=x, x1=x + BOX_W, y0=y, y1=y + BOX_H, line={"width": 0},
                                   fillcolor=DEVICE_COLORS[0], opacity=0.6))
            shapes.append({**outline, "line": {"color": "#111", "width": 2}})
        else:
            fill = {"state": WHOLE, "abort": "#fbe0e0", "unreached": UNREACHED}[kind]
            shapes.append({**outline, "fillcolor": fill, "line": {"color": "#999" if kind == "unreached" else "#444",
                                                                  "width": 1, "dash": "dot" if kind == "unreached" else "solid"}})
    if diverged:
        shapes.append(dict(type="rect", x0=X0 - 1.2, x1=X0 + 4 * BOX_W + 3 * GAP + 1.2, y0=y - 3.6, y1=y + BOX_H + 2.5,
                           line={"color": DIVERGED, "width": 3}))
    notes.append(dict(x=X0, y=y - 0.6, xanchor="left", yanchor="top", showarrow=False, align="left",
                      font={"size": 11, "color": ABORT if kind == "abort" else "#222"}, text=_state_text(tensor, cell, n_devices)))
    return shapes, notes


def _state_text(tensor, cell, n_devices) -> str:
    kind, value = cell
    if kind == "abort":
        return f"<b>ABORT</b> {value.rule}<br>in {value.c_function}"
    if kind == "unreached":
        return "not reached: the graph aborted at an earlier node"
    if value.axis.is_dim:
        counts = ", ".join(f"dev {j}: {n}" for j, n in enumerate(value.per_device))
        return f"<b>{value.describe()}</b><br>along ne{int(value.axis)} = {tensor.ne[value.axis]}: {counts}"
    if value.axis.name == "MIRRORED":
        return f"<b>MIRRORED</b>: each of the {n_devices} devices holds all of it"
    return f"<b>PARTIAL</b>: each device holds a partial sum (all-reduce follows)"


def split_flow_figure(eras=tuple(ERAS), start=None, **config):
    """The figure for BlockConfig fields (guard removed: what each era's graph does). start: the step the
    slider opens at (default: the first divergence)."""
    import plotly.graph_objects as go
    config = {"guard": False, **config}
    traced = {era: trace_block(era=era, **config) for era in eras}
    block = traced[eras[0]][0]
    steps = _steps(block.graph.order)
    n_devices = block.config.n_devices
    cells = [[_cell(era, traced[era][1], t.name) for era in eras] for t in steps]
    first = first_divergence(cells)
    height_units = ROW_H * len(eras) + 4
    frames = []
    for i, t in enumerate(steps):
        keys = [_key(c) for c in cells[i]]
        shapes, notes = [], []
        for r, era in enumerate(eras):
            y = height_units - ROW_H * (r + 1)
            tensor = next(x for x in traced[era][0].graph.order if x.name == t.name)   # the era's own ne
            differs = len(set(keys)) > 1 and keys.count(keys[r]) == 1   # the odd one out
            s, a = _row(y, tensor, cells[i][r], n_devices, differs)
            shapes += s
            notes += a
            notes.append(dict(x=0, y=y + BOX_H / 2, xanchor="left", showarrow=False, align="left",
                              text=f"<b>{era}</b><br><span style='font-size:10px'>{ERA_NOTES.get(era, '')}</span>"))
        mark = "   <b style='color:%s'>first divergence of the eras</b>" % DIVERGED if i == first else ""
        notes.append(dict(x=0, y=height_units + 0.5, xanchor="left", yanchor="bottom", showarrow=False,
                          font={"size": 14}, text=f"node {i + 1}/{len(steps)}: {t.op} <b>{t.name}</b>{mark}"))
        frames.append((shapes, notes))
    active = first if start is None and first is not None else (start or 0)
    legend = [go.Scatter(x=[None], y=[None], mode="markers", marker={"size": 12, "color": DEVICE_COLORS[j], "symbol": "square"},
                         name=f"device {j}") for j in range(min(n_devices, len(DEVICE_COLORS)))]
    legend.append(go.Scatter(x=[None], y=[None], mode="markers", name="not split (whole on each device)",
                             marker={"size": 12, "color": WHOLE, "symbol": "square"}))
    fig = go.Figure(legend)
    cfg = block.config
    fig.update_layout(
        shapes=frames[active][0], annotations=frames[active][1], height=170 + 110 * len(eras),
        title=f"Split of each tensor, {n_devices} devices, K {cfg.type_k} / V {cfg.type_v}, head_dim {cfg.head_dim}, "
              f"{cfg.n_head} q / {cfg.n_head_kv} kv heads, batch {cfg.n_tokens}<br><sup>orange frame: the era that "
              f"differs; drag the slider to walk the graph node by node</sup>",
        xaxis={"visible": False, "range": [0, X0 + 4 * BOX_W + 3 * GAP + 2], "fixedrange": True},
        yaxis={"visible": False, "range": [-1, height_units + 3], "fixedrange": True},
        plot_bgcolor="white", margin={"t": 80, "b": 10, "l": 10, "r": 10},
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 0.99, "yanchor": "top"},
        sliders=[{"active": active, "currentvalue": {"visible": False}, "pad": {"t": 5},
                  "font": {"size": 9}, "len": 1.0,
                  "steps": [{"label": f"{i + 1}{'*' if i == first else ''}", "method": "relayout",
                             "args": [{"shapes": s, "annotations": a}]} for i, (s, a) in enumerate(frames)]}])
    fig.layout.meta = {"steps": [t.name for t in steps], "first_divergence": first}
    return fig
