"""Decode steps measured on GPUs (bench/tp_decode.py's JSON lines), read back for plotting."""
import json
from pathlib import Path


def load_measured(path):
    """bench/tp_decode.py JSON lines as a DataFrame, or None when the file is not there."""
    import pandas as pd
    path = Path(path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return pd.DataFrame([r for r in rows if r.get("bench") == "tp_decode"])
