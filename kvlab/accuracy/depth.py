"""How KV-cache quantization error compounds through a stack of layers (`kvlab.layer_growth`).

In a real model layer l+1 never sees the exact hidden state: layer l already read a quantized
cache, so the keys and values layer l+1 writes into its own cache carry the upstream error, and
it adds its own quantization error on top. kvlab measures this on a small pre-norm transformer
with fixed random weights and the attention statistics of kvlab.accuracy.synthetic, run twice on the same
tokens: exact (K/V kept as the float32 activations, attention in float64), and with every layer's
K and V written into a quantized cache (rotation as llama.cpp's rotation_plan; exact attention on
the dequantized cache, i.e. the "ref" backend). At every depth the two runs are compared.

One block (layer l, causal attention over all n_tokens positions, GQA):
    x = rmsnorm(h);  q = rope(x Wq + q_lean);  k = rope(x Wk + k_outliers);  v = (x Wv) * v_scale
    h = h + g_attn * attention(q, cache(k), cache(v)) Wo
    h = h + g_mlp * gelu(rmsnorm(h) W1) W2
Weights are Gaussian with variance 1/fan_in (Wq scaled so the bulk logits q.k/sqrt(D) have std
`logit_std`); each layer draws its own K outlier channels (a bias on low-frequency RoPE pairs, as a
k_proj bias or a massive-activation channel gives them), Q lean and V channel scales
(kvlab.accuracy.synthetic.head_structure). The branch gains g are fixed on the exact run so that each branch
adds an update of RMS `branch_scale` x RMS(h), and the quantized run reuses them: both runs have
the same weights. Absolute errors scale with branch_scale, and so does how much an inherited error
grows: with the defaults (8 layers, seed 0, rotation on) the residual error after 8 layers is about
1.1x the layers' own errors added up at branch_scale 0.1, 1.8x at 0.25 and 3.5x at 0.5.

Metrics at depth l (1..n_layers), quantized run against exact run:
- ``hidden_rel_l2``: the residual stream after l layers, all tokens (what the next layer reads);
- ``hidden_own_rel_l2``: the same if nothing were inherited: the root sum of squares of the errors
  layers 1..l add on their own (each layer's local attention error through its Wo and gain), over
  the exact residual norm. hidden_rel_l2 / hidden_own_rel_l2 > 1: inherited error grows as it
  passes through later layers; < 1: they damp it;
- ``attn_rel_l2``: layer l's attention output (heads merged, before Wo);
- ``attn_local_rel_l2``: the same with the exact run's Q/K/V and a quantized cache: the error layer
  l adds on its own (kvlab.attention_error's out_rel_l2, over every causal row). attn_rel_l2 /
  attn_local_rel_l2 is how much the upstream error worsens this layer's attention;
- ``kl``: mean over heads and positions of KL(exact attention weights || quantized-run weights);
- ``k_rel_l2``, ``v_rel_l2``: the quantized run's cache (dequantized, unrotated) against the exact
  K/V: quantization plus upstream drift.

Why this design: KVTuner (Li et al. 2025, arXiv:2502.04420) and KV-AdaQuant (Hariri et al. 2025,
arXiv:2502.15075) measure layer-wise sensitivity and error propagation through the layers of real
models; here the statistics are known and the isolated (local) error is separated from the
propagated one. The block keeps skip connections and an MLP because pure attention stacks lose
rank doubly exponentially with depth (Dong, Cordonnier & Loukas 2021, arXiv:2103.03404), which
would make any depth trend an artefact. Runs on numpy or torch (kvlab._xp), CPU or GPU.
"""
from dataclasses import asdict, dataclass, field
import json
from pathlib import Path

import numpy as np

from kvlab import _xp
from kvlab._progress import progress_bar
from kvlab.accuracy.cache import default_cache_root, frame_key, read_frame, source_hash, write_frame
from kvlab.accuracy.attention import group_queries, softmax_rows, store, unrotate
from kvlab.accuracy.metrics import norm, softmax_kl, tensor_rel_l2
from kvlab.rotation import RotationPlan, rotate, rotation_plan
from kvlab.accuracy.synthetic import SyntheticConfig, head_structure, query_lean
from kvlab.rope import rope
from kvlab.types import TYPES, flavor_code, type_info
from kvlab.accuracy.table import versions

DEPTH_METRICS = ("hidden_rel_l2", "hidden_own_rel_l2", "attn_rel_l2", "attn_local_rel_l2", "kl", "k_rel_l2",
                 "v_rel_l2")
