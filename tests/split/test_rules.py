"""Rule-by-rule tests of kvlab.split against ggml-backend-meta.cpp (0.3.24 and 0.3.36); each test names the
C function it mirrors. Expected states are worked out by hand from the C code."""
import pytest

from kvlab.split import Axis, SplitError, SplitState, graph as g, split_states_equal, trace
from kvlab.split.static import granularity, split_counts

M = Axis.MIRRORED


def run(nodes, era, n=2, static=None):
    gr = g.Graph()
    gr.expand(nodes)
    return trace(gr, era, n, static or {})


def leaf(name, ne, state=None, static=None, type="f32"):
    t = g.new_tensor(name, type, ne, static=state is not None)
    if state is not None:
        static[id(t)] = state
    return t


def test_split_states_equal_sums_segments_times_nr():   # split_states_equal
    a = SplitState(Axis.AXIS_1, ((4, 4),), (7,))
    b = SplitState.split(1, (28, 28))
    assert split_states_equal(a, b)
    assert not split_states_equal(a, SplitState.split(1, (27, 29)))
    assert not split_states_equal(b, SplitState.split(0, (28, 28)))
    assert SplitState(Axis.AXIS_0, ((2, 1), (3, 3)), (1, 2)).per_device == (8, 7)


def test_describe_and_ggml_debug_format():              # GGML_META_DEBUG line format
    s = SplitState(Axis.AXIS_1, ((4, 4),), (7,))
    assert s.describe() == "AXIS_1 {4, 4} x nr 7 (28, 28 per device)"
    assert s.ggml_debug() == "1, {4x7, 4x7}"
    assert SplitState.mirrored(2).describe() == "MIRRORED"


@pytest.mark.parametrize("era", ["flatten", "pr23792"])
def test_mul_mat_column_parallel(era):                  # handle_mul_mat: src0 AXIS_1 x src1 MIRRORED -> AXIS_0
    st = {}
    w = leaf("w", (64, 96), SplitState.split(1, (32, 64)), st)
    x = leaf("x", (64, 5))
    tr = run(g.mul_mat(w, x, name="y"), era, static=st)
    assert tr.state_of("y") == SplitState.split(0, (32, 64))


@pytest.mark.parametrize("era", ["flatten", "pr23792"])
def test_mul_mat_row_parallel_is_partial_until_synced(era):   # handle_mul_mat: AXIS_0 x AXIS_0 -> PARTIAL / MIRRORED
    st = {}
    w = leaf("w", (64, 16), SplitState.split(0, (32, 32)), st)
    x = leaf("x", (64, 5), SplitState.split(0, (32, 32)), st)
    node = run(g.mul_mat(w, x, name="y"), era, static=st).nodes[-1]
    assert (node.state.axis, node.local.axis) == (M, Axis.PARTIAL)
    st[id(x)] = SplitState.split(0, (16, 48))
    assert "split_states_equal(src_ss[0], src_ss[1])" in run(g.mul_mat(w, x), era, static=st).error.rule


@pytest.mark.parametrize("era, ok", [("flatten", False), ("pr23225", True), ("pr23792", False)])
def test_mul_mat_mirrored_times_axis2(era, ok):         # handle_mul_mat: the rule PR #23225 added
    st = {}
    rot = leaf("rot", (128, 128))
    x = leaf("x", (128, 1, 8, 5), SplitState.split(2, (4, 4)), st)
    tr = run(g.mul_mat(rot, x, name="y"), era, static=st)
    if ok:
        assert tr.state_of("y") == SplitState.split(2, (4, 4))
    else:
        assert tr.error.op == "MUL_MAT" and "GGML_ABORT" in tr.error.rule


def test_mul_mat_split_batches_times_mirrored_only_in_0336():   # handle_mul_mat (0.3.36 batched rule)
    st = {}
    a = leaf("a", (16, 16, 8), SplitState.split(2, (4, 4)), st)
    b = leaf("b", (16, 3, 8))
    assert run(g.mul_mat(a, b, name="y"), "pr23792", static=st).state_of("y").axis == Axis.AXIS_2
    assert run(g.mul_mat(a, b, name="y"), "flatten", static=st).error is not None


def kcur(T, st):   # K [128, 8, T] split by heads, as after reshape_3d of the K projection
    return leaf("k_cur", (128, 8, T), SplitState.split(1, (4, 4)), st)


