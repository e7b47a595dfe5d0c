"""kvlab.viz.blocks_view (a block's bytes as fields), kvlab.viz.widgets and the tables the notebooks show, and
the stored notebooks themselves."""
from pathlib import Path

import numpy as np
import pytest

import kvlab
from kvlab.viz.blocks_view import IQ4NL_LEVELS, decode_block

pd = pytest.importorskip("pandas")
pytest.importorskip("plotly")
pytest.importorskip("ipywidgets")
from kvlab.accuracy import roundtrip  # noqa: E402
from kvlab.accuracy.table import pair_table, sig  # noqa: E402
from kvlab.split import tables as split_tables  # noqa: E402
from kvlab.split.compat import OUTCOMES  # noqa: E402
from kvlab.tp import decode_model  # noqa: E402
from kvlab.tp.measured import load_measured  # noqa: E402
from kvlab.viz import blocks_view, plots, widgets  # noqa: E402


def _data(seed=0):
    """(64, 64) float32: normals, an outlier row, a constant row, a zero row, tiny values."""
    x = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
    x[1, 5] = 40.0
    x[2] = 0.75
    x[3] = 0.0
    x[4] *= np.float32(1e-6)
    return x


# ---------------------------------------------------------------- blocks_view

@pytest.mark.parametrize("flavor", kvlab.FLAVORS)
@pytest.mark.parametrize("type_name", list(kvlab.TYPES))
def test_decoded_values_equal_ggml_to_float(type_name, flavor):
    info = kvlab.TYPES[type_name]
    q = kvlab.quantize(_data(), type_name, flavor)
    raw = q.raw.reshape(-1, info.type_size)                       # (n_blocks, type_size)
    expected = kvlab.dequantize(q).reshape(-1, info.block_size)  # (n_blocks, block_size)
    got = np.stack([decode_block(block, type_name).values for block in raw])
    assert got.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()


def _block(d_bits: int, *parts: bytes) -> bytes:
    return d_bits.to_bytes(2, "little") + b"".join(parts)


def test_q4_0_fields_by_hand():
    qs = bytes([0x21] + [0x88] * 15)   # value 0: low nibble 1, value 16: high nibble 2; the rest 8 (= 0.0)
    view = decode_block(_block(0x3C00, qs), "q4_0")   # d = 1.0
    assert [f.name for f in view.fields] == ["d", "qs"]
    assert view.fields[0].value == 1.0
    assert view.q[0] == 1 and view.q[16] == 2 and set(view.q[[1, 17]]) == {8}
    assert view.values[0] == -7.0 and view.values[16] == -6.0 and view.values[1] == 0.0


def test_q5_high_bits_and_minimum_by_hand():
    qh = ((1 << 0) | (1 << 17)).to_bytes(4, "little")   # bit 4 of q[0] and of q[17]
    qs = bytes([0x03, 0x40] + [0x00] * 14)               # q[0] low = 3, q[17] low = 4
    q5_0 = decode_block(_block(0x3800, qh, qs), "q5_0")  # d = 0.5
    assert q5_0.q[0] == 19 and q5_0.q[17] == 20 and q5_0.q[1] == 0
    assert q5_0.values[0] == 1.5 and q5_0.values[17] == 2.0 and q5_0.values[1] == -8.0
    m = (0xC000).to_bytes(2, "little")                   # m = -2.0
    q5_1 = decode_block(_block(0x3800, m, qh, qs), "q5_1")
    assert [f.name for f in q5_1.fields] == ["d", "m", "qh", "qs"]
    assert q5_1.values[0] == 19 * 0.5 - 2.0 and q5_1.values[1] == -2.0


def test_q8_0_and_iq4_nl_by_hand():
    q8 = decode_block(_block(0x4000, bytes([0xFF, 0x7F] + [0] * 30)), "q8_0")   # d = 2.0, q = -1, 127
    assert q8.values[0] == -2.0 and q8.values[1] == 254.0
    iq = decode_block(_block(0x3C00, bytes([0xF0] + [0] * 15)), "iq4_nl")     # q[0] = 0, q[16] = 15
    assert iq.values[0] == IQ4NL_LEVELS[0] and iq.values[16] == IQ4NL_LEVELS[15]


def test_float_fields_by_hand():
    half = decode_block((0x3C00).to_bytes(2, "little"), "f16")
    assert [f.value for f in half.fields] == [0, 15, 0] and half.values[0] == 1.0
    bf = decode_block((0xBF80).to_bytes(2, "little"), "bf16")
    assert [f.value for f in bf.fields] == [1, 127, 0] and bf.values[0] == -1.0
    f32 = decode_block(np.float32(-0.5).tobytes(), "f32")
    assert [f.value for f in f32.fields] == [1, 126, 0]


def test_describe_names_every_field():
    view = decode_block(kvlab.quantize(_data()[:1, :32], "q5_1").raw[0], "q5_1")
    text = view.describe()
    for name in ("d ", "m ", "qh", "qs", "q "):
        assert f"  {name}" in text
    assert view.raw.hex(" ") in text


