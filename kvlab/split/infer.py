"""Walk a graph in ggml's order and compute every tensor's split state as the meta backend does
(`ggml_backend_meta_get_split_state`): static tensors from llama.cpp's callback, inputs MIRRORED,
everything else from its op's rule plus the ratio post-pass. The first rule that fails stops the walk
with a SplitError, as the GGML_ASSERT/GGML_ABORT would stop llama.cpp.
"""
from dataclasses import dataclass, field

from kvlab.split.eras import get_era
from kvlab.split.graph import Graph, block_size
from kvlab.split.rules import RULES, Rule, RuleFailure, apply_ratio, c_function
from kvlab.split.state import Axis, SplitError, SplitState


@dataclass
class NodeTrace:
    tensor: object
    state: SplitState            # assume_sync = true: what consumers see
    local: SplitState            # assume_sync = false: what the device holds right after the op (PARTIAL...)
    inputs: tuple = ()           # (source name, its state)

    def to_dict(self) -> dict:
        t, s = self.tensor, self.state
        d = {"name": t.name, "op": t.op, "type": t.type, "ne": list(t.ne), "axis": s.axis.label,
             "split_ne": [list(seg) for seg in s.ne], "nr": list(s.nr), "per_device": list(s.per_device)}
        if self.local.axis != s.axis:
            d["local_axis"] = self.local.axis.label
            d["sync"] = "all-reduce"
        return d


@dataclass
class Trace:
    era: str
    n_devices: int
    nodes: list = field(default_factory=list)
    error: SplitError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def state_of(self, name: str) -> SplitState:
        for n in self.nodes:
            if n.tensor.name == name:
                return n.state
        raise KeyError(f"no traced tensor named {name!r}")


def _static_check(t, s: SplitState) -> None:
    """calculate_split_state for a static tensor: whole quant blocks on dim 0, counts add up to ne."""
    if not s.axis.is_dim:
        return
    g = block_size(t.type) if s.axis == Axis.AXIS_0 else 1
    bad = [n for seg in s.ne for n in seg if n % g]
    if bad:
        raise RuleFailure("GGML_ASSERT(ret.ne[s*n_bufs + j] % granularity == 0) failed",
                          f"device slices {list(s.per_device)} of {t.name!r} must be whole {t.type} blocks of {g}")
    if sum(s.per_device) != t.ne[s.axis]:
        raise RuleFailure("GGML_ASSERT(ne_sum == tensor->ne[ret.axis]) failed",
                          f"device slices {list(s.per_device)} do not add up to ne[{int(s.axis)}] = {t.ne[s.axis]}")


def _node_state(t, src_ss, era, n, static_states, assume_sync) -> SplitState:
    if t.op == "NONE":
        if t.static:
            s = static_states[id(t)]
            _static_check(t, s)
            return s
        return SplitState.mirrored(n)
    rule_fn = RULES.get(t.op)
    if rule_fn is None:
        raise RuleFailure(f'GGML_ABORT("ggml op not implemented: {t.op}")',
                          f"the meta backend has no split rule for {t.op}")
    rule = Rule(t, src_ss, n, era.rules_version, era.mirrored_batched_mul_mat, assume_sync)
    return apply_ratio(rule, rule_fn(rule))


def trace(graph: Graph, era="pr23792", n_devices: int = 2, static_states: dict | None = None) -> Trace:
    """Split state of every tensor in graph order; stops at the first failing rule (Trace.error)."""
    era = get_era(era)
    if not isinstance(n_devices, int) or not 1 <= n_devices <= 16:
        raise ValueError(f"n_devices must be an int in 1..16 (GGML_BACKEND_META_MAX_DEVICES), got {n_devices!r}")
    static_states = static_states or {}
    out = Trace(era.name, n_devices)
    states = {}
    for t in graph.order:
        src_ss = [None if (s is None or s is t) else states[id(s)] for s in t.src]
        try:
            state = _node_state(t, src_ss, era, n_devices, static_states, True)
            local = _node_state(t, src_ss, era, n_devices, static_states, False) if t.op == "MUL_MAT" else state
        except RuleFailure as f:
            inputs = tuple((s.name, ss.describe()) for s, ss in zip(t.src, src_ss) if ss is not None)
            where = "llama_meta_device_get_split_state / calculate_split_state" if t.op == "NONE" else \
                f"{c_function(t.op)} (ggml-backend-meta.cpp {era.rules_version})"
            listing = "; ".join(f"{name}: {d}" for name, d in inputs) or "none"
            msg = (f"[{era.name}] {t.op} node {t.name!r} {list(t.ne)}: {f.condition} in {where}. "
                   f"Inputs: {listing}. {f.hint}".rstrip())
            out.error = SplitError(msg, node=t.name, op=t.op, rule=f.condition, c_function=where,
                                   inputs=inputs, hint=f.hint)
            break
        states[id(t)] = state
        out.nodes.append(NodeTrace(t, state, local, tuple((s.name, ss) for s, ss in zip(t.src, src_ss)
                                                         if ss is not None)))
    return out


def infer(graph: Graph, era="pr23792", n_devices: int = 2, static_states: dict | None = None) -> dict:
    """{tensor name: SplitState} for every tensor, or the SplitError ggml's assert would have been."""
    tr = trace(graph, era, n_devices, static_states)
    if tr.error is not None:
        raise tr.error
    return {n.tensor.name: n.state for n in tr.nodes}
