"""One function per split-state rule of ggml's meta backend (the `handle_*` lambdas of
`ggml_backend_meta_get_split_state`, ggml/src/ggml-backend-meta.cpp), in both code versions:

- "0.3.24": llama-cpp-python 0.3.24 (llama.cpp 2026-06-01): no `nr`, the older reshape/cpy/FA rules.
- "0.3.36": llama-cpp-python 0.3.36 (October 2026, after PR #23792): segments repeat `nr` times.

Each rule takes a `Rule` context (the tensor, its sources' states, the era's switches) and returns the
state ggml returns *before* the common post-pass (`apply_ratio`), which rescales the per-device counts.
Where ggml asserts or aborts, the rule raises `RuleFailure` with ggml's own condition text.
"""
from dataclasses import dataclass
from math import prod

from kvlab.split.state import Axis, SplitState, split_states_equal


class RuleFailure(Exception):
    """A GGML_ASSERT/GGML_ABORT of a rule: `condition` is ggml's text, `hint` says what would make it pass."""

    def __init__(self, condition: str, hint: str = ""):
        self.condition, self.hint = condition, hint
        super().__init__(condition)


def require(ok: bool, condition: str, hint: str = "") -> None:
    if not ok:
        raise RuleFailure(f"GGML_ASSERT({condition}) failed", hint)


def abort(message: str, hint: str = ""):
    raise RuleFailure(f'GGML_ABORT("{message}")', hint)


@dataclass
class Rule:
    tensor: object            # graph.Tensor
    src_ss: list              # SplitState per source slot (None where the source is absent or the tensor itself)
    n_devices: int
    version: str              # "0.3.24" or "0.3.36"
    mirrored_batched_mul_mat: bool = False   # PR #23225's added mul_mat rule
    assume_sync: bool = True

    @property
    def new(self) -> bool:
        return self.version == "0.3.36"

    def state(self, axis, nr: int = 1) -> SplitState:
        """A fresh state {axis, {0}, {nr}, 1}; the post-pass fills in the counts."""
        return SplitState(Axis(axis), ((0,) * self.n_devices,), (nr,))

    def src(self, i: int):
        return self.tensor.src[i]


def _is_dim(ss) -> bool:
    return ss is not None and ss.axis.is_dim


def _present(r: Rule):
    """(index, state) of the real sources (ggml skips nullptr and the tensor itself)."""
    return [(i, ss) for i, ss in enumerate(r.src_ss) if ss is not None]


def handle_generic(r: Rule, scalar_only: bool) -> SplitState:
    """handle_generic: all sources must have equal states; scalar_only ops cannot keep a dim split."""
    ret = None
    for _, ss in _present(r):
        if ret is None:
            ret = ss
        elif not split_states_equal(ss, ret):
            ret = None
            break
    if ret is not None and scalar_only and ret.axis.is_dim:
        ret = None
    if ret is None:
        why = ("this op cannot run on data split along a tensor dimension" if scalar_only else
               "its sources are split differently")
        require(False, "ret.axis != GGML_BACKEND_SPLIT_AXIS_UNKNOWN",
                f"{r.tensor.op} is handled generically and {why}: make the sources' split states equal "
                "(all MIRRORED, or all split alike)")
    return ret


def handle_per_row(r: Rule) -> SplitState:
    """handle_per_row (NORM, RMS_NORM, SUM_ROWS, ARGSORT, ...): a row must not be cut across devices."""
    require(r.src_ss[0].axis != Axis.AXIS_0, "src_ss[0].axis != GGML_BACKEND_SPLIT_AXIS_0",
            "a per-row op needs whole rows on each device; dim 0 is split (e.g. one KV head over several devices)")
    return r.src_ss[0]


