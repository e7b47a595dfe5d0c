"""The on-disk cache of result frames (layer growth): one parquet file per key, written to a temporary
name and renamed, so a killed run never leaves a half-written entry; an entry that cannot be read or
has the wrong number of rows is recomputed, with a warning, never trusted."""
import hashlib
import json
import os
from pathlib import Path
import warnings


def default_cache_root() -> Path:
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))


def source_hash() -> str:
    """A hash of the code results come from: the kernels, kvlab.accuracy and kvlab's top-level modules
    (quant, rotation, types, ...), so an edited kernel never serves results cached before the edit."""
    import kvlab.kernels   # not the kvlab façade: it imports this module (tests/test_layering.py)
    here = Path(__file__).resolve().parent   # kvlab/accuracy
    roots = (Path(kvlab.kernels.__file__).parent, here)
    files = sorted(p for root in roots for p in root.rglob("*.py")) + sorted(here.parent.glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def frame_key(**parts) -> str:
    """A file name from everything a result depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_frame(path: Path, n_rows: int):
    """The cached frame, or None when absent, unreadable or not n_rows long."""
    if not path.exists():
        return None
    import pandas as pd
    try:
        frame = pd.read_parquet(path)
    except Exception as e:   # a truncated or foreign file: whatever pyarrow raises, recompute
        warnings.warn(f"kvlab cache: {path} is unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    if len(frame) != n_rows:
        warnings.warn(f"kvlab cache: {path} has {len(frame)} rows, expected {n_rows}; recomputing")
        return None
    return frame


def write_frame(frame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
