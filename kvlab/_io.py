"""Files written whole or not at all: every writer fills a temporary file beside the target, then renames it.

A run killed mid-write, a full disk or a writer that raises leaves the previous file as it was (and no
temporary file behind): os.replace within one directory is atomic on POSIX and Windows.
"""
from contextlib import contextmanager
import os
from pathlib import Path
import secrets


@contextmanager
def atomic_path(path):
    """Yield a temporary path in path's directory, with path's suffix (writers such as np.savez pick
    the format by it), for the caller to write; on success it replaces `path`, on error it is removed.

        with atomic_path("table.parquet") as tmp:
            table.to_parquet(tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:   # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    """path.write_text(text), atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