def handle_bin_bcast(r: Rule) -> SplitState:
    """handle_bin_bcast (ADD, SUB, MUL, DIV): a MIRRORED src1 of size 1 on the split dim broadcasts."""
    s0, s1 = r.src_ss[0], r.src_ss[1]
    s2 = r.src_ss[2] if len(r.src_ss) > 2 else None
    if _is_dim(s0) and r.src(1).ne[s0.axis] == 1 and s1.axis == Axis.MIRRORED:
        return s0
    if s2 is not None and s2.axis == Axis.MIRRORED and (
            s0.axis == s1.axis or (s0.axis == Axis.MIRRORED and s1.axis == Axis.PARTIAL)):
        return s0   # ADD_ID
    require(s2 is None or s2.axis == Axis.MIRRORED,
            "tensor->src[2] == nullptr || src_ss[2].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED")
    return handle_generic(r, scalar_only=False)


def handle_mul_mat(r: Rule) -> SplitState:
    """handle_mul_mat: src0 = matrix (weight), src1 = activations."""
    s0, s1 = r.src_ss[0], r.src_ss[1]
    M = Axis.MIRRORED
    if s0.axis == M and s1.axis == M:
        return r.state(M)
    if s0.axis == Axis.AXIS_1 and s1.axis == M:           # column-parallel: weight rows split
        return SplitState(Axis.AXIS_0, s0.ne[:1], (1,))
    if s1.axis == Axis.AXIS_1 and s0.axis == M:           # activations split along their rows
        return s1 if r.new else SplitState(s1.axis, s1.ne[:1], (1,))
    if s0.axis == Axis.AXIS_0 and s1.axis == Axis.AXIS_0:  # row-parallel: partial sums
        require(split_states_equal(s0, s1), "split_states_equal(src_ss[0], src_ss[1])",
                "both operands must split the contraction dim the same way")
        return r.state(M if r.assume_sync else Axis.PARTIAL)
    if r.new:
        if s0.axis == s1.axis and s0.axis in (Axis.AXIS_2, Axis.AXIS_3):
            require(split_states_equal(s0, s1), "split_states_equal(src_ss[0], src_ss[1])")
            return s0
        if s0.axis in (Axis.AXIS_2, Axis.AXIS_3) and s1.axis == M:   # split batches x replicated activation
            return s0
    elif r.mirrored_batched_mul_mat and s0.axis == M and s1.axis in (Axis.AXIS_2, Axis.AXIS_3):
        return s1   # PR #23225: a mirrored matrix applied per batch slice keeps the batch split
    hint = ("mul_mat has no rule for these states; a MIRRORED matrix times activations split on axis "
            f"{s1.axis.label} is what a 4D rotation produces (PR #23225 added that rule; 0.3.36 has no such "
            "rule, it keeps the 2D rotation and tracks the layout with nr)")
    if r.new:
        abort(f"unsupported mul_mat split states: node={r.tensor.name} src0={r.src(0).name} "
              f"axis={int(s0.axis)} src1={r.src(1).name} axis={int(s1.axis)}", hint)
    abort("fatal error", hint)


def _reshape_0324(r: Rule) -> SplitState:
    t, src, s0 = r.tensor, r.src(0), r.src_ss[0]
    require(not t.is_permuted and not src.is_permuted,
            "!ggml_is_permuted(tensor) && !ggml_is_permuted(tensor->src[0])")
    if s0.axis == src.n_dims - 1:
        return r.state(t.n_dims - 1)
    # prod(ne[0..axis]) and every wider prefix product of the source (ggml also reads one entry past
    # ne[3], i.e. nb[0]; that product exceeds the element count and can never match, so it is left out)
    base_in = [prod(src.ne[: s0.axis + 1])]
    for dim in range(s0.axis + 1, 4):
        base_in.append(base_in[-1] * src.ne[dim])
    base_out = 1
    for dim in range(4):
        base_out *= t.ne[dim]
        if base_out in base_in:
            return r.state(dim)
        if base_out > base_in[0]:
            require(dim + 1 < 4, "dim + 1 < GGML_MAX_DIMS")
            return r.state(dim + 1)
    abort(f"shape mismatch for {t.op}")


