"""kvlab.ggml.state against the bytes a real llama.cpp (llama-cpp-python 0.3.36) writes for its KV cache."""
import numpy as np
import pytest

import kvlab
from kvlab.ggml.state import KVState, read_state, read_state_file, split_heads, write_state
from kvlab.rotation import rotate, rotation_plan
from kvlab.types import TYPES

TOKENS = np.random.default_rng(7).integers(0, 256, 48)
QUANTIZED = [t for t, info in TYPES.items() if info.is_quantized]


@pytest.fixture(scope="module")
def f32_state(llama_pair):
    """llama.cpp's own layer-0 K/V floats: an f32 cache keeps them exactly (rotation gates on quantized types)."""
    return read_state(llama_pair[2].run(TOKENS, "f32", "f32")[1])


@pytest.mark.parametrize("type_k,type_v,flash_attn", [("q4_0", "q8_0", True), ("iq4_nl", "q5_1", True),
                                                       ("bf16", "f16", True), ("f16", "f16", False),
                                                       ("q8_0", "f32", False)])
def test_state_bytes_round_trip(llama_pair, type_k, type_v, flash_attn):
    spec, _, llama = llama_pair
    raw = llama.run(TOKENS, type_k, type_v, flash_attn=flash_attn)[1]
    state = read_state(raw)
    assert state.container == "seq_data" and state.seq_id == 0
    assert state.stream.v_trans is (not flash_attn)   # V is stored transposed without flash attention
    assert np.array_equal(state.positions, np.arange(TOKENS.size))
    assert len(state.layers) == spec.n_layer
    width = spec.head_dim * spec.n_head_kv
    for layer in state.layers:
        assert (layer.k.type, layer.v.type) == (type_k, type_v)
        assert layer.k.shape == layer.v.shape == (TOKENS.size, width)
    assert write_state(state) == raw


def test_transposed_v_reads_as_the_same_rows(llama_pair):
    """Layer 0's V does not depend on attention: FA off (transposed) and on (rows) hold the same f16 values."""
    llama = llama_pair[2]
    rows = read_state(llama.run(TOKENS, "f16", "f16", flash_attn=True)[1]).layers[0].v
    transposed = read_state(llama.run(TOKENS, "f16", "f16", flash_attn=False)[1]).layers[0].v
    assert np.array_equal(rows.raw, transposed.raw)


@pytest.mark.parametrize("type_name", ["f16", "bf16"] + QUANTIZED)
def test_layer0_bytes_equal_kvlab_quantize_of_llama_floats(llama_pair, f32_state, type_name):
    """Rotation off, llama.cpp's set_rows writes from_float(K) of the same layer-0 floats an f32 cache holds:
    kvlab's cpu flavor writes the same bytes, compared byte for byte."""
    state = read_state(llama_pair[2].run(TOKENS, type_name, type_name, rotation=False)[1])
    for got, floats in ((state.layers[0].k, f32_state.layers[0].k), (state.layers[0].v, f32_state.layers[0].v)):
        mine = kvlab.quantize(kvlab.dequantize(floats), type_name, flavor="cpu")
        assert got.raw.shape == mine.raw.shape
        assert np.array_equal(got.raw, mine.raw), f"{type_name}: {int((got.raw != mine.raw).sum())} bytes differ"
        assert np.array_equal(kvlab.dequantize(got), kvlab.dequantize(mine))


def test_layer0_rotated_bytes_match_kvlab_rotate_then_quantize(llama_pair, f32_state):
    """Rotation on: llama.cpp rotates with a mul_mat by H, kvlab with a float32 FWHT; their last bits may
    differ, so a value on a rounding step may flip a block. Measured: nearly every block identical."""
    spec, _, llama = llama_pair
    state = read_state(llama.run(TOKENS, "q4_0", "q8_0", rotation=True)[1])
    plan = rotation_plan("q4_0", "q8_0", spec.head_dim)
    for got, floats, type_name, rot in ((state.layers[0].k, f32_state.layers[0].k, "q4_0", plan.k),
                                        (state.layers[0].v, f32_state.layers[0].v, "q8_0", plan.v)):
        heads = split_heads(floats, spec.n_head_kv)                                # (n_kv, cells, D)
        mine = kvlab.quantize(rotate(kvlab.dequantize(heads), rot), type_name, flavor="cpu")
        size = TYPES[type_name].type_size
        same = (split_heads(got, spec.n_head_kv).raw.reshape(-1, size) == mine.raw.reshape(-1, size)).all(axis=1)
        assert same.mean() >= 0.99, f"{type_name}: {same.mean():.4f} identical blocks"


def test_files_llama_cpp_saves_read_as_the_same_cache(llama_pair, tmp_path):
    raw = llama_pair[2].run(TOKENS, "q5_0", "iq4_nl", save_to=tmp_path / "run")[1]
    direct = read_state(raw)
    for suffix, container in ((".ggsq", "seq_file"), (".session", "session")):
        state = read_state_file(tmp_path / f"run{suffix}")
        assert state.container == container
        assert np.array_equal(state.tokens, TOKENS)
        assert np.array_equal(state.positions, direct.positions)
        assert state.stream.seq_ids == [(0,)] * TOKENS.size
        for a, b in zip(state.layers, direct.layers):
            assert np.array_equal(a.k.raw, b.k.raw) and np.array_equal(a.v.raw, b.v.raw)
        assert write_state(state) == (tmp_path / f"run{suffix}").read_bytes()
    assert read_state_file(tmp_path / "run.session").arch == "llama"


def test_split_heads_cuts_rows_per_kv_head(llama_pair, f32_state):
    spec = llama_pair[0]
    rows = f32_state.layers[0].k
    heads = split_heads(rows, spec.n_head_kv)
    assert heads.shape == (spec.n_head_kv, TOKENS.size, spec.head_dim)
    values = kvlab.dequantize(rows).reshape(TOKENS.size, spec.n_head_kv, spec.head_dim)  # ne = [D, n_kv, cells]
    assert np.array_equal(kvlab.dequantize(heads), values.transpose(1, 0, 2))
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        split_heads(rows, 3)


@pytest.fixture(scope="module")
def q_raw(llama_pair):
    return llama_pair[2].run(TOKENS[:8], "q4_0", "q8_0")[1]


def test_bad_bytes_are_refused_with_the_place(q_raw):
    with pytest.raises(ValueError, match="truncated at byte"):
        read_state(q_raw[:-5])
    with pytest.raises(ValueError, match="magic"):
        read_state(b"\0" * 16)
    with pytest.raises(ValueError, match="bytes left after"):
        read_state(q_raw + b"\0\0\0\0")
    with pytest.raises(TypeError, match="read_state_file"):
        read_state("state.ggsq")


def test_a_type_outside_the_nine_is_named(q_raw):
    state = read_state(q_raw)
    at = q_raw.index(np.int32(2).tobytes() + np.uint64(state.layers[0].k.raw.shape[1]).tobytes())  # layer 0 K
    patched = q_raw[:at] + np.int32(10).tobytes() + q_raw[at + 4:]                                 # ggml q2_K
    with pytest.raises(ValueError, match="ggml type 10"):
        read_state(patched)


def test_an_empty_sequence_has_no_stream(llama_pair):
    state = KVState(streams=[None], container="seq_data", seq_id=0)
    assert read_state(write_state(state)).streams == [None]
    with pytest.raises(ValueError, match="0 streams"):
        state.layers