NO_ROTATION = RotationPlan(None, None)


@dataclass(frozen=True)
class StackConfig:
    n_layers: int = 8
    n_tokens: int = 256
    mlp_ratio: int = 2            # MLP width in units of d_model; 0: attention-only blocks
    branch_scale: float = 0.25    # RMS of each branch's update relative to RMS(h), on the exact run
    # head shapes and statistics (n_head, n_head_kv, head_dim, outliers, logit_std, rope_base, seed);
    # d_model = n_head * head_dim
    heads: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(n_head=4, n_head_kv=2))

    def __post_init__(self):
        if self.n_layers < 1 or self.n_tokens < 1 or self.mlp_ratio < 0 or not self.branch_scale > 0:
            raise ValueError(f"StackConfig: expected n_layers >= 1, n_tokens >= 1, mlp_ratio >= 0 and "
                             f"branch_scale > 0, got {self.n_layers}, {self.n_tokens}, {self.mlp_ratio}, "
                             f"{self.branch_scale}")

    @property
    def d_model(self) -> int:
        return self.heads.n_head * self.heads.head_dim


# ---- the model -----------------------------------------------------------------------------------

@dataclass
class _Layer:
    """One block's fixed weights, float64 on the run's device; gains are set by the exact run."""
    wq: object       # (d_model, n_head * D)
    wk: object       # (d_model, n_head_kv * D)
    wv: object       # (d_model, n_head_kv * D)
    wo: object       # (n_head * D, d_model)
    w1: object       # (d_model, mlp_ratio * d_model) or None
    w2: object       # (mlp_ratio * d_model, d_model) or None
    q_lean: object   # (n_head, 1, D)
    k_bias: object   # (n_head_kv, 1, D)
    v_scale: object  # (n_head_kv, 1, D)
    g_attn: float = 0.0
    g_mlp: float = 0.0


def _layers(cfg: StackConfig, place) -> list:
    h = cfg.heads
    d, width = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    layers = []
    for l in range(cfg.n_layers):
        rng = np.random.default_rng([h.seed, 10, l])

        def gauss(fan_in, fan_out, std=1.0):  # (fan_in, fan_out), variance std**2 / fan_in
            return _xp.to_device(rng.standard_normal((fan_in, fan_out)) * (std / np.sqrt(fan_in)), place)

        bias, v_scale = head_structure(h, key=(l,))
        layers.append(_Layer(
            wq=gauss(d, h.n_head * h.head_dim, h.logit_std), wk=gauss(d, h.n_head_kv * h.head_dim),
            wv=gauss(d, h.n_head_kv * h.head_dim), wo=gauss(h.n_head * h.head_dim, d),
            w1=gauss(d, width) if width else None, w2=gauss(width, d) if width else None,
            q_lean=_xp.to_device(query_lean(bias, h)[:, None, :], place),
            k_bias=_xp.to_device(bias[:, None, :], place), v_scale=_xp.to_device(v_scale, place)))
    return layers


def _rmsnorm(h):
    return h / ((h * h).mean(axis=-1, keepdims=True) + 1e-6) ** 0.5


def _rms(x) -> float:
    return float((x * x).mean() ** 0.5)


def _gelu(x):
    xp = _xp.namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # tanh form, sqrt(2/pi)


def _heads(x, n_heads: int):
    """(T, n_heads * D) -> (n_heads, T, D)."""
    t = x.shape[0]
    return x.reshape(t, n_heads, -1).swapaxes(0, 1)  # (n_heads, T, D)


def _qkv(layer: _Layer, h, cfg: StackConfig):
    """The activations llama.cpp would cache: float32 (n_head, T, D), (n_head_kv, T, D) x 2."""
    x = _rmsnorm(h)  # (T, d_model)
    positions = np.arange(h.shape[0])
    heads = cfg.heads
    q = rope(_heads(x @ layer.wq, heads.n_head) + layer.q_lean, positions, heads.rope_base, "neox")
    k = rope(_heads(x @ layer.wk, heads.n_head_kv) + layer.k_bias, positions, heads.rope_base, "neox")
    v = _heads(x @ layer.wv, heads.n_head_kv) * layer.v_scale
    return tuple(_xp.contiguous(_xp.cast(a, "float32")) for a in (q, k, v))


