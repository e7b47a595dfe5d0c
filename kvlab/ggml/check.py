"""`kvlab check-ggml`: hold a real libggml against kvlab, bytes, split states and flash attention.

    kvlab check-ggml --lib build/bin/libggml-base.so [--era NAME] [--format text|json]

1. Bytes: all nine types, quantized by ggml's ref path (from_float_ref) and CPU path (from_float)
   against kvlab's "ref" and "cpu" flavors, and ggml's to_float of the ref bytes against
   kvlab.dequantize (float32 bit patterns), on the golden inputs (tools/golden_inputs.py, where the
   checkout has it) plus random rows. Bytes that ggml itself does not derive from the block's own
   input (iq4_nl's stale qs on blocks with amax < 1e-15) are left out, as the golden files do.
2. Split states: a matrix of device counts (1-4), head layouts (MHA, GQA, uneven GQA, MQA), decode
   and prompt batches, rotation on and off; each configuration runs in its own process through the
   real meta backend (kvlab.ggml.meta) and is compared node by node with kvlab.split's trace of the
   same block: the graph (names, ops, shapes), every node's state (axis, per-device counts, nr) and
   where each side stops, if it stops. The era defaults to the one the library's struct layout
   belongs to (with nr: pr23792, without: flatten); the init guard is skipped (inference is the question).
3. Flash attention: ggml's own flash_attn_ext on ggml-cpu (kvlab.ggml.fa), fed with kvlab's cache bytes
   (cpu flavor, rotation on and off), against kvlab.attention's "cpu" backend on the same bytes, for
   all 81 K/V pairs (`fa_cases`: decode, a small batch and a tiled batch; the broad matrix is
   bench/fa_ggml.py). Per pair: values whose bits differ, max |diff|, max ulps, and the difference
   relative to the pair's quantization error (out_rel_l2). kvlab reproduces both ggml-cpu paths (one
   chunk, tiled) bit for bit on an x86-64 AVX512 build (kvlab.ggml.fa.MODELLED_ISA); on a library
   built for other SIMD (AVX2 only: other lanes in the f16/bf16 dot products and in expf) the
   difference must stay FA_BOUND times below the quantization error.

Exit status 1 on any difference, 2 on bad arguments or a library that cannot be loaded.

Known version drift: ggml-python 0.0.45 ships an early post-#23792 ggml whose handle_reshape lacks the
"complete dim-0 rows move to the singleton axis 1" case and checks `n_segments == 1` first;
EXPECTED_DRIFT lists what that changes in the matrix (see tests/test_check_ggml.py).
"""
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvlab.types import TYPES

LAYOUTS = {            # name: (head_dim, n_head, n_head_kv)
    "mha": (64, 4, 4),
    "gqa": (128, 32, 8),
    "gqa-uneven": (128, 12, 6),
    "mqa": (128, 8, 1),
}
DEVICE_COUNTS = (1, 2, 3, 4)
BATCHES = {"decode": 1, "prompt": 7}
CACHE_TYPES = ("q8_0", "q4_0")       # quantized K and V, so rotation applies unless turned off
N_EMBD = 256                         # model width: small weights, the split states do not depend on it

# Known version drift: ggml version (ggml_version()) -> (why it differs from kvlab's era, configurations).
_MQA_DRIFT = frozenset(f"mqa/{n}dev/{batch}/rot-{rot}" for n in DEVICE_COUNTS
                       for batch, rot in (("decode", "off"), ("prompt", "on"), ("prompt", "off")))
EXPECTED_DRIFT = {
    "0.15.3": (   # ggml-python 0.0.45: an early post-#23792 ggml
        "its handle_reshape lacks October-2026 ggml's case 'a complete dim-0 split moves to the following "
        "singleton dimension': with one KV head (MQA) Kcur/Vcur [head_dim, 1, T] and the cache views "
        "[head_dim, 1, n_kv] stay split on axis 0 instead of axis 1 (heads), so flash_attn_ext asserts "
        "src_ss[1].axis == AXIS_2 (rotation off) and, in a prompt batch, the states before the Hadamard "
        "mul_mat abort differ (both versions abort there with rotation on)", _MQA_DRIFT),
}