def test_decode_block_rejects_bad_input():
    with pytest.raises(ValueError, match="18 bytes"):
        decode_block(bytes(17), "q4_0")
    with pytest.raises(ValueError, match="unknown KV type"):
        decode_block(bytes(18), "q4_2")


# ---------------------------------------------------------------- 01 / 02

def test_parse_values():
    assert blocks_view.parse_values("1, 2 3", n=3).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="expected 32 numbers"):
        blocks_view.parse_values("1, 2")
    with pytest.raises(ValueError, match="separated"):
        blocks_view.parse_values("1, x")


def test_quantize_block_views():
    x = blocks_view.example_block()
    views, restored = blocks_view.quantize_block(x, "f16")
    assert len(views) == 32 and restored.shape == (32,)
    views, restored = blocks_view.quantize_block(x, "q5_0")
    assert len(views) == 1 and np.array_equal(views[0].values, restored)
    assert "qh" in blocks_view.block_fields_html(views)


def test_types_table():
    x = _data()
    table = roundtrip.types_table(x)
    assert list(table.index) == list(kvlab.TYPES)
    assert table.loc["f32", "rel_l2"] == 0.0
    assert table.loc["q8_0", "rel_l2"] < table.loc["q5_0", "rel_l2"] < table.loc["q4_0", "rel_l2"]
    assert (table["bits_per_value"] == [kvlab.TYPES[t].bits_per_weight for t in table.index]).all()


def test_rotation_round_trip_and_table():
    x = _data()
    unrotated = kvlab.dequantize(kvlab.quantize(x, "q4_0"))
    assert np.array_equal(roundtrip.rotated_round_trip(x, "q4_0", None), unrotated)
    outliers = np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)
    outliers[:, 3] += 20.0   # one outlier channel
    table = roundtrip.rotation_error_table(outliers, sizes=(None, 128), types=("q4_0", "q8_0"))
    assert list(table.columns) == ["none", "H128"]
    assert (table["H128"] < table["none"]).all()


def test_rotation_gate_table():
    table = roundtrip.rotation_gate_table(head_dims=(80, 128), pairs=(("q4_0", "q4_0"), ("f16", "f16")))
    assert table.loc[128, "q4_0/q4_0"] == "K:128 V:64"
    assert table.loc[80, "q4_0/q4_0"] == "K:- V:-"
    assert table.loc[128, "f16/f16"] == "K:- V:-"


def test_explorers_build_and_draw_without_a_kernel(capsys):
    for box in (widgets.block_explorer(), widgets.rotation_explorer(n_tokens=64), widgets.split_flow_explorer(),
                widgets.split_boxes_explorer(), widgets.error_explorer(_fake_table()), widgets.tp_explorer()):
        assert len(box.children) == 3   # title, controls, output
    assert "vnd.plotly" in capsys.readouterr().out   # the first drawing happened


# ---------------------------------------------------------------- 03

def test_graph_layout_places_ops_after_their_sources():
    block, _ = split_tables.trace_block(era="pr23792", n_tokens=8)
    pos = plots.graph_layout(block.graph.order)
    assert set(pos) == {id(t) for t in block.graph.order}
    for t in block.graph.order:
        for s in t.src:
            if s is not None:
                assert pos[id(s)][0] < pos[id(t)][0], (s.name, t.name)
    assert len(set(pos.values())) == len(pos)   # no two nodes on one spot


def test_graph_figure_marks_the_failing_node():
    block, tr = split_tables.trace_block(era="flatten", type_k="q8_0", type_v="q4_0", n_tokens=8, guard=False)
    fig = plots.split_graph_figure(block, tr)
    failed = [t for t in fig.data if t.name == "failed"]
    assert len(failed) == 1 and tr.error.node in failed[0].hovertext[0]
    assert any(t.name == "not reached" for t in fig.data)
    text = split_tables.explain(block, tr)
    assert "split state abort" in text and "SET_ROWS" in text and "refused at init" not in text


def test_explain_names_the_guard_and_cuda():
    block, tr = split_tables.trace_block(era="flatten", type_k="q8_0", type_v="q4_0", n_tokens=8, guard=True)
    assert "refused at init" in split_tables.explain(block, tr)
    block, tr = split_tables.trace_block(era="pr23792", type_k="q8_0", type_v="q4_0", n_tokens=8)
    text = split_tables.explain(block, tr)
    assert "every node has a split state" in text and "f16 conversion" in text


def test_era_table_follows_k_through_the_rotation():
    names = ["Kcur-0 (rot in)", "cache_k_l0 (set_rows)", "attn_out-0"]
    table = split_tables.era_table(names, type_k="q8_0", type_v="q4_0", n_tokens=8, n_devices=2)
    assert table.loc["cache_k_l0 (set_rows)", "flatten"].startswith("ABORT")
    assert table.loc["attn_out-0", "flatten"] == "-"
    assert "x nr 8" in table.loc["Kcur-0 (rot in)", "pr23792"]
    assert table.loc["attn_out-0", "pr23792"] == "MIRRORED"


