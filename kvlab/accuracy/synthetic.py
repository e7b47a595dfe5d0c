"""Synthetic Q/K/V with the statistics that make KV-cache quantization hard in real LLMs.

- K has a few fixed outlier channels per KV head (large, same sign for every token), chosen among
  RoPE's low-frequency pairs, where they barely rotate; they set the scale of their quantization
  block and wash out the other 31 values in it. Q leans on the same channels, as in real models.
- RoPE (rotate-half / NeoX pairing, as in Llama and Qwen) is applied to Q and K at their positions.
- V is Student-t distributed (heavier tails than a normal) with per-channel scales.
- GQA: n_head query heads share n_head_kv KV heads.
Everything derives from `seed`; K and V of position t are the same whatever n_kv is asked for,
so a shorter context is a prefix of a longer one.
"""
from dataclasses import dataclass

import numpy as np

from kvlab.rope import rope
from kvlab.shape import HeadShape


@dataclass(frozen=True)
class SyntheticConfig(HeadShape):
    n_head: int = 8                # HeadShape's fields, smaller defaults (head_dim stays 128)
    n_head_kv: int = 2
    n_q: int = 4                   # query tokens: the last n_q positions of the context
    n_outliers: int = 4            # outlier channels per KV head
    outlier_scale: float = 10.0    # outlier magnitude, in units of the bulk's standard deviation
    v_dof: float = 4.0             # Student-t degrees of freedom of V
    logit_std: float = 2.5         # spread of q.k/sqrt(D) from the bulk channels
    rope_base: float = 10000.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n_q < 1:
            raise ValueError(f"n_q must be at least 1, got {self.n_q}")
        if not (self.rope_base > 0 and self.v_dof > 0 and self.logit_std >= 0 and np.isfinite(self.outlier_scale)):
            raise ValueError(f"rope_base and v_dof must be > 0, logit_std >= 0 and outlier_scale finite, got "
                             f"{self.rope_base}, {self.v_dof}, {self.logit_std}, {self.outlier_scale}")
        if self.head_dim % 32 or self.head_dim < 64:
            raise ValueError(f"head_dim must be a multiple of 32 and at least 64, got {self.head_dim}")
        if not 0 <= self.n_outliers <= self.head_dim // 4:
            raise ValueError(f"n_outliers must lie in [0, head_dim/4], got {self.n_outliers}")


def head_structure(cfg: SyntheticConfig, key: tuple = ()):
    """Per KV head: K's outlier bias (n_head_kv, D) and V's channel scales (n_head_kv, 1, D).

    `key` draws another head's structure from the same seed (kvlab.accuracy.depth: one per layer).
    """
    rng = np.random.default_rng([cfg.seed, 0, *key])
    half = cfg.head_dim // 2
    low_freq = np.arange(half - half // 4, half)  # the slowest-rotating quarter of the pairs
    bias = np.zeros((cfg.n_head_kv, cfg.head_dim))
    for h in range(cfg.n_head_kv):
        pairs = rng.choice(low_freq, size=cfg.n_outliers, replace=False)
        channels = np.where(rng.random(cfg.n_outliers) < 0.5, pairs, pairs + half)
        bias[h, channels] = cfg.outlier_scale * rng.choice([-1.0, 1.0], cfg.n_outliers) * rng.uniform(0.7, 1.0, cfg.n_outliers)
    v_scale = np.exp(rng.normal(0.0, 0.5, (cfg.n_head_kv, 1, cfg.head_dim)))
    return bias, v_scale


CHUNK = 256  # positions drawn together from one generator


def _per_position(seed_key, positions, shape_tail, draw):
    """Draws that depend on (seed, position) only: (*shape_tail[:-1], len(positions), shape_tail[-1])."""
    lead, width = shape_tail[:-1], shape_tail[-1]
    out = np.empty(lead + (len(positions), width))
    for chunk in np.unique(positions // CHUNK):
        rows = draw(np.random.default_rng(list(seed_key) + [int(chunk)]), (CHUNK,) + shape_tail)  # (CHUNK, *lead, width)
        sel = np.nonzero(positions // CHUNK == chunk)[0]
        out[..., sel, :] = np.moveaxis(rows[positions[sel] % CHUNK], 0, -2)
    return out


def synthetic_queries(positions, cfg: SyntheticConfig = SyntheticConfig()) -> np.ndarray:
    """Q at the given positions: (n_head, len(positions), head_dim) float32, post-RoPE."""
    positions = np.asarray(positions, dtype=np.int64)
    bias, _ = head_structure(cfg)
    bulk_std = cfg.logit_std  # q.k/sqrt(D) over N(0,1) keys has std |q_bulk| / sqrt(D) = bulk_std
    normal = lambda rng, shape: rng.standard_normal(shape)
    q = bulk_std * _per_position((cfg.seed, 1), positions, (cfg.n_head, cfg.head_dim), normal)  # (H, T, D)
    q += query_lean(bias, cfg)[:, None, :]
    return rope(q, positions, cfg.rope_base, "neox").astype(np.float32)  # q: (H, T, D)


def query_lean(bias: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """(n_head, D): Q leans on its KV head's outlier channels (their sign, a tenth of the logit spread)."""
    return 0.1 * cfg.logit_std * np.repeat(np.sign(bias), cfg.n_gqa, axis=0)


def synthetic_kv(n_kv: int, cfg: SyntheticConfig = SyntheticConfig()):
    """(q, k, v): q (n_head, n_q, D) at the last n_q positions; k, v (n_head_kv, n_kv, D); float32."""
    if n_kv < 1:
        raise ValueError(f"n_kv must be positive, got {n_kv}")
    bias, v_scale = head_structure(cfg)
    positions = np.arange(n_kv)
    normal = lambda rng, shape: rng.standard_normal(shape)
    student = lambda rng, shape: rng.standard_t(cfg.v_dof, shape)
    k = bias[:, None, :] + _per_position((cfg.seed, 2), positions, (cfg.n_head_kv, cfg.head_dim), normal)
    k = rope(k, positions, cfg.rope_base, "neox")  # (n_head_kv, n_kv, D)
    v = v_scale * _per_position((cfg.seed, 3), positions, (cfg.n_head_kv, cfg.head_dim), student)
    q = synthetic_queries(positions[-cfg.n_q:], cfg)
    return q, k.astype(np.float32), v.astype(np.float32)
