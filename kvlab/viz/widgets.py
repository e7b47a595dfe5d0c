"""Widgets and notebook-only figures for the five notebooks (ipywidgets + plotly).

Each `*_explorer` returns an ipywidgets box: controls above an Output that redraws on every change.
The first drawing happens when the box is built, so a notebook executed without a browser (nbval,
nbconvert) still runs every line of it. Figures are shown through plotly's mimetype renderer, which
JupyterLab's bundled plotly extension draws offline. Tables are pandas DataFrames; the figure
builders (`*_figure`) return plotly figures for use outside widgets too.
"""
import json

import numpy as np

from kvlab import TYPES, dequantize, quantize, rotate, rotation_plan
from kvlab.viz.blocks_view import decode_block
from kvlab.tp.decode_model import DecodeModel, ModelShape, decode_tokens_per_s, kv_bytes_per_device
from kvlab.accuracy.metrics import tensor_rel_l2

QUANTIZED = tuple(name for name, info in TYPES.items() if info.is_quantized)


def show(fig) -> None:
    """Display a plotly figure as its JSON mimetype (drawn offline by JupyterLab's plotly extension).

    The template is left out: plotly.js then draws its plain default look, and each stored figure is
    about 8 KB smaller (notebooks keep their outputs in git).
    """
    from IPython.display import display
    spec = json.loads(fig.to_json())
    spec["layout"].pop("template", None)
    display({"application/vnd.plotly.v1+json": spec, "text/plain": f"<plotly figure: {_title(fig)}>"}, raw=True)


def _title(fig) -> str:
    return fig.layout.title.text or "untitled"


def _explorer(controls: dict, render, title: str = ""):
    """Controls in a row above an Output; render(**values) displays into it, now and on each change."""
    import ipywidgets as widgets
    out = widgets.interactive_output(render, controls)
    rows = [widgets.HTML(f"<b>{title}</b>")] if title else []
    return widgets.VBox(rows + [widgets.HBox(list(controls.values())), out], layout={"width": "100%"})


def _dropdown(options, value, description: str):
    import ipywidgets as widgets
    return widgets.Dropdown(options=options, value=value, description=description,
                            style={"description_width": "initial"}, layout={"width": "auto"})


def _slider(value, lo, hi, step, description: str, integer: bool = False):
    import ipywidgets as widgets
    cls = widgets.IntSlider if integer else widgets.FloatSlider
    return cls(value=value, min=lo, max=hi, step=step, description=description, continuous_update=False,
               style={"description_width": "initial"})


# ---------------------------------------------------------------- 01: block formats

def example_block(seed: int = 0, outlier: float = 4.0) -> np.ndarray:
    """32 float32 values like one block of a K row: normals (3 decimals) and one outlier at index 5."""
    x = np.random.default_rng(seed).standard_normal(32).astype(np.float32)
    x[5] = np.float32(outlier)
    return np.round(x, 3)


def parse_values(text: str, n: int = 32) -> np.ndarray:
    """n float32 values from comma- or space-separated text (for the editable block)."""
    try:
        values = np.array([float(t) for t in text.replace(",", " ").split()], dtype=np.float32)
    except ValueError:
        raise ValueError(f"expected {n} numbers separated by commas or spaces, got {text!r}") from None
    if values.size != n:
        raise ValueError(f"expected {n} numbers, got {values.size}")
    return values


def quantize_block(values: np.ndarray, type_name: str, flavor: str = "ref"):
    """(decoded views, dequantized values) of one 32-value block: one view per ggml block (32 for floats)."""
    q = quantize(values.reshape(1, -1), type_name, flavor)  # (1, 32) -> (1, row_bytes)
    info = TYPES[type_name]
    raw = np.asarray(q.raw).reshape(-1, info.type_size)    # (n_blocks, type_size)
    return [decode_block(r, type_name) for r in raw], dequantize(q).reshape(-1)


