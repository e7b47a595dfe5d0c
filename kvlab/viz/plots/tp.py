"""Figures of notebook 05: modelled and measured decode speed under tensor parallelism."""
from kvlab.tp.decode_model import DecodeModel, ModelShape, decode_tokens_per_s
from kvlab.viz.plots.style import color


def decode_figure(shape: ModelShape, model: DecodeModel, pairs, contexts, devices=(1, 2, 4, 8)):
    """Modelled tokens/s against context, one line per (pair, device count)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    dashes = ("solid", "dash", "dot", "dashdot")
    for i, (tk, tv) in enumerate(pairs):
        for n, dash in zip(devices, dashes):
            fig.add_trace(go.Scatter(x=list(contexts), y=[decode_tokens_per_s(shape, model, tk, tv, c, n) for c in contexts],
                                     mode="lines", name=f"{tk}/{tv}, {n} dev", legendgroup=f"{tk}/{tv}",
                                     line={"dash": dash, "color": color(i)}))
    fig.update_layout(title=f"Modelled decode speed ({model.hbm_gbs:g} GB/s per device, "
                            f"{model.allreduce_us:g} µs per all-reduce)", xaxis_type="log",
                      xaxis_title="context (tokens, log scale)", yaxis_title="tokens/s", height=420, margin={"t": 50})
    return fig


def measured_figure(frame):
    """Measured decode steps (kvlab.tp, attention layers only) against context, per pair and world size."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for i, ((tk, tv), part) in enumerate(frame[frame.rotation].groupby(["type_k", "type_v"])):
        for n, run in part.groupby("world_size"):
            run = run.sort_values("context")
            fig.add_trace(go.Scatter(x=run.context, y=run.layer_ms, mode="lines+markers", name=f"{tk}/{tv}, {n} GPU",
                                     line={"color": color(i)}))
    fig.update_layout(title=f"Measured: one attention layer per decode step ({frame.device.iloc[0]})",
                      xaxis_type="log", xaxis_title="context (tokens, log scale)", yaxis_title="ms per layer",
                      height=420)
    return fig