@pytest.mark.parametrize("T", [1, 6])
def test_reshape_0336_flatten_keeps_heads_with_nr(T):   # handle_reshape (0.3.36): base_ne_out % base_ne_in -> nr
    st = {}
    flat = g.reshape(kcur(T, st), 128, 8 * T, name="flat")
    back = g.reshape(flat, 128, 8, T, name="back")
    tr = run(back, "pr23792", static=st)
    assert tr.state_of("flat") == SplitState(Axis.AXIS_1, ((4, 4),), (T,))
    assert tr.state_of("back") == SplitState.split(1, (4, 4))


def test_reshape_0324_flatten_moves_split_to_tokens():  # handle_reshape (0.3.24): n_dims - 1 case
    st = {}
    flat = g.reshape(kcur(8, st), 128, 64, name="flat")
    back = g.reshape(flat, 128, 8, 8, name="back")
    tr = run(back, "flatten", static=st)
    assert tr.state_of("flat") == SplitState.split(1, (32, 32))        # 4 heads x 8 tokens, misdescribed
    assert tr.state_of("back") == SplitState.split(2, (4, 4))          # tokens, not heads


def test_reshape_0324_ratio_assert_on_odd_batch():      # calculate_split_state post-pass divisibility assert
    st = {}
    back = g.reshape(g.reshape(kcur(7, st), 128, 56, name="flat"), 128, 8, 7, name="back")
    err = run(back, "flatten", static=st).error
    assert err.node == "back" and "% tensor->src[i]->ne[src_ss[i].axis] == 0" in err.rule


def test_reshape_0336_complete_rows_move_to_singleton():   # handle_reshape (0.3.36) complete_rows case
    st = {}
    x = leaf("x", (64, 2), SplitState.split(0, (64, 0)), st)      # all of dim 0 on device 0
    tr = run(g.reshape(x, 64, 1, 2, name="r"), "pr23792", static=st)
    assert tr.state_of("r") == SplitState.split(1, (1, 0))
    assert run(g.reshape(x, 64, 1, 2, name="r"), "flatten", static=st).state_of("r").axis == Axis.AXIS_0


def test_reshape_0324_asserts_not_permuted():           # handle_reshape (0.3.24) permuted assert, via CONT
    st = {}
    p = g.permute(kcur(4, st), 0, 2, 1, 3)
    c = g.cont(p, 128, 32, name="c")
    # CONT is handled as a reshape; the permuted source trips 0.3.24's assert, 0.3.36 has none
    assert "ggml_is_permuted" in run(c, "flatten", static=st).error.rule
    assert run(c, "pr23792", static=st).error is None


@pytest.mark.parametrize("era", ["flatten", "pr23792"])
def test_permute_moves_axis(era):                       # handle_permute: axis -> op_params[axis]
    st = {}
    tr = run(g.permute(kcur(4, st), 0, 2, 1, 3, name="p"), era, static=st)
    assert tr.state_of("p") == SplitState.split(2, (4, 4))


def test_transpose_swaps_0_and_1():                     # handle_transpose
    st = {}
    x = leaf("x", (8, 6), SplitState.split(0, (4, 4)), st)
    assert run(g.transpose(x, name="t"), "pr23792", static=st).state_of("t") == SplitState.split(1, (4, 4))


def test_view_of_cache_is_a_reshape():                  # handle_view -> handle_reshape (contiguous view)
    st = {}
    cache = leaf("cache_k_l0", (1024, 256, 1), SplitState.split(0, (512, 512)), st, type="q8_0")
    rs = g.row_size("q8_0", 128)
    v = g.view(cache, (128, 8, 256, 1), (rs, rs * 8, rs * 8 * 256), name="v")
    for era in ("flatten", "pr23792"):
        assert run(v, era, static=st).state_of("v") == SplitState.split(1, (4, 4))


def test_view_of_permuted_split_tensor_aborts():        # handle_view: "view of permuted tensor not implemented"
    st = {}
    p = g.permute(kcur(4, st), 0, 2, 1, 3)
    v = g.view(p, (128, 4, 4, 1), (p.nb[1], 2 * p.nb[2]), name="v")   # strides differ, still permuted
    assert "view of permuted tensor not implemented" in run(v, "pr23792", static=st).error.rule


