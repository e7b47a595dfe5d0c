"""llama.cpp's attention block as ggml builds it under --split-mode tensor (one layer, flash attention on):

    Qcur = wq @ x, Kcur = wk @ x, Vcur = wv @ x        weights split by heads (AXIS_1) -> AXIS_0
    reshape_3d to [head_dim, n_head(_kv), T], rope Q and K
    rotate Q, K with the K matrix, V with the V matrix  (llm_graph_context::build_attn)
    set_rows K, V into cache_k/v_l{il}                 caches split on AXIS_0 (whole KV heads)
    views of the caches, permute(0,2,1,3), flash_attn_ext
    reshape_2d, un-rotate with the V matrix, wo @ .    wo split on AXIS_0 -> PARTIAL -> all-reduce

The order of nodes is ggml's (ggml_build_forward_expand of q, v, k, the two set_rows, then the output).
"""
from dataclasses import dataclass, field

from kvlab.rotation import rotation_plan
from kvlab.shape import HeadShape
from kvlab.types import type_info
from kvlab.split import graph as g
from kvlab.split.eras import Era, get_era
from kvlab.split.infer import Trace, trace
from kvlab.split.state import Axis, SplitError
from kvlab.split.static import static_state

_WEIGHT_BLOCKS = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32,
                  "iq4_nl": 32, "q2_K": 256, "q3_K": 256, "q4_K": 256, "q5_K": 256, "q6_K": 256}

GUARD_MESSAGE = ("llama_init_from_model: simultaneous use of SPLIT_MODE_TENSOR and KV cache quantization "
                 "not implemented")


