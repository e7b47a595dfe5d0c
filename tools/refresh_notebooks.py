"""Run the notebooks and store their outputs the way they should open: figures and tables, no widgets.

    .venv/bin/python tools/refresh_notebooks.py [notebooks/03_split_axis_flow.ipynb ...]   (default: all)

An explorer's output only exists in a live kernel, and a stored widget view opens as its text repr
(`VBox(children=(HTML(...`) in JupyterLab: widget outputs, the widget state, and stderr (progress
bars) are dropped; everything else is kept. tests/test_notebooks_support.py checks the stored files.
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from kvlab._io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class WidgetlessClient(NotebookClient):
    """Leaves widget comms alone: an explorer's drawing, routed to its Output widget in a browser, arrives as
    the cell's own output here, and is dropped with the widget view by clean(). (nbclient's Output-widget
    emulation stalled for minutes on a 250 KB figure.)"""

    def handle_comm_msg(self, outs, msg, cell_index) -> None:
        pass


def clean(nb) -> None:
    """Keep what opens cleanly: no cell that shows a widget keeps outputs, no stderr, no widget state, no timings."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)   # timestamps: a diff on every run
        if any(WIDGET_VIEW in o.get("data", {}) for o in cell.outputs):
            cell.outputs = []
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nb.metadata.pop("widgets", None)


def refresh(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    WidgetlessClient(nb, timeout=900, kernel_name="python3", store_widget_state=False,
                     resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors:
        raise SystemExit(f"{path.name}: {errors[0].ename}: {errors[0].evalue}")
    clean(nb)
    with atomic_path(path) as tmp:
        nbformat.write(nb, tmp)
    print(f"refreshed {path.relative_to(ROOT)}")


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted((ROOT / "notebooks").glob("*.ipynb")):
        refresh(Path(name).resolve())
