"""Result tables: the versions a table was made with, and writing a table beside its settings."""
import json
from pathlib import Path
import platform

import numpy as np


def versions(place=None) -> dict:
    import numba
    from kvlab import __version__
    found = {"kvlab": __version__, "numpy": np.__version__, "numba": numba.__version__,
             "python": platform.python_version(), "machine": platform.machine()}
    if place is not None:
        import torch
        found["torch"] = torch.__version__
        if place.type == "cuda":
            found["gpu"] = torch.cuda.get_device_name(place)
    return found


def select(table, **where):
    """The rows of a tidy table whose columns equal the given values: select(t, flavor="ref", n_ctx=512)."""
    for column, value in where.items():
        table = table[table[column] == value]
    return table


def save_table(table, path) -> list:
    """Write the table as parquet (.parquet) or CSV (.csv), plus <path>.json with settings and versions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        raise ValueError(f"save_table: expected a .parquet or .csv path, got {path}")
    meta = path.with_suffix(path.suffix + ".json")
    meta.write_text(json.dumps(table.attrs, indent=2, default=str))
    return [path, meta]


def layers_path(table_path) -> Path:
    """Where the layer-growth table goes beside a sweep table: t.parquet -> t.layers.parquet."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}.layers{path.suffix}")
