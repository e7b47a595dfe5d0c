"""kvlab.viz.plots: what the figures promise (scales, orientation, labels), checked on the figure objects."""
import numpy as np
import pytest

import kvlab

pd = pytest.importorskip("pandas")
pytest.importorskip("plotly")
from kvlab.viz import plots  # noqa: E402
from kvlab.viz.plots.sweep import ANY_V  # noqa: E402


def _table():
    """A tidy sweep table with known values: errors fall with bits, f32/f32 is exactly 0, KL ignores V."""
    rows = []
    for k, ik in kvlab.TYPES.items():
        for v, iv in kvlab.TYPES.items():
            for rot in (False, True):
                for n_ctx in (128, 512):
                    scale = (0.5 if rot and ik.is_quantized else 1.0) * (1.5 if n_ctx == 512 else 1.0)
                    kl = 0.0 if k == "f32" else scale * ik.bits_per_weight ** -4
                    out = 0.0 if k == v == "f32" else scale * (ik.bits_per_weight ** -2 + iv.bits_per_weight ** -2)
                    rows.append(dict(type_k=k, type_v=v, rotation=rot, flavor="ref", n_ctx=n_ctx, kl=kl,
                                     out_rel_l2=out, out_cos=1 - out ** 2 / 2, topk_overlap=1 - out,
                                     bits_per_value=(ik.bits_per_weight + iv.bits_per_weight) / 2))
    return pd.DataFrame(rows)


def test_heatmap_orientation_is_most_bits_top_left():
    fig = plots.rotation_heatmaps(_table(), "out_rel_l2")
    heat = fig.data[0]
    assert list(heat.y)[0] == "f32" and list(heat.y)[-1] == "q4_0"   # rows K, most bits first...
    assert list(heat.x)[0] == "f32" and list(heat.x)[-1] == "q4_0"   # ...columns V
    assert fig.layout.yaxis.autorange == "reversed"                  # ...drawn from the top
    assert "rows" in fig.layout.yaxis.title.text and "columns" in fig.layout.xaxis.title.text


def test_heatmap_colours_fit_the_quantized_pairs_and_float_pairs_are_grey():
    table = _table()
    fig = plots.rotation_heatmaps(table, "out_rel_l2")
    main, grey = fig.data[0], fig.data[1]
    quantized = table[(table.rotation == False) & (table.n_ctx == 512)  # noqa: E712
                      & table.apply(lambda r: kvlab.TYPES[r.type_k].is_quantized or kvlab.TYPES[r.type_v].is_quantized, axis=1)]
    assert np.isclose(main.zmin, np.log10(quantized.out_rel_l2.min()), atol=0.5)
    assert main.zmin > -6   # not stretched to the f32 floor
    z = np.array(main.z, dtype=float)
    assert np.isnan(z[0, 0]) and not np.isnan(np.array(grey.z, dtype=float)[0, 0])   # f32/f32 drawn grey
    bars = [t for t in fig.data if t.showscale]
    assert [b.colorbar.title.text for b in bars] == ["log10 output relative L2", "log10(on / off)"]
    assert "log10" in main.customdata[4][4]   # hover: the value and its log10


def test_kl_collapses_to_one_column_when_v_does_not_change_it():
    table = _table()
    fig = plots.error_grid_figure(table, "kl", rotation=False)
    assert list(fig.data[0].x) == [ANY_V]
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 0]) and not np.isnan(z[-1, 0])   # f32 K grey (outside the scale), q4_0 K coloured
    assert not plots.varies_with_v(plots.sweep._grid(table[table.rotation], "kl", n_ctx=512)[2])
    assert plots.varies_with_v(plots.sweep._grid(table[table.rotation], "out_rel_l2", n_ctx=512)[2])
    bars = plots.k_type_figure(table, "kl")
    assert "f32" not in list(bars.data[0].x) and bars.layout.yaxis.type == "log"


@pytest.mark.parametrize("metric, log", [("out_rel_l2", True), ("kl", True), ("out_cos", False), ("topk_overlap", False)])
def test_each_metric_on_its_own_scale(metric, log):
    fig = plots.error_grid_figure(_table(), metric)
    title = fig.data[0].colorbar.title.text
    assert ("log10" in title) == log
    assert plots.METRIC_LABELS[metric] in title and "log10" not in fig.layout.title.text[:5]
    growth = plots.context_growth(_table(), [("q4_0", "q4_0")], metric)
    assert (growth.layout.yaxis.type == "log") == log


def test_pareto_labels_only_the_frontier_and_leaves_out_exact_pairs():
    fig, frontier = plots.bits_vs_error(_table(), "out_rel_l2")
    assert "f32/f32" not in frontier
    points, front = fig.data[0], fig.data[1]
    assert front.mode == "lines+markers+text" and list(front.customdata) == frontier
    assert points.mode == "markers"   # the rest: names on hover only
    assert "f32/f32" in fig.data[2].name   # exactly 0: listed, not drawn
    listing = fig.layout.annotations[0].text
    assert all(name in listing for name in frontier)
    low = np.log10(min(e for e in points.y))
    assert fig.layout.yaxis.range[0] > -6 and fig.layout.yaxis.range[0] <= low


def test_split_flow_figure_shows_where_the_eras_diverge():
    fig = plots.split_flow_figure(type_k="q8_0", type_v="q4_0", n_tokens=8, n_devices=2)
    meta = fig.layout.meta
    first = meta["first_divergence"]
    assert meta["steps"][first] == "Qcur-0 (rot in)"   # the rotation's 2D/4D reshape
    slider = fig.layout.sliders[0]
    assert slider.active == first and len(slider.steps) == len(meta["steps"])
    texts = [a["text"] for a in slider.steps[first].args[0]["annotations"]]
    assert any("AXIS_1 {128, 128}" in t for t in texts)            # flatten: two contiguous slices
    assert any("AXIS_2 {16, 16}" in t for t in texts)              # pr23225: the heads on axis 2
    assert any("x nr 8" in t and "dev 0: 128, dev 1: 128" in t for t in texts)   # pr23792: segments, counts
    # pr23792's split dimension is cut into 2 devices x 8 repetitions, labelled with 16 heads each
    assert sum(t == "16" for t in texts) == 2 + 16
    set_rows = slider.steps[meta["steps"].index("cache_k_l0 (set_rows)")].args[0]["annotations"]
    assert any("ABORT" in a["text"] and "GGML_BACKEND_SPLIT_AXIS_1" in a["text"] for a in set_rows)
    after = slider.steps[meta["steps"].index("attn_out-0")].args[0]["annotations"]
    assert any("not reached" in a["text"] for a in after) and any("MIRRORED" in a["text"] for a in after)


def test_first_divergence_is_none_when_the_eras_agree():
    fig = plots.split_flow_figure(type_k="f16", type_v="f16", n_tokens=8, n_devices=2)   # f16: no rotation
    assert fig.layout.meta["first_divergence"] is None and fig.layout.sliders[0].active == 0


def test_one_palette():
    import kvlab.viz.plots.split as split_plots
    import kvlab.viz.plots.style as style
    assert split_plots.OUTCOME_COLORS is style.OUTCOME_COLORS
    assert set(style.OUTCOME_COLORS) == set(kvlab.split.compat.OUTCOMES)
    assert plots.color(0) == style.PALETTE[0] and plots.color(len(style.PALETTE)) == style.PALETTE[0]