# ------------------------------------------------------------------------------------------ bytes

def _golden_cases() -> dict:
    path = Path(__file__).resolve().parents[1] / "tools" / "golden_inputs.py"   # in a checkout only
    if not path.exists():
        return {}
    spec = importlib.util.spec_from_file_location("golden_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.golden_cases()


def input_cases() -> dict:
    """Golden cases plus random rows of several scales: name -> (rows, 256) float32."""
    rng = np.random.default_rng(20261001)
    cases = dict(_golden_cases())
    for scale in (1e-2, 1.0, 1e2):
        cases[f"random_{scale:g}"] = (rng.standard_normal((32, 256)) * scale).astype(np.float32)
    cases["random_uniform"] = rng.uniform(-4, 4, (32, 256)).astype(np.float32)
    return cases


@dataclass
class BytesRow:
    type: str
    path: str          # "ref", "cpu" (quantize) or "to_float"
    blocks: int = 0
    differ: int = 0
    first: str = ""    # the first differing block, as "case row/block"


def check_bytes(lib, cases: dict) -> list:
    import kvlab
    rows = []
    for name, info in TYPES.items():
        per_path = {p: BytesRow(name, p) for p in ("ref", "cpu", "to_float")}
        for case, x in cases.items():
            for path in ("ref", "cpu"):
                want, defined = lib.quantize_defined(x, name, path)
                got = np.asarray(kvlab.quantize(x, name, flavor=path).raw)
                bad = ((got != want) & defined).reshape(len(x), -1, info.type_size)
                _count(per_path[path], bad.any(axis=2), case)
                if path == "ref":
                    deq_want = lib.dequantize(want, name, x.shape[1]).view(np.uint32)
                    deq_got = np.asarray(kvlab.dequantize(kvlab.QTensor.from_raw(want, name, x.shape)))
                    bad = (deq_got.view(np.uint32) != deq_want).reshape(len(x), -1, info.block_size)
                    _count(per_path["to_float"], bad.any(axis=2), case)
        rows.extend(per_path.values())
    return rows


def _count(row: BytesRow, differs, case: str) -> None:
    row.blocks += differs.size
    row.differ += int(differs.sum())
    if differs.any() and not row.first:
        r, b = np.unravel_index(int(np.argmax(differs)), differs.shape)
        row.first = f"{case} row {r} block {b}"


# ----------------------------------------------------------------------------------- split states

@dataclass(frozen=True)
class Config:
    layout: str
    n_devices: int
    batch: str
    rotation: bool

    @property
    def id(self) -> str:
        return f"{self.layout}/{self.n_devices}dev/{self.batch}/rot-{'on' if self.rotation else 'off'}"


@dataclass
class ConfigResult:
    config: Config
    era: str
    compared: int = 0                          # nodes whose states both sides give
    differences: list = field(default_factory=list)
    ggml_stop: str = ""                        # "node: message" where the library aborted
    kvlab_stop: str = ""                       # "node: rule" where kvlab's model raises SplitError

    @property
    def agrees(self) -> bool:
        return not self.differences


def matrix() -> list:
    return [Config(layout, n, batch, rot) for layout in LAYOUTS for n in DEVICE_COUNTS
            for batch in BATCHES for rot in (True, False)]


def _model_block(cfg: Config, era: str):
    from kvlab.split import BlockConfig, build_attention_block
    hd, h, hkv = LAYOUTS[cfg.layout]
    return build_attention_block(BlockConfig(
        head_dim=hd, n_head=h, n_head_kv=hkv, n_devices=cfg.n_devices, type_k=CACHE_TYPES[0],
        type_v=CACHE_TYPES[1], n_tokens=BATCHES[cfg.batch], rotation=cfg.rotation, era=era, guard=False,
        n_embd=N_EMBD))


def _spec(block):
    from kvlab.ggml.meta import BlockSpec
    c = block.config
    static = {t.name: [int(s.axis), [list(seg) for seg in s.ne], list(s.nr)]
              for t in block.graph.order if (s := block.static_states.get(id(t))) is not None}
    return BlockSpec(head_dim=c.head_dim, n_head=c.n_head, n_head_kv=c.n_head_kv, n_tokens=c.n_tokens,
                     cells=c.cells, width=c.width, type_k=TYPES[c.type_k].ggml_type,
                     type_v=TYPES[c.type_v].ggml_type, rot_k=c.plan.k or 0, rot_v=c.plan.v or 0,
                     rotation_4d=block.era.rotation_4d, n_devices=c.n_devices, static_states=static)


def _first_missing(names, states) -> str:
    return next((n for n in names if n not in states), "")


def compare(cfg: Config, era: str, block, meta) -> ConfigResult:
    """kvlab's trace of the block against what the real meta backend inferred for it."""
    res = ConfigResult(cfg, era)
    tr = block.trace()
    if meta.error:
        res.differences.append(f"ggml run failed: {meta.error}")
        return res
    model_graph = [[t.name, t.op, list(t.ne)] for t in block.graph.order]
    if meta.graph != model_graph:
        ours = {n[0]: n for n in model_graph}
        for node in meta.graph:
            if ours.get(node[0]) != node:
                res.differences.append(f"graph: ggml built {node}, kvlab {ours.get(node[0])}")
    model = {n.tensor.name: (n.state.axis.label, tuple(n.state.ne[0]), n.state.nr[0]) for n in tr.nodes}
    for name, op, _ in model_graph:
        if name in model and name in meta.states:
            res.compared += 1
            if model[name] != meta.states[name]:
                res.differences.append(f"{name} [{op}]: ggml {_show(meta.states[name])}, "
                                       f"kvlab {_show(model[name])}")
    names = [n[0] for n in model_graph]
    ggml_stop = _first_missing(names, meta.states) if meta.abort else ""
    kvlab_stop = tr.error.node if tr.error else ""
    res.ggml_stop = f"{ggml_stop}: {meta.abort}" if meta.abort else ""
    res.kvlab_stop = f"{kvlab_stop}: {tr.error.rule}" if tr.error else ""
    if ggml_stop != kvlab_stop:
        res.differences.append(f"stops: ggml {'at ' + res.ggml_stop if ggml_stop else 'runs through'}; "
                               f"kvlab {'at ' + res.kvlab_stop if kvlab_stop else 'runs through'}")
    elif not meta.abort:
        missing = [n for n in names if (n in model) != (n in meta.states)]
        res.differences += [f"{n}: state on one side only" for n in missing]
    return res


def _show(state) -> str:
    axis, ne, nr = state
    return f"{axis} {{{', '.join(f'{n}x{nr}' for n in ne)}}}"


def check_split(lib_dir, era: str | None, configs=None, workers: int | None = None):
    """(layout, results): every configuration through the library, compared with kvlab's model."""
    from kvlab.ggml.meta import infer_split_states
    configs = configs or matrix()
    layout = _probe_layout(lib_dir)
    era = era or ("pr23792" if layout == "nr" else "flatten")
    blocks = [_model_block(c, era) for c in configs]

    def run(block):
        return infer_split_states(_spec(block), lib_dir)

    with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
        metas = list(pool.map(run, blocks))
    return layout, era, [compare(c, era, b, m) for c, b, m in zip(configs, blocks, metas)]


def _probe_layout(lib_dir) -> str:
    from kvlab.ggml.meta import BlockSpec, infer_split_states
    meta = infer_split_states(BlockSpec(64, 1, 1, 1, 256, 64, 1, 1, n_devices=1), lib_dir)
    if not meta.layout:
        raise RuntimeError(f"could not probe the split-state layout of {lib_dir}: {meta.error or meta.abort}")
    return meta.layout


# -------------------------------------------------------------------------------- flash attention

FA_LAYOUTS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}   # (n_head, n_head_kv)
FA_BOUND = 1000        # where not bit-exact: the difference must be this many times below the pair's error