@dataclass(frozen=True)
class BlockConfig(HeadShape):
    """One attention layer (head_dim, n_head, n_head_kv: HeadShape). n_tokens = 1 is a decode step, more is a
    prompt batch."""
    n_devices: int = 2
    type_k: str = "f16"
    type_v: str = "f16"
    n_tokens: int = 1
    n_kv: int | None = None       # cache cells FA reads; default the batch padded to 256 (get_n_kv)
    rotation: bool = True         # False = LLAMA_ATTN_ROT_DISABLE=1
    era: str = "pr23792"
    guard: bool = True            # False skips the era's init-time TP + quantized-KV guard
    layer: int = 0                # il: decides which device takes the remainder of an uneven split
    n_embd: int | None = None     # model width; default n_head * head_dim
    weight_type: str = "f16"      # type of attn_output.weight: its block size sets the split granularity

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_devices", "n_tokens", "cells"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockConfig.{name} must be a positive int, got {v!r}")
        if self.n_devices > 16:
            raise ValueError(f"at most 16 devices (GGML_BACKEND_META_MAX_DEVICES), got {self.n_devices}")
        if self.cells < self.n_tokens:
            raise ValueError(f"n_kv ({self.n_kv}) must hold the batch of {self.n_tokens} tokens")
        for side in ("type_k", "type_v"):   # canonical names: any case is accepted (Q8_0 is q8_0)
            object.__setattr__(self, side, type_info(getattr(self, side)).name)
        get_era(self.era)
        if self.weight_type not in _WEIGHT_BLOCKS:
            raise ValueError(f"unknown weight_type {self.weight_type!r}: expected one of {', '.join(_WEIGHT_BLOCKS)}")

    @property
    def cells(self) -> int:
        return self.n_kv if self.n_kv is not None else -(-self.n_tokens // 256) * 256

    @property
    def width(self) -> int:
        return self.n_embd or self.n_head * self.head_dim

    @property
    def plan(self):
        """The rotation llama_kv_cache applies (None sizes where it does not rotate)."""
        return rotation_plan(self.type_k, self.type_v, self.head_dim, disable=not self.rotation)


@dataclass
class Block:
    config: BlockConfig
    era: Era
    graph: g.Graph
    static_states: dict = field(default_factory=dict)   # id(tensor) -> SplitState
    init_error: SplitError | None = None                # llama_init_from_model refused the context

    def trace(self) -> Trace:
        """The split state of every node on the config's devices, as the era's meta backend infers it."""
        return trace(self.graph, self.era, self.config.n_devices, self.static_states)


def init_checks(cfg: BlockConfig, era: Era) -> SplitError | None:
    """What llama_init_from_model refuses before any graph is built (src/llama-context.cpp)."""
    for side, t in (("K", cfg.type_k), ("V", cfg.type_v)):
        blck = type_info(t).block_size
        if cfg.head_dim % blck:
            return SplitError(f"llama_init_from_model: {side} cache type {t} with block size {blck} does not "
                              f"divide n_embd_head_{side.lower()}={cfg.head_dim}", node="llama_init_from_model",
                              op="INIT", rule=f"n_embd_head_{side.lower()} % blck_size == 0",
                              c_function="llama_init_from_model", hint="use a head size that is a multiple of 32")
    quantized = type_info(cfg.type_k).is_quantized or type_info(cfg.type_v).is_quantized
    if era.tp_quant_guard and cfg.guard and quantized:
        return SplitError(f"[{era.name}] {GUARD_MESSAGE}", node="llama_init_from_model", op="INIT",
                          rule="!ggml_is_quantized(type_k) && !ggml_is_quantized(type_v)",
                          c_function="llama_init_from_model (llama-context.cpp 0.3.24)",
                          hint="this era refuses any quantized K or V with --split-mode tensor; use f16/bf16/f32 "
                               "caches, or --no-guard to see what the guard was hiding")
    return None


def _rotate(cur: g.Tensor, rot: g.Tensor, label: str, four_d: bool) -> g.Tensor:
    """llama_mul_mat_hadamard / ggml_mul_mat_aux (2D), or PR #23225's 4D form."""
    n = rot.ne[0]
    if four_d:
        ne = (n, cur.ne[0] // n, cur.ne[1], cur.ne[2] * cur.ne[3])
        flat = g.reshape(cur, *ne, name=f"{label} (rot in)")
    elif cur.is_contiguous:
        flat = g.reshape(cur, n, cur.nelements // n, name=f"{label} (rot in)")
    else:
        flat = g.cont(cur, n, cur.nelements // n, name=f"{label} (rot in)")
    res = g.mul_mat(rot, flat, name=f"{label} (rot)", hint="SRC0_IS_HADAMARD")
    return g.reshape(res, *cur.ne, name=f"{label} (rot out)")


def build_attention_block(cfg: BlockConfig | None = None, **overrides) -> Block:
    """The graph of one attention layer plus the split states llama.cpp gives its weights and caches."""
    cfg = BlockConfig(**{**(cfg.__dict__ if cfg else {}), **overrides})
    era = get_era(cfg.era)
    hd, H, Hkv, T, il = cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.n_tokens, cfg.layer
    plan = cfg.plan
    gr = g.Graph()
    static = {}
    shape = dict(cfg.head_fields(), weight_block=_WEIGHT_BLOCKS[cfg.weight_type])

    def weight(name, ne, role, axis):
        t = g.new_tensor(name, "f32", ne, static=True, data_role=name)
        static[id(t)] = static_state(role, axis, ne[int(axis)], layer=il, n_devices=cfg.n_devices,
                                     version=era.granularity_version, **shape)
        return t

    x = g.new_tensor(f"attn_norm-{il}", "f32", (cfg.width, T), data_role="x")
    pos = g.new_tensor("inp_pos", "i32", (T,), data_role="pos")
    k_rot = g.new_tensor("attn_inp_k_rot", "f32", (plan.k, plan.k), data_role="hadamard") if plan.k else None
    v_rot = g.new_tensor("attn_inp_v_rot", "f32", (plan.v, plan.v), data_role="hadamard") if plan.v else None

    def project(w_name, heads, label, roped):
        w = weight(f"blk.{il}.{w_name}.weight", (cfg.width, heads * hd), "q" if w_name == "attn_q" else "kv",
                   Axis.AXIS_1)
        cur = g.reshape(g.mul_mat(w, x, name=f"{label}-{il}"), hd, heads, T)
        return g.rope(cur, pos, name=f"{label}-{il} (rope)") if roped else cur

    q_cur, k_cur, v_cur = project("attn_q", H, "Qcur", True), project("attn_k", Hkv, "Kcur", True), \
        project("attn_v", Hkv, "Vcur", False)
    if k_rot is not None:
        q_cur = _rotate(q_cur, k_rot, f"Qcur-{il}", era.rotation_4d)
        k_cur = _rotate(k_cur, k_rot, f"Kcur-{il}", era.rotation_4d)
    if v_rot is not None:
        v_cur = _rotate(v_cur, v_rot, f"Vcur-{il}", era.rotation_4d)
    for t in (q_cur, v_cur, k_cur):
        gr.expand(t)

    caches = {}
    for side, cur, type_ in (("k", k_cur, cfg.type_k), ("v", v_cur, cfg.type_v)):
        cache = g.new_tensor(f"cache_{side}_l{il}", type_, (Hkv * hd, cfg.cells, 1), static=True,
                             data_role=f"cache_{side}")
        static[id(cache)] = static_state("kv", Axis.AXIS_0, Hkv * hd, layer=il, n_devices=cfg.n_devices,
                                         version=era.granularity_version, **shape)
        idxs = g.new_tensor(f"attn_inp_{side}_idxs", "i64", (T,), data_role="idxs")
        rows = g.view(cur, (Hkv * hd, T), (cur.nb[2],), 0, name=f"{cur.name} (view)")   # cpy_k/cpy_v
        gr.expand(g.set_rows(cache, rows, idxs, name=f"cache_{side}_l{il} (set_rows)"))
        caches[side] = cache

    def cache_view(cache):   # llama_kv_cache::get_k / get_v (FA: V not transposed)
        rs = g.row_size(cache.type, hd)
        return g.view(cache, (hd, Hkv, cfg.cells, 1), (rs, rs * Hkv, rs * Hkv * cfg.cells), 0,
                      name=f"{cache.name} (view)")

    q = g.view(q_cur, (hd, H, T, 1), (q_cur.nb[1], q_cur.nb[2], q_cur.nb[2] * T), 0, name=f"q-{il}")
    q = g.permute(q, 0, 2, 1, 3)
    k = g.permute(cache_view(caches["k"]), 0, 2, 1, 3)
    v = g.permute(cache_view(caches["v"]), 0, 2, 1, 3)
    k = g.cast(k, "f16") if k.type == "f32" else k     # build_attn_mha: FA wants f16 rather than f32 K/V
    v = g.cast(v, "f16") if v.type == "f32" else v
    mask = g.new_tensor("attn_inp_kq_mask", "f16", (cfg.cells, T), data_role="mask")
    fa = g.flash_attn_ext(q, k, v, mask, hd ** -0.5, name=f"__fattn__-{il}")
    cur = g.reshape(fa, hd * H, T, name=f"kqv_out-{il}")
    if v_rot is not None:
        cur = _rotate(cur, v_rot, f"kqv_out-{il}", era.rotation_4d)
    wo = weight(f"blk.{il}.attn_output.weight", (H * hd, cfg.width), "o", Axis.AXIS_0)
    gr.expand(g.mul_mat(wo, cur, name=f"attn_out-{il}"))
    return Block(cfg, era, gr, static, init_checks(cfg, era))
