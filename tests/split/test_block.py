"""The attention block in all three eras: the PR #23792 worked example (K [128, 8, T] split by heads,
flattened to 2D, rotated, reshaped back) traced by hand, the init guard, the CUDA FA answer, the
compatibility matrix and the CLI."""
import json

import pytest

from kvlab.split import Axis, BlockConfig, SplitState, build_attention_block
from kvlab.cli import build_parser
from kvlab.split.compat import compat_matrix
from kvlab.split.cuda import cuda_flash_attn

A1 = Axis.AXIS_1


def k_trace(era, T):
    cfg = BlockConfig(era=era, n_devices=2, head_dim=128, n_head=32, n_head_kv=8, type_k="q8_0", type_v="q8_0",
                      n_tokens=T, guard=False)
    b = build_attention_block(cfg)
    return b.trace()


def test_worked_example_pr23792():     # 0.3.36: the flatten keeps the head split as {4, 4} x nr T
    tr = k_trace("pr23792", 6)
    assert tr.ok
    assert tr.state_of("Kcur-0 (rope)") == SplitState.split(1, (4, 4))
    assert tr.state_of("Kcur-0 (rot in)") == SplitState(A1, ((4, 4),), (6,))     # [128, 48]
    assert tr.state_of("Kcur-0 (rot)") == SplitState(A1, ((4, 4),), (6,))
    assert tr.state_of("Kcur-0 (rot out)") == SplitState.split(1, (4, 4))         # heads again
    assert tr.state_of("Kcur-0 (rot out) (view)") == SplitState.split(0, (512, 512))   # = the cache's split
    assert tr.state_of("kqv_out-0 (rot in)") == SplitState(A1, ((32, 32),), (6,))  # [64, 384] output un-rotation
    out = tr.nodes[-1]
    assert (out.state.axis, out.local.axis) == (Axis.MIRRORED, Axis.PARTIAL)        # wo: partial sums, all-reduce


def test_worked_example_flatten():     # 0.3.24: the flatten moves the split onto tokens, set_rows stops
    tr = k_trace("flatten", 6)
    assert tr.state_of("Kcur-0 (rot in)") == SplitState.split(1, (24, 24))        # 4 heads x 6 tokens, interleaved
    assert tr.state_of("Kcur-0 (rot out)") == SplitState.split(2, (3, 3))         # tokens, not heads
    assert tr.error.node == "cache_k_l0 (set_rows)" and tr.error.op == "SET_ROWS"
    assert "src_ss[0].axis != GGML_BACKEND_SPLIT_AXIS_1" in tr.error.rule
    assert "handle_set_rows" in str(tr.error) and "cache_k_l0: AXIS_0 {512, 512}" in str(tr.error)
    odd = k_trace("flatten", 7)                    # 4*7*7 / 56 is not whole: the ratio assert fires earlier
    assert odd.error.node == "Qcur-0 (rot out)" and odd.error.op == "RESHAPE"
    assert k_trace("flatten", 1).ok                # decode: reshape_2d keeps axis 1 = heads, nothing breaks


def test_worked_example_pr23225():     # 0.3.24 + 4D rotation: heads become dim 2, the new mul_mat rule keeps it
    tr = k_trace("pr23225", 6)
    assert tr.ok
    assert tr.nodes[[n.tensor.name for n in tr.nodes].index("Kcur-0 (rot in)")].tensor.ne == (128, 1, 8, 6)
    assert tr.state_of("Kcur-0 (rot in)") == SplitState.split(2, (4, 4))
    assert tr.state_of("Kcur-0 (rot)") == SplitState.split(2, (4, 4))
    assert tr.state_of("Kcur-0 (rot out)") == SplitState.split(1, (4, 4))


def test_init_guards():                # llama_init_from_model, 0.3.24 vs 0.3.36
    assert "KV cache quantization not implemented" in str(build_attention_block(era="flatten", type_v="q4_0").init_error)
    assert build_attention_block(era="flatten", type_k="bf16", type_v="f16").init_error is None
    assert build_attention_block(era="flatten", type_v="q4_0", guard=False).init_error is None
    assert build_attention_block(era="pr23792", type_k="q4_1", type_v="q5_1").init_error is None
    assert "does not divide n_embd_head_k=80" in str(build_attention_block(head_dim=80, type_k="q8_0").init_error)


def test_uneven_split_rotates_with_layer():   # get_il_eff(il) % n_devices picks who takes the remainder
    cfg = BlockConfig(n_devices=3, n_head=32, n_head_kv=8, type_k="q8_0", type_v="q8_0", n_tokens=5)
    for layer, heads in ((0, (2, 3, 3)), (1, (3, 2, 3)), (2, (3, 3, 2))):
        b = build_attention_block(cfg, layer=layer)
        tr = b.trace()
        assert tr.ok
        assert tr.state_of(f"cache_k_l{layer} (view) (permuted)") == SplitState.split(2, heads)
        assert tr.state_of(f"q-{layer} (permuted)") == SplitState.split(2, tuple(4 * h for h in heads))


