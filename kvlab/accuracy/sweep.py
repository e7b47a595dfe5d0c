"""The error sweep: every K-V type pair x rotation off/on x flavor x context length, as one tidy table.

One row per cell, with the metrics of `kvlab.attention_error` (see kvlab.accuracy.metrics) and the settings
that made it. The flavor picks both the bytes written into the cache and the backend that reads
them (ref: exact float64 attention; cpu / cuda: what ggml's flash attention does, see
kvlab.accuracy.attention); a row's `backend` and `kernel` name what read that cell (ggml-cuda has no kernel
for some pairs and runs their attention on the CPU, so a cuda-flavor row can say "cpu"). A shorter context is
the prefix of the longest one, and its queries are the n_q tokens at its end, so each K/V cache is quantized
once per (type, flavor, rotation) and sliced.

Vectorized: per (flavor, rotation, length, K type) one K.Q product and one batched softmax @ V over
all V types that share the backend's code path: kvlab.accuracy.attention.attend_cache, the pipeline
`attention_error` runs for one cell. Results are cached on disk per (flavor, rotation) chunk, keyed by
the data, the settings, the device, the library versions and a hash of the code (kvlab.accuracy.cache),
so a rerun or an interrupted run costs only what is missing. Entries are written to a temporary file
and renamed; one that cannot be read or has the wrong rows is recomputed, never trusted.

Device: numpy on the CPU by default, torch on the GPU when one is present (`device="auto"`): the
cache is written and read by the CUDA kernels (kvlab.quantize on CUDA tensors) and the attention
math runs in torch on the GPU; only the metrics of each cell (small) come back to the host. The
same functions (kvlab.accuracy.attention) run on both; see kvlab._xp.
"""
from dataclasses import asdict, dataclass, field
import json
from pathlib import Path

from kvlab import _xp
from kvlab._progress import progress_bar
from kvlab.accuracy.attention import (VCaches, attend_cache, cache_rel_l2, cell_metrics, check_topk, exact_attention,
                                      store_bytes)
from kvlab.accuracy.cache import default_cache_root, frame_key, read_frame, source_hash, write_frame
from kvlab.accuracy.metrics import METRICS
from kvlab.quant import check_head_dim, int_shape
from kvlab.rotation import rotate, rotation_plan
from kvlab.accuracy.sample import KVSample, as_sample, synthetic_sample
from kvlab.accuracy.synthetic import SyntheticConfig
from kvlab.accuracy.table import versions
from kvlab.types import FLAVORS, TYPES, flavor_code, type_info