def test_set_rows_rules():                              # handle_set_rows: three asserts
    st = {}
    cache = leaf("cache", (1024, 16, 1), SplitState.split(0, (512, 512)), st)
    idx = leaf("idx", (4,), type="i64")
    good = leaf("vals", (1024, 4), SplitState.split(0, (512, 512)), st)
    assert run(g.set_rows(cache, good, idx, name="s"), "pr23792", static=st).error is None
    uneven = leaf("vals2", (1024, 4), SplitState.split(0, (256, 768)), st)
    assert "split_states_equal(src_ss[0], src_ss[2])" in run(g.set_rows(cache, uneven, idx), "pr23792", static=st).error.rule
    by_token = leaf("vals3", (1024, 4), SplitState.split(1, (2, 2)), st)
    assert "!= GGML_BACKEND_SPLIT_AXIS_1" in run(g.set_rows(cache, by_token, idx), "flatten", static=st).error.rule


def test_rope_needs_mirrored_positions():               # handle_rope
    st = {}
    pos = leaf("pos", (4,), SplitState.split(0, (2, 2)), st, type="i32")
    assert "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED" in run(g.rope(kcur(4, st), pos), "pr23792", static=st).error.rule


def test_flash_attn_ext_eras():                         # handle_flash_attn_ext: 0.3.36 accepts all-MIRRORED
    st = {}
    q, k, v = (leaf(n, (64, 4, 8, 1), SplitState.split(2, (4, 4)), st) for n in "qkv")
    mask = leaf("mask", (4, 4))
    assert run(g.flash_attn_ext(q, k, v, mask, 0.125, name="fa"), "flatten", static=st).state_of("fa") == \
        SplitState.split(1, (4, 4))
    qm, km, vm = (leaf(n, (64, 4, 8, 1)) for n in "QKV")
    assert run(g.flash_attn_ext(qm, km, vm, mask, 0.125, name="fa"), "pr23792").state_of("fa").axis == M
    assert "src_ss[0].axis == GGML_BACKEND_SPLIT_AXIS_2" in run(g.flash_attn_ext(qm, km, vm, mask, 0.125), "flatten").error.rule


def test_generic_and_per_row():                         # handle_generic / handle_per_row / handle_bin_bcast
    st = {}
    a = leaf("a", (8, 4), SplitState.split(1, (2, 2)), st)
    b = leaf("b", (8, 4), SplitState.split(1, (1, 3)), st)
    assert "UNKNOWN" in run(g.unary("SOFT_MAX", a, "sm", b), "pr23792", static=st).error.rule
    assert run(g.unary("RMS_NORM", a, "n"), "pr23792", static=st).state_of("n") == SplitState.split(1, (2, 2))
    c = leaf("c", (8, 4), SplitState.split(0, (4, 4)), st)
    assert "!= GGML_BACKEND_SPLIT_AXIS_0" in run(g.unary("RMS_NORM", c, "n"), "pr23792", static=st).error.rule
    bias = leaf("bias", (8, 1))
    assert run(g.binary("ADD", a, bias, "y"), "pr23792", static=st).state_of("y") == SplitState.split(1, (2, 2))


def test_unknown_op_aborts():                           # default case: "ggml op not implemented"
    x = leaf("x", (8, 4))
    err = run(g.unary("TURBO_WHT", x, "t"), "pr23792").error
    assert isinstance(err, SplitError) and "ggml op not implemented: TURBO_WHT" in err.rule


def test_granularity_rules():                           # llama_meta_device_get_split_state, get_split_granularity
    shape = dict(head_dim=128, n_head=32, n_head_kv=8, weight_block=1)
    assert granularity("kv", n_devices=3, version="0.3.36", **shape) == 128      # one KV head
    assert granularity("q", n_devices=3, version="0.3.36", **shape) == 512       # its GQA group of Q heads
    assert granularity("kv", n_devices=2, version="0.3.24", head_dim=80, n_head=8, n_head_kv=8, weight_block=1) == 80
    # 0.3.36 raises the block while it stays below 128 and does not underuse devices: 80 -> lcm(80, 64)
    assert granularity("kv", n_devices=2, version="0.3.36", head_dim=80, n_head=8, n_head_kv=8, weight_block=1) == 320
    assert split_counts(1024, 128, 3, 0) == (256, 384, 384)
    assert split_counts(1024, 128, 3, 1) == (384, 256, 384)   # layer 1: the remainder goes to another device
    assert split_counts(256, 128, 4, 0) == (0, 128, 0, 128)   # fewer KV heads than devices
