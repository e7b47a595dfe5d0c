"""The notebooks' explorers (ipywidgets + plotly) and `show`, which draws a plotly figure offline.

Each `*_explorer` returns an ipywidgets box: controls above an Output that redraws on every change.
The first drawing happens when the box is built, so a notebook executed without a browser (nbval,
nbconvert) still runs every line of it. The tables they show live with their domain (kvlab.accuracy,
kvlab.split, kvlab.tp), the figures in kvlab.viz.plots.
"""
import json

import numpy as np

from kvlab.types import TYPES
from kvlab.viz import plots
from kvlab.viz.blocks_view import block_fields_html, example_block, parse_values, quantize_block


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
    return widgets.VBox(rows + [widgets.HBox(list(controls.values()), layout={"flex_flow": "row wrap"}), out],
                        layout={"width": "100%"})


def _dropdown(options, value, description: str):
    import ipywidgets as widgets
    return widgets.Dropdown(options=options, value=value, description=description,
                            style={"description_width": "initial"}, layout={"width": "auto"})


def _slider(value, lo, hi, step, description: str, integer: bool = False):
    import ipywidgets as widgets
    cls = widgets.IntSlider if integer else widgets.FloatSlider
    return cls(value=value, min=lo, max=hi, step=step, description=description, continuous_update=False,
               style={"description_width": "initial"})


def _checkbox(value: bool, description: str):
    import ipywidgets as widgets
    return widgets.Checkbox(value=value, description=description, indent=False, layout={"width": "auto"})


def block_explorer(values=None, type_name: str = "q4_0", flavor: str = "ref"):
    """01: pick a type and a flavor, edit the 32 values: the block's bytes and fields, and what comes back."""
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
        show(plots.block_figure(x, restored, type_name))

    controls = {"type_name": _dropdown(list(TYPES), type_name, "type"),
                "flavor": _dropdown(list(FLAVORS), flavor, "flavor"), "text": text}
    return _explorer(controls, render, "One block: bytes, fields, and the values they give back")


def rotation_explorer(head_dim: int = 128, n_tokens: int = 256, seed: int = 0):
    """02: outlier strength and count of synthetic K: how the rotation spreads them, and the error per type."""
    from kvlab.accuracy.roundtrip import rotation_error_table
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv

    def render(outlier_scale, n_outliers, size):
        cfg = SyntheticConfig(n_head=1, n_head_kv=1, head_dim=head_dim, n_q=1, n_outliers=n_outliers,
                              outlier_scale=outlier_scale, seed=seed)
        _, k, _ = synthetic_kv(n_tokens, cfg)  # (1, n_tokens, head_dim)
        show(plots.channel_figure(k, size))
        show(plots.rotation_figure(rotation_error_table(k, sizes=(None, size))))

    sizes = [s for s in (64, 128, 256) if head_dim % s == 0]
    controls = {"outlier_scale": _slider(10.0, 0.0, 40.0, 1.0, "outlier scale"),
                "n_outliers": _slider(4, 0, 8, 1, "outlier channels", integer=True),
                "size": _dropdown(sizes, sizes[-1], "rotation size")}
    return _explorer(controls, render, "K with outlier channels, rotated before it is quantized")


def split_flow_explorer(era: str = "flatten", n_devices: int = 2, type_k: str = "q8_0", type_v: str = "q4_0",
                        n_tokens: int = 8):
    """03: era, devices, head config, K/V types, batch, rotation and guard: the graph coloured by split state."""
    from html import escape
    from IPython.display import HTML, display
    from kvlab.split import ERAS
    from kvlab.split.tables import HEAD_CONFIGS, explain, trace_block

    def render(era, n_devices, heads, type_k, type_v, n_tokens, rotation, guard):
        head_dim, n_head, n_head_kv = HEAD_CONFIGS[heads]
        block, tr = trace_block(era=era, n_devices=n_devices, head_dim=head_dim, n_head=n_head,
                                n_head_kv=n_head_kv, type_k=type_k, type_v=type_v, n_tokens=n_tokens,
                                rotation=rotation, guard=guard)
        bad = block.init_error is not None or tr.error is not None
        display(HTML(f"<pre class='kvlab-explain' style='white-space:pre-wrap;color:{'#a00' if bad else '#060'}'>"
                     f"{escape(explain(block, tr))}</pre>"))
        show(plots.split_graph_figure(block, tr))

    controls = {"era": _dropdown(list(ERAS), era, "era"),
                "n_devices": _dropdown([1, 2, 3, 4, 8], n_devices, "devices"),
                "heads": _dropdown(list(HEAD_CONFIGS), next(iter(HEAD_CONFIGS)), "model"),
                "type_k": _dropdown(list(TYPES), type_k, "K"), "type_v": _dropdown(list(TYPES), type_v, "V"),
                "n_tokens": _dropdown([1, 8, 512], n_tokens, "batch"),
                "rotation": _checkbox(True, "rotation"), "guard": _checkbox(False, "init guard")}
    return _explorer(controls, render, "The attention block under --split-mode tensor")


def split_boxes_explorer(n_devices: int = 2, type_k: str = "q8_0", type_v: str = "q4_0", n_tokens: int = 8):
    """03: the split of every tensor in the three eras (plots.split_flow_figure; its slider walks the graph)."""
    from kvlab.split.tables import HEAD_CONFIGS

    def render(n_devices, heads, type_k, type_v, n_tokens, rotation):
        head_dim, n_head, n_head_kv = HEAD_CONFIGS[heads]
        show(plots.split_flow_figure(n_devices=n_devices, head_dim=head_dim, n_head=n_head, n_head_kv=n_head_kv,
                                     type_k=type_k, type_v=type_v, n_tokens=n_tokens, rotation=rotation))

    controls = {"n_devices": _dropdown([2, 3, 4, 8], n_devices, "devices"),
                "heads": _dropdown(list(HEAD_CONFIGS), next(iter(HEAD_CONFIGS)), "model"),
                "type_k": _dropdown(list(TYPES), type_k, "K"), "type_v": _dropdown(list(TYPES), type_v, "V"),
                "n_tokens": _dropdown([1, 8, 16], n_tokens, "batch"), "rotation": _checkbox(True, "rotation")}
    return _explorer(controls, render, "Each tensor's split, era by era (drag the slider under the figure)")


def error_explorer(table):
    """04: metric, context length, flavor and rotation over a sweep table: one K x V heatmap, each metric on
    its own scale (log10 for errors, linear for cosine and top-k overlap)."""
    metrics = [m for m in plots.METRIC_LABELS if m in table.columns]
    controls = {"metric": _dropdown(metrics, "out_rel_l2", "metric"),
                "n_ctx": _dropdown(sorted(int(n) for n in table.n_ctx.unique()), int(table.n_ctx.max()), "context"),
                "flavor": _dropdown(list(dict.fromkeys(table.flavor)), table.flavor.iloc[0], "flavor"),
                "rotation": _checkbox(True, "rotation")}
    return _explorer(controls, lambda **v: show(plots.error_grid_figure(table, **v)), "Error of every K/V pair")


def tp_explorer(shape=None, model=None):
    """05: device count, context and K/V pair: KV memory per device and the modelled decode speed."""
    from IPython.display import HTML, display
    from kvlab.tp.decode_model import DecodeModel, ModelShape, decode_tokens_per_s, kv_bytes_per_device
    shape, model = shape or ModelShape(), model or DecodeModel()

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