def block_fields_html(views) -> str:
    """An HTML table of a block's struct members (quantized types) or of each value's bits (floats)."""
    if TYPES[views[0].type].is_quantized:
        view = views[0]
        rows = [(f.name, f"{f.offset}..{f.offset + f.size - 1}", view.raw[f.offset:f.offset + f.size].hex(" "),
                 _field_text(f), f.meaning) for f in view.fields]
        rows.append(("q", "", "", " ".join(str(int(v)) for v in view.q), "index per value (j = 0..31)"))
        head = ("member", "bytes", "hex", "decoded", "meaning")
    else:
        rows = [(j, v.raw.hex(" "), *(f.value for f in v.fields), f"{float(v.values[0]):.6g}")
                for j, v in enumerate(views[:8])]
        head = ("j", "hex", "sign", "exponent", "mantissa", "value")
    cells = "".join("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in row) + "</tr>"
                    for row in rows)
    header = "".join(f"<th style='text-align:left'>{h}</th>" for h in head)
    return f"<table class='kvlab-fields'><tr>{header}</tr>{cells}</table>"


def _field_text(field) -> str:
    if field.name == "qh":
        return f"0x{field.value:08x}; bits j = 0..31: {format(field.value, '032b')[::-1]}"
    if isinstance(field.value, np.ndarray):
        return " ".join(f"{int(v):02x}" for v in field.value)
    return f"{field.value:.6g}" if isinstance(field.value, float) else str(field.value)


def block_figure(values: np.ndarray, restored: np.ndarray, type_name: str):
    import plotly.graph_objects as go
    j = np.arange(values.size)
    fig = go.Figure([
        go.Scatter(x=j, y=values, mode="markers", name="input", marker={"size": 9}),
        go.Scatter(x=j, y=restored, mode="markers", name=f"{type_name} → float",
                   marker={"symbol": "x", "size": 9}),
    ])
    err = tensor_rel_l2(restored, values.astype(np.float64))
    fig.update_layout(title=f"{type_name}: one block, relative L2 error {err:.3g}", xaxis_title="j",
                      yaxis_title="value", height=330, margin={"t": 40, "b": 40})
    return fig


def block_explorer(values=None, type_name: str = "q4_0", flavor: str = "ref"):
    """Pick a type and a flavor, edit the 32 values: the block's bytes and fields, and what comes back."""
    import ipywidgets as widgets
    from IPython.display import HTML, display
    from kvlab import FLAVORS
    values = example_block() if values is None else np.asarray(values, np.float32)
    text = widgets.Textarea(value=", ".join(f"{v:g}" for v in values), description="block",
                            layout={"width": "60%", "height": "4em"})

    def render(type_name, flavor, text):
        try:
            x = parse_values(text)
        except ValueError as e:
            display(HTML(f"<pre>{e}</pre>"))
            return
        views, restored = quantize_block(x, type_name, flavor)
        display(HTML(block_fields_html(views)))
        show(block_figure(x, restored, type_name))

    controls = {"type_name": _dropdown(list(TYPES), type_name, "type"),
                "flavor": _dropdown(list(FLAVORS), flavor, "flavor"), "text": text}
    return _explorer(controls, render, "One block: bytes, fields, and the values they give back")


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


def types_figure(table):
    """Bits per value against relative error, one point per type (log error axis)."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=table["bits_per_value"], y=table["rel_l2"].clip(lower=1e-9), text=table.index,
                               mode="markers+text", textposition="top center", marker={"size": 10}))
    fig.update_layout(title="Nine types: storage against round-trip error", xaxis_title="bits per value",
                      yaxis_title="relative L2 error (f32 at 1e-9)", yaxis_type="log", height=380,
                      margin={"t": 40, "b": 40})
    return fig


# ---------------------------------------------------------------- 02: rotation

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
    """llama.cpp's rotation sizes (K, V) per head_dim for some K/V type pairs (None = not rotated)."""
    import pandas as pd
    rows = {}
    for hd in head_dims:
        rows[hd] = {f"{tk}/{tv}": _plan_text(rotation_plan(tk, tv, hd, disable=False)) for tk, tv in pairs}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("head_dim")


def _plan_text(plan) -> str:
    return f"K:{plan.k or '-'} V:{plan.v or '-'}"


def channel_figure(x: np.ndarray, size: int):
    """Largest |value| per channel before and after the rotation: an outlier channel is spread out."""
    import plotly.graph_objects as go
    channels = np.arange(x.shape[-1])
    flat = x.reshape(-1, x.shape[-1])  # (tokens, head_dim)
    fig = go.Figure([
        go.Bar(x=channels, y=np.abs(flat).max(axis=0), name="K as computed"),
        go.Bar(x=channels, y=np.abs(rotate(flat, size)).max(axis=0), name=f"K @ H{size} (what is stored)"),
    ])
    fig.update_layout(barmode="overlay", title=f"max |K| per channel, before and after H{size}",
                      xaxis_title="channel", yaxis_title="max |value|", height=330, margin={"t": 40, "b": 40})
    fig.update_traces(opacity=0.7)
    return fig