@dataclass(frozen=True)
class FACase:
    head_dim: int
    layout: str            # FA_LAYOUTS key
    n_tokens: int          # queries: the last positions of the context, so at most n_kv of them
    n_kv: int
    rotation: bool
    threads: int = 1       # ggml-cpu's threads: > 1 takes the split-KV path for an f16 decode over >= 512 cells

    @property
    def id(self) -> str:
        threads = f"/thr{self.threads}" if self.threads > 1 else ""
        rot = "on" if self.rotation else "off"
        return f"d{self.head_dim}/{self.layout}/t{self.n_tokens}/kv{self.n_kv}/rot-{rot}{threads}"


def fa_cases(quick: bool = True) -> list:
    """quick: one head size and layout, decode, a small and a tiled batch, a split-KV decode on 4 threads;
    else the broad matrix."""
    if quick:
        return [FACase(64, "gqa", t, 100, rot) for t in (1, 7, 64) for rot in (True, False)] + [
            FACase(64, "gqa", 1, 600, True, threads=4)]
    return [FACase(d, layout, t, n_kv, rot) for d in (64, 128, 256) for layout in FA_LAYOUTS
            for t in (1, 7, 64) for n_kv in (32, 300, 4096) for rot in (True, False)]


@dataclass
class FARow:
    type_k: str
    type_v: str
    case: str
    kernel: str            # the ggml-cpu path kvlab models ("cpu": one_chunk, "cpu-tiled")
    values: int = 0
    differ: int = 0        # output values whose bits differ
    max_abs: float = 0.0
    max_ulp: int = 0
    diff_rel_l2: float = 0.0      # ||kvlab - ggml|| / ||exact||, on the FA output (rotated basis)
    unrotated_max_abs: float = 0.0
    quant_rel_l2: float = 0.0     # out_rel_l2 of the pair: kvlab's output against exact attention

    @property
    def ratio(self) -> float:
        """How many times the difference is below the pair's quantization error (inf: bit-exact)."""
        return self.quant_rel_l2 / self.diff_rel_l2 if self.diff_rel_l2 else float("inf")

    @property
    def ok(self) -> bool:
        return self.differ == 0 or self.ratio >= FA_BOUND