def _reshape_0336(r: Rule) -> SplitState:
    t, src, s0 = r.tensor, r.src(0), r.src_ss[0]
    base_in = prod(src.ne[: s0.axis + 1])
    if s0.n_segments == 1:
        base_in //= s0.nr[0]
        if s0.axis == src.n_dims - 1 and s0.nr[0] == 1:
            return r.state(t.n_dims - 1)
        if s0.axis == Axis.AXIS_0 and t.ne[0] == src.ne[0] and t.ne[1] == 1 and s0.nr[0] == 1:
            if all(n in (0, src.ne[0]) for n in s0.ne[0]):
                return r.state(Axis.AXIS_1)   # a complete dim-0 split moves to the following singleton dim
    base_out = 1
    for dim in range(4):
        base_out *= t.ne[dim]
        if base_out % base_in == 0:
            return r.state(dim, nr=base_out // base_in)
        if base_out > base_in:
            require(s0.n_segments == 1, "src_ss[0].n_segments == 1")
            require(s0.nr[0] == 1, "src_ss[0].nr[0] == 1")
            return r.state(dim)
    abort(f"shape mismatch for {t.op}")


def handle_reshape(r: Rule) -> SplitState:
    """handle_reshape (RESHAPE, CONT): where does the split dim of the source land in the new shape?"""
    s0 = r.src_ss[0]
    if s0.axis in (Axis.MIRRORED, Axis.PARTIAL):
        return s0
    if not s0.axis.is_dim:
        abort("fatal error")
    return _reshape_0336(r) if r.new else _reshape_0324(r)


def handle_cpy(r: Rule) -> SplitState:
    """handle_cpy (CPY, e.g. ggml_cast): 0.3.36 treats a split copy as a reshape; 0.3.24 finds the dst dim
    whose prefix product equals the source's prefix product up to the split axis."""
    t, src, s0 = r.tensor, r.src(0), r.src_ss[0]
    if s0.axis.is_dim:
        if r.new:
            return handle_reshape(r)
        ne_split_src = prod(src.ne[: s0.axis + 1])
        ne_split_dst = 1
        for dim in range(4):
            ne_split_dst *= t.ne[dim]
            if ne_split_dst == ne_split_src:
                return r.state(dim)
    return handle_generic(r, scalar_only=False)


def handle_view(r: Rule) -> SplitState:
    """handle_view: contiguous views are reshapes; equal strides keep the state; otherwise match strides."""
    t, src, s0 = r.tensor, r.src(0), r.src_ss[0]
    if t.is_contiguous and src.is_contiguous:
        return handle_reshape(r)
    if all(t.nb[d] == src.nb[d] for d in range(4) if not (t.ne[d] == 1 and src.ne[d] == 1)):
        return s0
    if not t.is_permuted and not src.is_permuted and s0.axis.is_dim and s0.axis < 3:
        for dim in range(3):
            if t.nb[dim + 1] == src.nb[s0.axis + 1]:
                return r.state(dim)
        abort("fatal error")
    if s0.axis in (Axis.MIRRORED, Axis.PARTIAL):
        return s0
    abort("view of permuted tensor not implemented")


def handle_permute(r: Rule) -> SplitState:
    """handle_permute: the split axis moves to op_params[axis]; 0.3.36 keeps nr (one segment only)."""
    s0 = r.src_ss[0]
    if s0.axis.is_dim:
        if r.new:
            require(s0.n_segments == 1 or s0.nr[0] == 1, "src_ss[0].n_segments == 1 || src_ss[0].nr[0] == 1")
            return r.state(r.tensor.op_params[s0.axis], nr=s0.nr[0])
        return r.state(r.tensor.op_params[s0.axis])
    if s0.axis in (Axis.MIRRORED, Axis.PARTIAL):
        return s0
    abort("fatal error")


def handle_transpose(r: Rule) -> SplitState:
    """handle_transpose: axes 0 and 1 swap; 2, 3, MIRRORED and PARTIAL stay."""
    s0 = r.src_ss[0]
    if s0.axis in (Axis.AXIS_0, Axis.AXIS_1):
        if r.new:
            require(s0.n_segments == 1 or s0.nr[0] == 1, "src_ss[0].n_segments == 1 || src_ss[0].nr[0] == 1")
            return r.state(int(s0.axis) ^ 1, nr=s0.nr[0])
        return r.state(int(s0.axis) ^ 1)
    return s0


def handle_get_rows(r: Rule) -> SplitState:
    """handle_get_rows: a table split on dim 0 with mirrored indices stays split; else generic scalar-only."""
    if r.src_ss[0].axis == Axis.AXIS_0 and r.src_ss[1].axis == Axis.MIRRORED:
        return r.src_ss[0]
    return handle_generic(r, scalar_only=True)


def handle_set_rows(r: Rule) -> SplitState:
    """handle_set_rows: src0 = values, src1 = row indices, src2 = destination (the KV cache)."""
    s0, s1, s2 = r.src_ss[0], r.src_ss[1], r.src_ss[2]
    require(s0.axis != Axis.AXIS_1, "src_ss[0].axis != GGML_BACKEND_SPLIT_AXIS_1",
            "the values written into the cache are split along their rows (dim 1 = tokens); they must be "
            "split like the cache rows (dim 0 = heads). After a 2D flatten only #23792's nr (or #23225's 4D "
            "rotation) keeps the head split")
    require(s1.axis == Axis.MIRRORED, "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED",
            "every device needs all row indices")
    require(split_states_equal(s0, s2), "split_states_equal(src_ss[0], src_ss[2])",
            f"values ({s0.describe()}) must be split exactly like the cache ({s2.describe()})")
    return s0


def handle_rope(r: Rule) -> SplitState:
    """handle_rope: positions must be mirrored; the result keeps src0's state."""
    require(r.src_ss[1].axis == Axis.MIRRORED, "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED")
    return r.src_ss[0]


def handle_pad(r: Rule) -> SplitState:
    """handle_pad: no padding on the split dim."""
    s0 = r.src_ss[0]
    if s0.axis.is_dim:
        p = r.tensor.op_params
        require(p[2 * s0.axis] == 0 and p[2 * s0.axis + 1] == 0, "tensor->op_params[2*axis] == 0 (no padding)")
    return s0


def handle_flash_attn_ext(r: Rule) -> SplitState:
    """handle_flash_attn_ext: Q, K, V split by heads (dim 2 after the permute), mask mirrored -> dim 1."""
    ss = r.src_ss + [None] * (5 - len(r.src_ss))
    q, k, v, mask, sinks = ss[:5]
    M, A2 = Axis.MIRRORED, Axis.AXIS_2
    hint = ("flash attention runs head-parallel: Q, K and V must all be split on dim 2 (heads after the "
            f"permute); got Q {q.describe()}, K {k.describe()}, V {v.describe()}")
    if r.new:
        require(mask is None or mask.axis == M,
                "tensor->src[3] == nullptr || src_ss[3].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED")
        if q.axis == M:
            require(k.axis == M, "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED", hint)
            require(v.axis == M, "src_ss[2].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED", hint)
            require(sinks is None or sinks.axis == M,
                    "tensor->src[4] == nullptr || src_ss[4].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED")
            return r.state(M)
        require(q.axis == A2, "src_ss[0].axis == GGML_BACKEND_SPLIT_AXIS_2", hint)
        require((k.axis == A2 and v.axis == A2) or (k.axis == M and v.axis == M), "kv_split || kv_mirrored", hint)
        require(sinks is None or sinks.axis == Axis.AXIS_0,
                "tensor->src[4] == nullptr || src_ss[4].axis == GGML_BACKEND_SPLIT_AXIS_0")
        return r.state(Axis.AXIS_1)
    require(q.axis == A2, "src_ss[0].axis == GGML_BACKEND_SPLIT_AXIS_2", hint)
    require(k.axis == A2, "src_ss[1].axis == GGML_BACKEND_SPLIT_AXIS_2", hint)
    require(v.axis == A2, "src_ss[2].axis == GGML_BACKEND_SPLIT_AXIS_2", hint)
    # 0.3.24 checks the mask only when sinks are present (`tensor->src[4] == nullptr || src_ss[3]...`)
    require(sinks is None or mask.axis == M,
            "tensor->src[4] == nullptr || src_ss[3].axis == GGML_BACKEND_SPLIT_AXIS_MIRRORED")
    require(sinks is None or sinks.axis == Axis.AXIS_0,
            "tensor->src[4] == nullptr || src_ss[4].axis == GGML_BACKEND_SPLIT_AXIS_0")
    return r.state(Axis.AXIS_1)


# op -> (rule, C source it models); ops not listed abort with "ggml op not implemented"
RULES = {
    "ADD": handle_bin_bcast, "SUB": handle_bin_bcast, "MUL": handle_bin_bcast, "DIV": handle_bin_bcast,
    "MUL_MAT": handle_mul_mat,
    "CPY": handle_cpy,
    "CONT": handle_reshape, "RESHAPE": handle_reshape,
    "VIEW": handle_view, "PERMUTE": handle_permute, "TRANSPOSE": handle_transpose,
    "GET_ROWS": handle_get_rows, "SET_ROWS": handle_set_rows,
    "ROPE": handle_rope, "PAD": handle_pad,
    "FLASH_ATTN_EXT": handle_flash_attn_ext,
    "SCALE": lambda r: handle_generic(r, False), "SOFT_MAX": lambda r: handle_generic(r, False),
    "UNARY": lambda r: handle_generic(r, False), "GLU": lambda r: handle_generic(r, False),
    "NORM": handle_per_row, "RMS_NORM": handle_per_row, "SUM_ROWS": handle_per_row, "ARGSORT": handle_per_row,
    "DUP": lambda r: handle_generic(r, True), "SUM": lambda r: handle_generic(r, True),
}


def c_function(op: str) -> str:
    rule = RULES.get(op)
    if rule is None:
        return "ggml_backend_meta_get_split_state (default case)"
    name = getattr(rule, "__name__", "")
    if name == "<lambda>":
        return "handle_per_row" if op in ("NORM", "RMS_NORM", "SUM_ROWS", "ARGSORT") else "handle_generic"
    return name


def apply_ratio(r: Rule, state: SplitState) -> SplitState:
    """The post-pass of calculate_split_state: per-device counts taken over, in proportion, from the first
    source split on a dim; every further split source must have the same ratio."""
    if not state.axis.is_dim:
        return state
    t, n = r.tensor, r.n_devices
    flat = [c for seg in state.ne for c in seg] + [0] * (16 * n)   # ggml's ne[s*n + j]
    nr0 = state.nr[0] if r.new else 1
    first = True
    for i, ss in _present(r):
        if not ss.axis.is_dim:
            continue
        src_ne = r.src(i).ne[ss.axis]
        if first:
            for j in range(n):
                for s in range(ss.n_segments):
                    flat[s * n + j] = 0
                v = ss.device_ne(j) * t.ne[state.axis]
                if v != 0 or src_ne != 0:
                    div = src_ne * nr0
                    require(v % div == 0, "split_state.ne[j] % div == 0" if r.new else
                            "split_state.ne[j] % tensor->src[i]->ne[src_ss[i].axis] == 0",
                            f"device {j} would hold {v}/{div} of a unit of {t.name!r}: the split no longer "
                            "falls on whole rows of the new shape (the flattened layout was lost)")
                    v //= div
                flat[j] = v
        else:
            if r.new:
                require(state.n_segments == 1, "split_state.n_segments == 1")
            for j in range(n):
                require(flat[j] * nr0 * src_ne == ss.device_ne(j) * t.ne[state.axis],
                        "split_state.ne[j]*split_state.nr[0] * tensor->src[i]->ne[src_ss[i].axis] == "
                        "sum * tensor->ne[split_state.axis]" if r.new else
                        "split_state.ne[j] * tensor->src[i]->ne[src_ss[i].axis] == sum * tensor->ne[split_state.axis]",
                        "two split sources disagree on how the result is divided")
        first = False
    require(not first, "!first_src_split_by_axis", "a split result needs at least one split source")
    ne = tuple(tuple(flat[s * n:(s + 1) * n]) for s in range(state.n_segments))
    return SplitState(state.axis, ne, state.nr if r.new else (1,) * state.n_segments)