def test_compat_figure_colours_each_outcome():
    frame = split_tables.compat_frame(eras=("flatten", "pr23792"), types=("f16", "q8_0", "q4_0"), devices=(2,),
                                 rotations=(True,))
    fig = plots.compat_figure(frame)
    assert len(fig.data) == 2
    for era, trace in zip(("flatten", "pr23792"), fig.data):
        cells = frame[frame.era == era].set_index(["type_k", "type_v"])["outcome"]
        assert list(trace.x) == ["f16", "q8_0", "q4_0"]
        for i, k in enumerate(trace.y):
            for j, v in enumerate(trace.x):
                assert OUTCOMES[trace.z[i][j]] == cells[(k, v)]


# ---------------------------------------------------------------- 04

def _fake_table():
    rows = []
    for k in kvlab.TYPES:
        for v in kvlab.TYPES:
            for rot in (False, True):
                err = kvlab.TYPES[k].bits_per_weight ** -2 * (0.5 if rot else 1.0)
                rows.append(dict(type_k=k, type_v=v, rotation=rot, flavor="ref", n_ctx=128, kl=err,
                                 out_rel_l2=err + kvlab.TYPES[v].bits_per_weight ** -2))
    return pd.DataFrame(rows)


def test_error_grid_and_pair_table():
    table = _fake_table()
    fig = plots.error_grid_figure(table, "kl", rotation=False)
    heat = fig.data[0]
    row = list(heat.y).index("q4_0")
    assert np.isclose(heat.z[row][0], np.log10(4.5 ** -2))
    pairs = pair_table(table, [("q4_0", "q8_0")])
    assert pairs.loc["q4_0/q8_0", "kl rot off"] == sig(4.5 ** -2)
    assert pairs.loc["q4_0/q8_0", "bits/value"] == "6.5"


def test_sig_is_stable():
    assert sig(5.6e-17) == "0"
    assert sig(0.0123456) == "0.012"
    assert sig(1234.5, 3) == "1.23e+03"


# ---------------------------------------------------------------- 05

def test_kv_bytes_per_device():
    shape = decode_model.ModelShape()
    one = decode_model.kv_bytes_per_device(shape, "f16", "f16", 32768, 1)
    assert one == [4 * 2 ** 30]   # Llama-3-8B: 32 layers x 1024 values x 2 (K, V) x 2 bytes x 32k
    three = decode_model.kv_bytes_per_device(shape, "f16", "f16", 32768, 3)
    assert sum(three) == one[0] and max(three) > min(three)   # 8 KV heads do not split evenly in 3
    assert sum(decode_model.kv_bytes_per_device(shape, "q8_0", "q4_0", 1024, 2)) == 32 * 1024 * (1088 + 576)


def test_decode_model_orders():
    shape, model = decode_model.ModelShape(), decode_model.DecodeModel()
    speed = lambda tk, tv, ctx, n: decode_model.decode_tokens_per_s(shape, model, tk, tv, ctx, n)
    assert speed("f16", "f16", 131072, 2) > speed("f16", "f16", 131072, 1)
    assert speed("q4_0", "q4_0", 131072, 1) > speed("q8_0", "q8_0", 131072, 1) > speed("f16", "f16", 131072, 1)
    assert speed("f16", "f16", 1024, 1) > speed("f16", "f16", 131072, 1)


def test_sharded_table_small():
    table = split_tables.sharded_table(devices=(2, 3), pairs=(("q4_0", "q8_0"),), era="pr23792", head_dim=64,
                                  n_head=6, n_head_kv=3, n_tokens=2, n_past=3)
    assert table.to_numpy().all()


def test_load_measured(tmp_path):
    assert load_measured(tmp_path / "none.jsonl") is None
    path = tmp_path / "tp.jsonl"
    path.write_text('{"bench": "tp_decode", "world_size": 2, "type_k": "q8_0", "type_v": "q4_0", "rotation": true, '
                    '"context": 4096, "layer_ms": 0.5, "device": "H100"}\nnot json\n')
    frame = load_measured(path)
    assert len(frame) == 1
    assert plots.measured_figure(frame).data[0].name == "q8_0/q4_0, 2 GPU"


# ---------------------------------------------------------------- the stored notebooks open clean

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_opens_clean(path):
    """No widget reprs, errors, progress bars or to_string() tables in what JupyterLab shows on opening
    (tools/refresh_notebooks.py stores them this way)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert "to_string()" not in cell.source, cell.source
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
            assert not (out.output_type == "stream" and out.name == "stderr"), out.text[:200]
            data = out.get("data", {})
            assert "application/vnd.jupyter.widget-view+json" not in data
            assert not str(data.get("text/plain", "")).startswith("VBox("), data["text/plain"][:80]
    html_tables = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
                   if "<table" in str(out.get("data", {}).get("text/html", ""))]
    assert html_tables, "every notebook shows its tables as HTML"