def _ordered(x):
    """float32 bits as integers in the order of the floats, so that a difference counts ulps."""
    i = np.ascontiguousarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def check_fa(lib, cases, pairs=None, seed: int = 0) -> list:
    """ggml's flash_attn_ext on kvlab's cache bytes (cpu flavor) against the cpu backend, per pair and case."""
    from kvlab.accuracy.attention import exact_attention, store_bytes, stored_attention, unrotate
    from kvlab.accuracy.metrics import norm
    from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv
    from kvlab.ggml.fa import flash_attn_ext
    from kvlab.rotation import rotation_plan
    pairs = pairs or [(k, v) for k in TYPES for v in TYPES]
    rows = []
    for case in cases:
        n_head, n_head_kv = FA_LAYOUTS[case.layout]
        cfg = SyntheticConfig(n_head=n_head, n_head_kv=n_head_kv, head_dim=case.head_dim, n_q=case.n_tokens,
                              seed=seed)
        q, k, v = synthetic_kv(case.n_kv, cfg)
        exact = exact_attention(q, k, v)
        out_norm = norm(exact.out)
        stored = {}                                   # (side, type, rotation) -> store_bytes: 9 types, not 81 pairs

        def store(side, x, type_name, rot):
            if (side, type_name, rot) not in stored:
                stored[side, type_name, rot] = store_bytes(x, type_name, "cpu", rot)
            return stored[side, type_name, rot]

        for type_k, type_v in pairs:
            plan = rotation_plan(type_k, type_v, case.head_dim, case.head_dim, disable=not case.rotation)
            att = stored_attention(q, store("k", k, type_k, plan.k), store("v", v, type_v, plan.v),
                                   type_k, type_v, plan, "cpu", case.threads)
            ours = att.out_rot.reshape(q.shape)                        # (G, group * n_q, D) -> (n_head, n_q, D)
            theirs = flash_attn_ext(lib, att.q_rot, att.k_raw, att.v_raw, type_k, type_v, n_threads=case.threads)
            diff = ours.astype(np.float64) - theirs
            unrot = unrotate(ours.astype(np.float64), plan.v) - unrotate(theirs.astype(np.float64), plan.v)
            rows.append(FARow(
                type_k, type_v, case.id, att.path.kernel, values=ours.size,
                differ=int((ours.view(np.uint32) != theirs.view(np.uint32)).sum()),
                max_abs=float(np.abs(diff).max()), max_ulp=int(np.abs(_ordered(ours) - _ordered(theirs)).max()),
                diff_rel_l2=norm(diff) / out_norm, unrotated_max_abs=float(np.abs(unrot).max()),
                quant_rel_l2=norm(unrotate(att.out_rot.astype(np.float64), plan.v) - exact.out) / out_norm))
    return rows


