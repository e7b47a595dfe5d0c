"""Result tables: the versions a table was made with, and writing a table beside its settings."""
import json
from pathlib import Path
import platform

import numpy as np

from kvlab._io import atomic_path, write_text


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


def sig(x: float, digits: int = 2) -> str:
    """A number for printed tables that stays the same across machines: a few significant digits,
    and 0 below 1e-10 (float64 rounding noise of lossless pairs)."""
    return "0" if abs(x) < 1e-10 else f"{x:.{digits}g}"


def pair_table(table, pairs, metrics=("kl", "out_rel_l2"), flavor: str = "ref", n_ctx=None):
    """Rows K/V pair, columns metric x rotation off/on, at one context length: printable strings."""
    import pandas as pd
    from kvlab.types import TYPES
    sel = select(table, flavor=flavor, n_ctx=n_ctx or int(table.n_ctx.max()))
    rows = {}
    for type_k, type_v in pairs:
        cell = select(sel, type_k=type_k, type_v=type_v).set_index("rotation")
        row = {"bits/value": f"{TYPES[type_k].bits_per_weight / 2 + TYPES[type_v].bits_per_weight / 2:g}"}
        for m in metrics:
            for rot in (False, True):
                row[f"{m} rot {'on' if rot else 'off'}"] = sig(float(cell.loc[rot, m]))
        rows[f"{type_k}/{type_v}"] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def context_growth(table, type_k: str, type_v: str, metric: str = "kl", rotation: bool = True, flavor: str = "ref"):
    """(shortest context, longest context, metric at the shortest, at the longest) for one pair."""
    sel = select(table, type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor)
    per_length = sel.groupby("n_ctx")[metric].mean()
    return int(per_length.index.min()), int(per_length.index.max()), float(per_length.iloc[0]), float(per_length.iloc[-1])


def growth_word(ratio: float) -> str:
    """How a report or notebook names a change by `ratio` (later / earlier): within 10% is "about the same"."""
    return "grows" if ratio > 1.1 else "falls" if ratio < 0.9 else "stays about the same"


def save_table(table, path) -> list:
    """Write the table as parquet (.parquet) or CSV (.csv), plus <path>.json with settings and versions."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise ValueError(f"save_table: expected a .parquet or .csv path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:   # a failed write leaves the previous table as it was
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    meta = write_text(path.with_suffix(path.suffix + ".json"), json.dumps(table.attrs, indent=2, default=str))
    return [path, meta]


def layers_path(table_path) -> Path:
    """Where the layer-growth table goes beside a sweep table: t.parquet -> t.layers.parquet."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}.layers{path.suffix}")