def rotation_figure(table):
    """Error per type without and with each rotation size (grouped bars, log scale)."""
    import plotly.graph_objects as go
    fig = go.Figure([go.Bar(x=table.index, y=table[c], name=c) for c in table.columns])
    fig.update_layout(barmode="group", yaxis_type="log", title="Round-trip error per type and rotation",
                      yaxis_title="relative L2 error", height=330, margin={"t": 40, "b": 40})
    return fig


def rotation_explorer(head_dim: int = 128, n_tokens: int = 256, seed: int = 0):
    """Outlier strength and count of synthetic K: how the rotation spreads them, and the error per type."""
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv

    def render(outlier_scale, n_outliers, size):
        cfg = SyntheticConfig(n_head=1, n_head_kv=1, head_dim=head_dim, n_q=1, n_outliers=n_outliers,
                              outlier_scale=outlier_scale, seed=seed)
        _, k, _ = synthetic_kv(n_tokens, cfg)  # (1, n_tokens, head_dim)
        show(channel_figure(k, size))
        show(rotation_figure(rotation_error_table(k, sizes=(None, size))))

    sizes = [s for s in (64, 128, 256) if head_dim % s == 0]
    controls = {"outlier_scale": _slider(10.0, 0.0, 40.0, 1.0, "outlier scale"),
                "n_outliers": _slider(4, 0, 8, 1, "outlier channels", integer=True),
                "size": _dropdown(sizes, sizes[-1], "rotation size")}
    return _explorer(controls, render, "K with outlier channels, rotated before it is quantized")


# ---------------------------------------------------------------- 03: split axis flow

# (head_dim, n_head, n_head_kv) of some real models
HEAD_CONFIGS = {
    "Llama-3-8B: 128 x 32 q / 8 kv": (128, 32, 8),
    "Qwen2.5-0.5B: 64 x 14 q / 2 kv": (64, 14, 2),
    "Gemma-2-2B: 256 x 8 q / 4 kv": (256, 8, 4),
    "Phi-2: 80 x 32 q / 32 kv": (80, 32, 32),
}
AXIS_COLORS = {"0": "#1f77b4", "1": "#2ca02c", "2": "#9467bd", "3": "#8c564b", "MIRRORED": "#7f7f7f",
               "PARTIAL": "#ff7f0e"}
FAILED_COLOR, NOT_REACHED_COLOR = "#d62728", "#dddddd"


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
    status = "runs" if tr.ok else f"aborts at {failed!r}"
    cfg = block.config
    fig.update_layout(title=f"{cfg.era}: K {cfg.type_k} / V {cfg.type_v} on {cfg.n_devices} devices: {status}",
                      xaxis={"visible": False}, yaxis={"visible": False, "autorange": "reversed"}, height=420, margin={"t": 50, "b": 10},
                      plot_bgcolor="white", legend={"title": "split state"})
    return fig


def explain(block, tr) -> str:
    """Plain text: what llama.cpp would do with this block, and why (init guard, split rule, CUDA FA)."""
    from kvlab.split import cuda_flash_attn
    cfg = block.config
    lines = []
    if block.init_error is not None:
        lines.append(f"refused at init: {block.init_error}")
        lines.append(f"  hint: {block.init_error.hint}")
    if tr.error is not None:
        lines.append(f"split state abort{' (behind the guard)' if block.init_error else ''}: {tr.error}")
    elif block.init_error is None:
        lines.append(f"every node has a split state ({len(tr.nodes)} nodes)")
    cuda = cuda_flash_attn(cfg.type_k, cfg.type_v, cfg.head_dim, cfg.era)
    lines.append(f"CUDA flash attention: {cuda.kernel if cuda.runs else 'no kernel'} ({cuda.reason})")
    return "\n".join(lines)


def trace_block(**config):
    """(block, trace) of llama.cpp's attention block for BlockConfig fields."""
    from kvlab.split import build_attention_block, trace
    block = build_attention_block(**config)
    return block, trace(block.graph, block.era, block.config.n_devices, block.static_states)