def _finite(x: float):
    return None if x == float("inf") else x          # JSON has no infinity: null means bit-exact


def fa_report(rows, features: dict) -> dict:
    """The section of `kvlab check-ggml`: totals, per path, per pair (over all cases), what failed."""
    from kvlab.ggml.fa import MODELLED_ISA
    inexact = [r for r in rows if r.differ]
    pairs = {}
    for r in rows:
        pairs.setdefault((r.type_k, r.type_v), []).append(r)
    return {
        "compared": len(rows), "bit_exact": len(rows) - len(inexact), "bound": FA_BOUND,
        "worst_ratio": _finite(min((r.ratio for r in inexact), default=float("inf"))),
        "cpu_features": features, "modelled_isa": all(features.get(f) for f in MODELLED_ISA),
        "cases": sorted({r.case for r in rows}),
        "paths": {kernel: {"rows": sum(r.kernel == kernel for r in rows),
                           "bit_exact": sum(r.kernel == kernel and not r.differ for r in rows)}
                  for kernel in sorted({r.kernel for r in rows})},
        "pairs": [{"type_k": k, "type_v": v, "cases": len(rs), "bit_exact": sum(not r.differ for r in rs),
                   "differ": sum(r.differ for r in rs), "values": sum(r.values for r in rs),
                   "max_abs": max(r.max_abs for r in rs), "max_ulp": max(r.max_ulp for r in rs),
                   "quant_rel_l2": min(r.quant_rel_l2 for r in rs),
                   "worst_ratio": _finite(min(r.ratio for r in rs))} for (k, v), rs in pairs.items()],
        "failed": [f"{r.type_k}/{r.type_v} {r.case}" for r in rows if not r.ok],
    }


def fa_text(fa: dict) -> list:
    """Text lines of `fa_report`: one line per pair."""
    isa = "modelled" if fa["modelled_isa"] else "NOT the modelled AVX512 build"
    worst = "" if fa["worst_ratio"] is None else f", worst diff {fa['worst_ratio']:.3g}x below quantization error"
    out = [f"flash attention (ggml-cpu flash_attn_ext vs kvlab backend cpu, same bytes): {fa['bit_exact']} of "
           f"{fa['compared']} pair x case runs bit-exact{worst}; library SIMD: {isa}",
           f"  cases: {', '.join(fa['cases'])}",
           f"  {'K':<8}{'V':<8}{'exact':>7}{'differ':>9}{'max|diff|':>11}{'ulp':>6}{'quant err':>11}{'ratio':>9}"]
    for p in fa["pairs"]:
        ratio = "inf" if p["worst_ratio"] is None else f"{p['worst_ratio']:.3g}"
        out.append(f"  {p['type_k']:<8}{p['type_v']:<8}{p['bit_exact']:>4}/{p['cases']:<2}{p['differ']:>9}"
                   f"{p['max_abs']:>11.3g}{p['max_ulp']:>6}{p['quant_rel_l2']:>11.3g}{ratio:>9}")
    return out


# --------------------------------------------------------------------------------------------- CLI


def known_drift(version: str, era: str):
    """(explanation, configuration ids) of the known drift of a ggml version from kvlab's era pr23792."""
    why, ids = EXPECTED_DRIFT.get(version.split()[0], ("", frozenset()))
    return (why, ids) if era == "pr23792" else ("", frozenset())