def test_cuda_flash_attn_per_version():      # fattn.cu 0.3.24 / 0.3.36, GGML_CUDA_FA_QUANTS
    assert not cuda_flash_attn("q8_0", "q4_0", era="pr23225").runs
    assert cuda_flash_attn("q8_0", "q4_0", era="pr23225", all_quants=True).runs
    assert not cuda_flash_attn("q4_1", "q4_1", era="pr23225").runs
    assert cuda_flash_attn("f32", "f16", era="flatten").runs          # f32 is cast to f16 before FA
    slow = cuda_flash_attn("q8_0", "q4_0", era="pr23792")
    assert slow.runs and slow.kernel == "f16 conversion" and "GGML_CUDA_FA_QUANTS" in slow.reason
    assert cuda_flash_attn("q8_0", "q4_0", era="pr23792", fa_quants="q8_0-q4_0").kernel == "vec"
    assert not cuda_flash_attn("iq4_nl", "iq4_nl", era="pr23792").runs
    with pytest.raises(ValueError):
        cuda_flash_attn("q8_0", "q8_0", fa_quants="q8_0+q4_0")


def test_compat_matrix_shape_and_verdicts():
    rows = compat_matrix(devices=(1, 2, 3, 4, 8), n_tokens=512)
    assert len(rows) == 3 * 81 * 5 * 2
    by = {(r.era, r.type_k, r.type_v, r.devices, r.rotation): r for r in rows}
    assert by[("flatten", "q8_0", "q8_0", 2, True)].outcome == "refused at init"
    assert "SET_ROWS" in by[("flatten", "q8_0", "q8_0", 2, True)].split       # what the guard was hiding
    assert by[("flatten", "q8_0", "q8_0", 2, False)].split == ""              # no rotation, no abort
    assert by[("pr23225", "q8_0", "q8_0", 4, True)].outcome == "runs"
    assert by[("pr23225", "q8_0", "q4_0", 4, True)].outcome == "no CUDA FA kernel"   # the #23225 thread
    assert by[("pr23792", "q8_0", "q4_0", 8, True)].outcome == "runs (slow FA)"
    assert by[("pr23792", "iq4_nl", "iq4_nl", 2, True)].outcome == "no CUDA FA kernel"
    assert not any(r.split for r in rows if r.era != "flatten")


def cli_run(capsys, *argv):
    args = build_parser().parse_args(argv)
    rc = args.run(args)
    return rc, capsys.readouterr().out


def test_cli_trace_json(capsys):
    rc, out = cli_run(capsys, "trace", "--era", "pr23792", "--devices", "2", "--head-dim", "128", "--n-head", "32",
                      "--n-head-kv", "8", "--ctk", "q8_0", "--ctv", "q4_0", "--n-tokens", "4", "--format", "json")
    objs = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and all({"name", "op", "ne", "axis", "split_ne", "nr"} <= o.keys() for o in objs)
    flat = next(o for o in objs if o["name"] == "Kcur-0 (rot in)")
    assert (flat["op"], flat["ne"], flat["axis"], flat["split_ne"], flat["nr"]) == \
        ("RESHAPE", [128, 32, 1, 1], "1", [[4, 4]], [4])


def test_cli_trace_failure_exits_nonzero(capsys):
    rc, out = cli_run(capsys, "trace", "--era", "flatten", "--ctk", "q8_0", "--ctv", "q8_0", "--n-tokens", "8",
                      "--no-guard", "--format", "json")
    last = json.loads(out.splitlines()[-1])
    assert rc == 1 and last["op"] == "SET_ROWS" and "GGML_ASSERT" in last["error"]
    rc, out = cli_run(capsys, "trace", "--era", "flatten", "--ctk", "q8_0")
    assert rc == 1 and "simultaneous use of SPLIT_MODE_TENSOR" in out


def test_cli_compat_text(capsys):
    rc, out = cli_run(capsys, "compat", "--era", "pr23225", "--devices", "2,4", "--n-tokens", "8")
    assert rc == 0 and "rows K, columns V" in out and "q8_0" in out


@pytest.mark.parametrize("era, ok", [("flatten", False), ("pr23225", False), ("pr23792", True)])
def test_single_kv_head(era, ok):     # handle_reshape 0.3.36 "complete dim-0 split" case vs 0.3.24
    b = build_attention_block(era=era, head_dim=64, n_head=4, n_head_kv=1, n_devices=2, n_tokens=4, n_kv=8)
    tr = b.trace()
    if ok:
        assert tr.state_of("cache_k_l0 (view) (permuted)") == SplitState.split(2, (0, 1))   # the one head on device 1
    else:   # ggml_n_dims drops the size-1 head dim: K stays split on dim 0 and FA refuses it
        assert tr.error.op == "FLASH_ATTN_EXT" and "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_2" in tr.error.rule