def _causal_mask(n_tokens: int, group: int, place):
    """(1, group * T, T): query row r (token r % T) sees keys 0..r % T."""
    tril = np.tril(np.ones((n_tokens, n_tokens), dtype=bool))
    return _xp.to_device(np.tile(tril, (group, 1))[None], place)  # (1, group*T, T)


def _attention(q, k_cache, v_cache, plan: RotationPlan, mask):
    """Causal attention over a cache in the rotated basis, float64: logits (n_head_kv, n_gqa * T, T) and output
    (n_head, T, D)."""
    xp = _xp.namespace(q)
    n_head, t, d = q.shape
    q_rot = rotate(q, plan.k) if plan.k else q
    logits = _xp.cast(group_queries(q_rot, k_cache.shape[0]), "float64") @ _xp.cast(k_cache, "float64").swapaxes(1, 2)
    logits = xp.where(mask, logits * float(1.0 / np.sqrt(d)), -np.inf)
    out = softmax_rows(logits) @ _xp.cast(v_cache, "float64")  # (n_head_kv, n_gqa * T, D)
    return logits, unrotate(out, plan.v).reshape(n_head, t, d)


def _merge(o):
    """(n_head, T, D) -> (T, n_head * D)."""
    return o.swapaxes(0, 1).reshape(o.shape[1], -1)


def _residual(layer: _Layer, h, out, calibrate: float | None = None):
    """h plus the attention branch and the MLP branch; calibrate=branch_scale fixes the gains (exact run)."""
    attn = _merge(out) @ layer.wo
    if calibrate:
        layer.g_attn = calibrate * _rms(h) / _rms(attn)
    h = h + layer.g_attn * attn
    if layer.w1 is not None:
        mlp = _gelu(_rmsnorm(h) @ layer.w1) @ layer.w2
        if calibrate:
            layer.g_mlp = calibrate * _rms(h) / _rms(mlp)
        h = h + layer.g_mlp * mlp
    return h


@dataclass
class _ExactLayer:
    """What the exact run leaves for the comparison at one depth."""
    q: object        # (n_head, T, D) float32, as in _qkv
    k: object        # (n_head_kv, T, D) float32
    v: object        # (n_head_kv, T, D) float32
    logits: object   # (n_head_kv, n_gqa * T, T) float64
    out: object      # attention output (n_head, T, D) float64
    hidden: object   # residual stream after the layer (T, d_model) float64


@dataclass
class Stack:
    """The model (weights with their gains), its input, and the exact run's state at every depth."""
    layers: list
    h0: object       # (T, d_model) float64 token embeddings, N(0, 1)
    mask: object     # (1, group * T, T) causal mask
    exact: list      # _ExactLayer per depth


def exact_stack(cfg: StackConfig, place=None) -> Stack:
    """Build the model on `place` (None: numpy) and run it exactly, which fixes the branch gains."""
    heads = cfg.heads
    layers = _layers(cfg, place)
    mask = _causal_mask(cfg.n_tokens, heads.n_gqa, place)
    h0 = _xp.to_device(np.random.default_rng([heads.seed, 20]).standard_normal((cfg.n_tokens, cfg.d_model)), place)
    h, exact = h0, []
    for layer in layers:
        q, k, v = _qkv(layer, h, cfg)
        logits, out = _attention(q, k, v, NO_ROTATION, mask)
        h = _residual(layer, h, out, calibrate=cfg.branch_scale)
        exact.append(_ExactLayer(q, k, v, logits, out, h))
    return Stack(layers, h0, mask, exact)


def compare_stack(stack: Stack, cfg: StackConfig, cache):
    """The run with quantized caches, layer by layer against the exact run: one metrics dict per depth.

    cache(k, v) -> (k_cache, v_cache, plan): what the cache holds (rotated basis) and its rotation.
    """
    h, own2 = stack.h0, 0.0
    for layer, exact in zip(stack.layers, stack.exact):
        q, k, v = _qkv(layer, h, cfg)
        k_cache, v_cache, plan = cache(k, v)
        logits, out = _attention(q, k_cache, v_cache, plan, stack.mask)
        h = _residual(layer, h, out)
        # the same layer on the exact run's input: the error it adds on its own
        own_k, own_v, _ = cache(exact.k, exact.v)
        _, own_out = _attention(exact.q, own_k, own_v, plan, stack.mask)
        own2 += norm(layer.g_attn * (_merge(own_out - exact.out) @ layer.wo)) ** 2
        yield {
            "hidden_rel_l2": tensor_rel_l2(h, exact.hidden),
            "hidden_own_rel_l2": own2 ** 0.5 / norm(exact.hidden),
            "attn_rel_l2": tensor_rel_l2(out, exact.out),
            "attn_local_rel_l2": tensor_rel_l2(own_out, exact.out),
            "kl": float(softmax_kl(exact.logits, logits, stack.mask).mean()),
            "k_rel_l2": tensor_rel_l2(unrotate(_xp.cast(k_cache, "float64"), plan.k), _xp.cast(exact.k, "float64")),
            "v_rel_l2": tensor_rel_l2(unrotate(_xp.cast(v_cache, "float64"), plan.v), _xp.cast(exact.v, "float64")),
        }