def split_flow_explorer(era: str = "flatten", n_devices: int = 2, type_k: str = "q8_0", type_v: str = "q4_0",
                        n_tokens: int = 8):
    """Era, devices, head config, K/V types, batch, rotation and guard: the graph coloured by split state."""
    import ipywidgets as widgets
    from IPython.display import HTML, display
    from html import escape
    from kvlab.split import ERAS

    def render(era, n_devices, heads, type_k, type_v, n_tokens, rotation, guard):
        head_dim, n_head, n_head_kv = HEAD_CONFIGS[heads]
        block, tr = trace_block(era=era, n_devices=n_devices, head_dim=head_dim, n_head=n_head,
                                n_head_kv=n_head_kv, type_k=type_k, type_v=type_v, n_tokens=n_tokens,
                                rotation=rotation, guard=guard)
        bad = block.init_error is not None or tr.error is not None
        display(HTML(f"<pre class='kvlab-explain' style='white-space:pre-wrap;color:{'#a00' if bad else '#060'}'>"
                     f"{escape(explain(block, tr))}</pre>"))
        show(split_graph_figure(block, tr))

    controls = {"era": _dropdown(list(ERAS), era, "era"),
                "n_devices": _dropdown([1, 2, 3, 4, 8], n_devices, "devices"),
                "heads": _dropdown(list(HEAD_CONFIGS), next(iter(HEAD_CONFIGS)), "model"),
                "type_k": _dropdown(list(TYPES), type_k, "K"), "type_v": _dropdown(list(TYPES), type_v, "V"),
                "n_tokens": _dropdown([1, 8, 512], n_tokens, "batch"),
                "rotation": widgets.Checkbox(value=True, description="rotation", indent=False,
                                             layout={"width": "auto"}),
                "guard": widgets.Checkbox(value=False, description="init guard", indent=False,
                                          layout={"width": "auto"})}
    box = _explorer(controls, render, "The attention block under --split-mode tensor")
    box.children[1].layout = {"flex_flow": "row wrap"}
    return box


def era_table(node_names, **config):
    """Split state of the named nodes in each era (the guard removed): a DataFrame, nodes x eras.

    A cell is the state, "ABORT: <rule>" at the node where the era's rules fail, or "-" after it.
    """
    import pandas as pd
    from kvlab.split import ERAS
    columns = {}
    for era in ERAS:
        _, tr = trace_block(era=era, guard=False, **config)
        states = {n.tensor.name: n.state.describe() for n in tr.nodes}
        abort = {tr.error.node: f"ABORT: {tr.error.rule}"} if tr.error is not None else {}
        columns[era] = [states.get(name, abort.get(name, "-")) for name in node_names]
    return pd.DataFrame(columns, index=pd.Index(node_names, name="node"))


OUTCOMES = ("runs", "runs (slow FA)", "no CUDA FA kernel", "split abort", "refused at init")
OUTCOME_COLORS = ("#2ca02c", "#bcbd22", "#ff7f0e", "#d62728", "#7f7f7f")


def compat_frame(**kwargs):
    """kvlab.split.compat_matrix as a DataFrame (one row per era, K, V, devices, rotation)."""
    import pandas as pd
    from kvlab.split import compat_matrix
    return pd.DataFrame([r.to_dict() for r in compat_matrix(**kwargs)])


