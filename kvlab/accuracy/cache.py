"""The on-disk cache of result frames (the sweep's chunks, layer growth): one parquet file per key, written
to a temporary name and renamed (kvlab._io), so a killed run never leaves a half-written entry; an entry
that cannot be read or has the wrong rows is recomputed, with a warning, never trusted."""
import hashlib
import json
import os
from pathlib import Path
import warnings

from kvlab._io import atomic_path


def default_cache_root() -> Path:
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))


def source_files() -> list:
    """The code results come from: the kernels (with the measured rcp.approx table the cuda flavor
    reads), kvlab.accuracy and kvlab's top-level modules (quant, rotation, types, ...)."""
    import kvlab.kernels   # not the kvlab façade: it imports this module (tests/test_layering.py)
    here = Path(__file__).resolve().parent   # kvlab/accuracy
    kernels = Path(kvlab.kernels.__file__).parent
    return sorted([*kernels.rglob("*.py"), *kernels.rglob("*.npz"), *here.rglob("*.py"), *here.parent.glob("*.py")])


def source_hash(files=None) -> str:
    """A hash of source_files(), so an edited kernel never serves results cached before the edit."""
    h = hashlib.sha256()
    for f in source_files() if files is None else files:
        h.update(f"{f.parent.name}/{f.name}".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def frame_key(**parts) -> str:
    """A file name from everything a result depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_frame(path: Path, n_rows: int, columns=()):
    """The cached frame, or None when absent, unreadable, not n_rows long or missing one of `columns`."""
    if not path.exists():
        return None
    import pandas as pd
    try:
        frame = pd.read_parquet(path)
    except Exception as e:   # a truncated or foreign file: whatever pyarrow raises, recompute
        warnings.warn(f"kvlab cache: {path} is unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    missing = sorted(set(columns) - set(frame.columns))
    if len(frame) != n_rows or missing:
        warnings.warn(f"kvlab cache: {path} has {len(frame)} rows (expected {n_rows})"
                      f"{f', lacks {missing}' if missing else ''}; recomputing")
        return None
    return frame


def write_frame(frame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