# ---- the table -----------------------------------------------------------------------------------

DEFAULT_PAIRS = (("q4_0", "f16"), ("f16", "q4_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q8_0", "q8_0"),
                 ("q5_1", "q5_0"), ("iq4_nl", "iq4_nl"))


def layer_growth(pairs=DEFAULT_PAIRS, cfg: StackConfig = StackConfig(), rotations=(False, True),
                 flavors=("ref",), device="auto", progress: bool = False, cache_dir=None):
    """Error at every depth of the stack, per K/V type pair, rotation and flavor: a tidy pandas DataFrame.

    pairs: (type_k, type_v) tuples; rotation follows rotation_plan when True (llama.cpp's gate);
    flavors: which code paths write the cache bytes; device as in kvlab.accuracy.sweep.run_sweep.
    One row per (pair, rotation, flavor, depth) with DEPTH_METRICS; df.attrs holds settings and versions.
    Each (pair, rotation, flavor) run is cached in `cache_dir`/depth (default: $KVLAB_CACHE or
    ~/.cache/kvlab), keyed by the stack's settings, the run, the device, the versions and a hash of
    kvlab's sources (kvlab.accuracy.cache); the exact stack runs only when some run is missing.
    """
    import pandas as pd
    pairs = [(type_info(k).name, type_info(v).name) for k, v in pairs]   # any case: Q8_0 is q8_0
    for flavor in flavors:
        flavor_code(flavor)
    place = _xp.resolve_device(device)
    settings, vers = json.loads(json.dumps(asdict(cfg))), versions(place)
    folder = (Path(cache_dir) if cache_dir else default_cache_root()) / "depth"
    key_base = dict(settings=settings, versions=vers, device=_xp.device_label(place), sources=source_hash())
    runs = [(k, v, r, f) for k, v in pairs for r in rotations for f in flavors]
    stack, frames = None, []
    with progress_bar(len(runs), "kvlab layer growth", "stack", progress) as bar:
        for type_k, type_v, rotation, flavor in runs:
            path = folder / f"{frame_key(**key_base, run=[type_k, type_v, rotation, flavor])}.parquet"
            frame = read_frame(path, cfg.n_layers)
            if frame is None:
                stack = stack or exact_stack(cfg, place)
                frame = pd.DataFrame(_run_rows(stack, cfg, type_k, type_v, rotation, flavor))
                write_frame(frame, path)
            frames.append(frame)
            bar.update(1)
    table = pd.concat(frames, ignore_index=True)
    table["bits_per_value"] = [(TYPES[k].bits_per_weight + TYPES[v].bits_per_weight) / 2
                               for k, v in zip(table.type_k, table.type_v)]
    table["n_layers"], table["n_tokens"], table["d_model"] = cfg.n_layers, cfg.n_tokens, cfg.d_model
    table["device"] = _xp.device_label(place)
    table.attrs.update(settings=settings, versions=vers, device=_xp.device_label(place),
                       source=f"random pre-norm stack (seed={cfg.heads.seed})")
    return table


def _run_rows(stack: Stack, cfg: StackConfig, type_k: str, type_v: str, rotation: bool, flavor: str) -> list:
    """One run through the stack with quantized caches: a row of DEPTH_METRICS per depth."""
    plan = rotation_plan(type_k, type_v, cfg.heads.head_dim, disable=not rotation)
    cache = lambda k, v: (store(k, type_k, flavor, plan.k), store(v, type_v, flavor, plan.v), plan)
    return [dict(type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor, depth=depth,
                 rot_k=plan.k or 0, rot_v=plan.v or 0, **m)
            for depth, m in enumerate(compare_stack(stack, cfg, cache), start=1)]


# ---- command line (used by `kvlab sweep` and `kvlab report`) --------------------------------------