def compat_figure(frame):
    """One 9x9 grid per era (K rows, V columns), coloured by what happens to the pair."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    eras = list(dict.fromkeys(frame["era"]))
    types = [t for t in TYPES if t in set(frame["type_k"])]
    fig = make_subplots(1, len(eras), subplot_titles=eras, horizontal_spacing=0.04)
    n = len(OUTCOMES)
    scale = [[edge, OUTCOME_COLORS[i]] for i in range(n) for edge in (i / n, (i + 1) / n)]  # one flat band each
    for col, era in enumerate(eras, start=1):
        cells = frame[frame["era"] == era].set_index(["type_k", "type_v"])
        grid = [[OUTCOMES.index(cells.loc[(k, v), "outcome"]) for v in types] for k in types]
        hover = [[f"K {k} / V {v}: {cells.loc[(k, v), 'outcome']}<br>{cells.loc[(k, v), 'split'] or cells.loc[(k, v), 'cuda']}"
                  for v in types] for k in types]
        fig.add_trace(go.Heatmap(z=grid, x=types, y=types, zmin=-0.5, zmax=n - 0.5, colorscale=scale,
                                 hovertext=hover, hoverinfo="text", showscale=col == len(eras),
                                 colorbar={"tickvals": list(range(n)), "ticktext": list(OUTCOMES)}),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col, showticklabels=col == 1)
    fig.update_layout(title="K/V pairs under --split-mode tensor (rows K, columns V)", height=380,
                      margin={"t": 70, "b": 40})
    return fig


# ---------------------------------------------------------------- 04: error growth

def sig(x: float, digits: int = 2) -> str:
    """A number for printed tables that stays the same across machines: a few significant digits,
    and 0 below 1e-10 (float64 rounding noise of lossless pairs)."""
    return "0" if abs(x) < 1e-10 else f"{x:.{digits}g}"


def pair_table(table, pairs, metrics=("kl", "out_rel_l2"), flavor: str = "ref", n_ctx=None):
    """Rows K/V pair, columns metric x rotation off/on, at one context length: printable strings."""
    import pandas as pd
    n_ctx = n_ctx or int(table.n_ctx.max())
    sel = table[(table.flavor == flavor) & (table.n_ctx == n_ctx)]
    rows = {}
    for type_k, type_v in pairs:
        cell = sel[(sel.type_k == type_k) & (sel.type_v == type_v)].set_index("rotation")
        row = {"bits/value": f"{TYPES[type_k].bits_per_weight / 2 + TYPES[type_v].bits_per_weight / 2:g}"}
        for m in metrics:
            for rot in (False, True):
                row[f"{m} rot {'on' if rot else 'off'}"] = sig(float(cell.loc[rot, m]))
        rows[f"{type_k}/{type_v}"] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def error_grid_figure(table, metric: str = "kl", flavor: str = "ref", n_ctx=None, rotation: bool = True):
    """One 9x9 heatmap: log10(metric) per K type (rows) and V type (columns)."""
    import plotly.graph_objects as go
    from kvlab.viz.plots import METRIC_LABELS, type_order
    n_ctx = n_ctx or int(table.n_ctx.max())
    sel = table[(table.flavor == flavor) & (table.n_ctx == n_ctx) & (table.rotation == rotation)]
    grid = sel.pivot_table(index="type_k", columns="type_v", values=metric, aggfunc="mean")
    ks, vs = type_order(grid.index), type_order(grid.columns)
    z = np.log10(np.maximum(grid.loc[ks, vs].to_numpy(), 1e-12))
    fig = go.Figure(go.Heatmap(z=z, x=vs, y=ks, colorscale="Viridis", text=np.vectorize(lambda v: f"{v:.1f}")(z),
                               texttemplate="%{text}", hovertemplate="K %{y} / V %{x}: 10^%{z:.2f}<extra></extra>",
                               colorbar={"title": "log10"}))
    fig.update_layout(title=f"log10 {METRIC_LABELS[metric]}: {flavor}, context {n_ctx}, rotation "
                            f"{'on' if rotation else 'off'}", xaxis_title="V type", yaxis_title="K type",
                      height=450, margin={"t": 50})
    return fig


def error_explorer(table):
    """Metric, context length, flavor and rotation over a sweep table: the 9x9 heatmap."""
    import ipywidgets as widgets
    from kvlab.viz.plots import METRIC_LABELS
    metrics = [m for m in METRIC_LABELS if m in table.columns]
    controls = {"metric": _dropdown(metrics, "kl", "metric"),
                "n_ctx": _dropdown(sorted(int(n) for n in table.n_ctx.unique()), int(table.n_ctx.max()), "context"),
                "flavor": _dropdown(list(dict.fromkeys(table.flavor)), table.flavor.iloc[0], "flavor"),
                "rotation": widgets.Checkbox(value=True, description="rotation", indent=False,
                                             layout={"width": "auto"})}
    return _explorer(controls, lambda **v: show(error_grid_figure(table, **v)),
                     "Error of every K/V pair")


def sources_figure(tables: dict, metric: str = "kl"):
    """Same-type pairs (K = V) on several data sources: grouped bars of the metric, log scale."""
    import plotly.graph_objects as go
    from kvlab.viz.plots import METRIC_LABELS
    fig = go.Figure()
    for name, t in tables.items():
        n_ctx = int(t.n_ctx.max())
        sel = t[(t.type_k == t.type_v) & (t.flavor == "ref") & (t.n_ctx == n_ctx) & (t.rotation)]
        sel = sel.set_index("type_k").loc[[x for x in TYPES if x in set(sel.type_k)]]
        fig.add_trace(go.Bar(x=sel.index, y=np.maximum(sel[metric], 1e-12), name=f"{name} (context {n_ctx})"))
    fig.update_layout(barmode="group", yaxis_type="log", yaxis_title=METRIC_LABELS[metric], height=380,
                      title=f"{METRIC_LABELS[metric]} with K = V type, per data source", margin={"t": 50})
    return fig


# ---------------------------------------------------------------- 05: tensor parallel

def decode_figure(shape: ModelShape, model: DecodeModel, pairs, contexts, devices=(1, 2, 4, 8)):
    """Modelled tokens/s against context, one line per (pair, device count)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    dashes = ("solid", "dash", "dot", "dashdot")
    for i, (tk, tv) in enumerate(pairs):
        for n, dash in zip(devices, dashes):
            fig.add_trace(go.Scatter(x=list(contexts), y=[decode_tokens_per_s(shape, model, tk, tv, c, n) for c in contexts],
                                     mode="lines", name=f"{tk}/{tv}, {n} dev", legendgroup=f"{tk}/{tv}",
                                     line={"dash": dash, "color": _PALETTE[i % len(_PALETTE)]}))
    fig.update_layout(title=f"Modelled decode speed ({model.hbm_gbs:g} GB/s per device, "
                            f"{model.allreduce_us:g} µs per all-reduce)", xaxis_type="log",
                      xaxis_title="context (tokens)", yaxis_title="tokens/s", height=420, margin={"t": 50})
    return fig


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def load_measured(path):
    """bench/tp_decode.py JSON lines as a DataFrame, or None when the file is not there."""
    import pandas as pd
    from pathlib import Path
    path = Path(path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return pd.DataFrame([r for r in rows if r.get("bench") == "tp_decode"])


def measured_figure(frame):
    """Measured decode steps (kvlab.tp, attention layers only) against context, per pair and world size."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for i, ((tk, tv), part) in enumerate(frame[frame.rotation].groupby(["type_k", "type_v"])):
        for n, run in part.groupby("world_size"):
            run = run.sort_values("context")
            fig.add_trace(go.Scatter(x=run.context, y=run.layer_ms, mode="lines+markers", name=f"{tk}/{tv}, {n} GPU",
                                     line={"color": _PALETTE[i % len(_PALETTE)]}))
    fig.update_layout(title=f"Measured: one attention layer per decode step ({frame.device.iloc[0]})",
                      xaxis_type="log", xaxis_title="context (tokens)", yaxis_title="ms per layer", height=420)
    return fig


def sharded_table(devices=(1, 2, 3, 4), pairs=(("q8_0", "q4_0"),), **config):
    """kvlab.split.run_sharded per device count and pair: do the sharded results equal one device's?"""
    import pandas as pd
    from kvlab.split import run_sharded
    rows = []
    for n in devices:
        for tk, tv in pairs:
            r = run_sharded(n_devices=n, type_k=tk, type_v=tv, **config)
            rows.append({"devices": n, "pair": f"{tk}/{tv}", "cache bytes equal": all(r.cache_equal.values()),
                         "heads bitwise equal": r.heads_equal, "output within all-reduce bound": r.within_bound})
    return pd.DataFrame(rows).set_index(["devices", "pair"])


def tp_explorer(shape: ModelShape = ModelShape(), model: DecodeModel = DecodeModel()):
    """Device count, context and K/V pair: KV memory per device and the modelled decode speed."""
    from IPython.display import HTML, display

    def render(n_devices, context, type_k, type_v):
        per_device = kv_bytes_per_device(shape, type_k, type_v, context, n_devices)
        weights = shape.n_params * shape.weight_bits / 8 / n_devices
        speed = decode_tokens_per_s(shape, model, type_k, type_v, context, n_devices)
        cells = "".join(f"<tr><td>device {j}</td><td>{b / 2**30:.2f} GiB KV</td><td>{weights / 2**30:.2f} GiB weights</td></tr>"
                        for j, b in enumerate(per_device))
        display(HTML(f"<table class='kvlab-tp'>{cells}</table><p>modelled decode: <b>{speed:.0f} tokens/s</b></p>"))

    controls = {"n_devices": _dropdown([1, 2, 3, 4, 8], 2, "devices"),
                "context": _dropdown([4096, 32768, 131072], 32768, "context"),
                "type_k": _dropdown(list(TYPES), "q8_0", "K"), "type_v": _dropdown(list(TYPES), "q4_0", "V")}
    return _explorer(controls, render, "Per-device memory and decode speed")