@dataclass(frozen=True)
class SweepConfig:
    lengths: tuple = (128, 512, 2048, 8192)
    n_q: int = 4                        # query tokens at the end of each context
    types_k: tuple = tuple(TYPES)
    types_v: tuple = tuple(TYPES)
    rotations: tuple = (False, True)
    flavors: tuple = FLAVORS
    topk: int = 8
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        for side in ("types_k", "types_v"):   # canonical names: any case is accepted (Q8_0 is q8_0)
            object.__setattr__(self, side, tuple(type_info(t).name for t in getattr(self, side)))
        for f in self.flavors:
            flavor_code(f)
        for name in ("types_k", "types_v", "rotations", "flavors", "lengths"):
            if not getattr(self, name):
                raise ValueError(f"SweepConfig: {name} is empty: a sweep of no cells")
        if not all(isinstance(r, bool) for r in self.rotations):
            raise ValueError(f"SweepConfig: rotations must be True/False, got {self.rotations}")
        int_shape(self.lengths, "SweepConfig lengths")
        int_shape((self.n_q,), "SweepConfig n_q")
        if min(self.lengths) < self.n_q or self.n_q < 1:
            raise ValueError(f"lengths must be >= n_q >= 1, got lengths={self.lengths}, n_q={self.n_q}")
        check_topk(self.topk)
        check_head_dim(self.synthetic.head_dim, self.types_k + self.types_v, "SweepConfig")

    def settings(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def default_cache_dir() -> Path:
    return default_cache_root() / "sweep"


CACHE_COLUMNS = ("type_k", "type_v", "rotation", "flavor", "n_ctx", *METRICS)   # what a cached chunk must hold


# ---- one (flavor, rotation) chunk ----------------------------------------------------------------

def _exact_by_length(sample: KVSample, cfg: SweepConfig, place) -> dict:
    """Exact attention at every context length (its logits and output on the host, for the metrics)."""
    k, v = _xp.to_device(sample.k, place), _xp.to_device(sample.v, place)
    return {n: exact_attention(_xp.to_device(sample.queries_for(n, cfg.n_q), place), k[:, :n], v[:, :n])
            for n in cfg.lengths}


def _chunk_rows(sample: KVSample, cfg: SweepConfig, flavor: str, rotation: bool, exact_by_len, progress,
                place=None):
    head_dim = sample.k.shape[-1]
    plan_of = lambda t: rotation_plan(t, t, head_dim, disable=not rotation)  # .k for K, .v for V
    k_in, v_in = _xp.to_device(sample.k, place), _xp.to_device(sample.v, place)
    k_stored = {t: store_bytes(k_in, t, flavor, plan_of(t).k) for t in cfg.types_k}  # (values, bytes)
    v_stored = {t: store_bytes(v_in, t, flavor, plan_of(t).v) for t in cfg.types_v}        # (values, bytes)
    v_caches = VCaches({t: s[0] for t, s in v_stored.items()}, {t: s[1] for t, s in v_stored.items()})
    k_err = {t: cache_rel_l2(k_stored[t][0], plan_of(t).k, k_in) for t in cfg.types_k}
    v_err = {t: cache_rel_l2(v_caches.stored[:, :, i], plan_of(t).v, v_in) for i, t in enumerate(v_caches.types)}
    rows = []
    for length in cfg.lengths:
        exact = exact_by_len[length]
        q = _xp.to_device(sample.queries_for(length, cfg.n_q), place)
        for type_k in cfg.types_k:
            rot_k = plan_of(type_k).k
            q_rot = rotate(q, rot_k) if rot_k else q
            for logits, cells in attend_cache(q_rot, k_stored[type_k], type_k, v_caches, length, flavor, exact.scale):
                host_logits = _xp.to_host(logits)  # once per K.Q product
                for i, path, out_rot in cells:
                    type_v = v_caches.types[i]
                    m = cell_metrics(exact, host_logits, out_rot, plan_of(type_v).v, cfg.topk)
                    rows.append(dict(
                        type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor, backend=path.backend,
                        kernel=path.kernel, n_ctx=length, rot_k=rot_k or 0, rot_v=plan_of(type_v).v or 0,
                        **m, k_rel_l2=float(k_err[type_k][length - 1]), v_rel_l2=float(v_err[type_v][length - 1])))
            progress.update(len(v_caches.types))
    return rows


def run_sweep(sample: KVSample, cfg: SweepConfig = SweepConfig(), cache_dir=None, progress: bool = True,
              device="auto"):
    """The tidy table (pandas DataFrame) of every cell; df.attrs holds settings and versions.

    sample: a KVSample, or the (q, k, v) of kvlab.synthetic_kv (queries at the end: one length, n_kv,
    with cfg.n_q = q.shape[1]).

    device: "auto" (the GPU when torch sees one, else numpy on the CPU), "cpu", "cuda[:N]" or a
    torch.device (see kvlab._xp.resolve_device).
    """
    import pandas as pd
    sample = as_sample(sample)
    check_head_dim(sample.k.shape[-1], cfg.types_k + cfg.types_v, "run_sweep")
    if sample.k.shape[1] < max(cfg.lengths):
        raise ValueError(f"{sample.name}: {sample.k.shape[1]} tokens, but lengths go to {max(cfg.lengths)}")
    place = _xp.resolve_device(device)
    where = _xp.device_label(place)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    settings, vers = cfg.settings(), versions(place)
    exact_by_len = _exact_by_length(sample, cfg, place)
    chunks = [(f, r) for f in cfg.flavors for r in cfg.rotations]
    cells_per_chunk = len(cfg.lengths) * len(cfg.types_k) * len(cfg.types_v)
    frames = []
    with progress_bar(len(chunks) * cells_per_chunk, "kvlab sweep", "cell", progress) as bar:
        for flavor, rotation in chunks:
            key = frame_key(data=sample.fingerprint(), settings=settings, flavor=flavor, rotation=rotation,
                            device=where, versions=vers, sources=source_hash())
            path = cache_dir / f"{key}.parquet"
            frame = read_frame(path, cells_per_chunk, CACHE_COLUMNS)
            if frame is not None:
                bar.update(cells_per_chunk)
            else:
                frame = pd.DataFrame(_chunk_rows(sample, cfg, flavor, rotation, exact_by_len, bar, place))
                write_frame(frame, path)
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    n_head, _, head_dim = sample.q.shape
    table.insert(0, "source", sample.name)
    table["n_head"], table["n_head_kv"], table["head_dim"], table["n_q"] = n_head, sample.k.shape[0], head_dim, cfg.n_q
    table["bits_k"] = table["type_k"].map(lambda t: TYPES[t].bits_per_weight)
    table["bits_v"] = table["type_v"].map(lambda t: TYPES[t].bits_per_weight)
    table["bits_per_value"] = (table["bits_k"] + table["bits_v"]) / 2
    table["device"] = where
    table.attrs.update(settings=settings, versions=vers, data=sample.fingerprint(), source=sample.name,
                       device=where)
    return table


def sweep(cfg: SweepConfig = SweepConfig(), sample: KVSample | None = None, **kwargs):
    """run_sweep on `sample`, or on the synthetic data of cfg.synthetic when none is given."""
    sample = sample or synthetic_sample(cfg.lengths, cfg.n_q, cfg.synthetic)
    return run_sweep(sample, cfg, **kwargs)


# ---- command line --------------------------------------------------------------------------------


