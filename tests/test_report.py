"""`kvlab report`: one offline HTML file with every section; Chromium renders the heatmaps."""
import base64
import time

import pytest

from kvlab.cli import build_parser
from kvlab.viz.plots import pareto_front
from tests.browser_tools import ARTIFACTS, CHROMIUM, Deadline, open_chromium, stop


@pytest.fixture(scope="module")
def html_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    args = build_parser().parse_args(["report", "--quick", "--out", str(tmp / "r.html"), "--table", str(tmp / "t.parquet"),
                              "--cache-dir", str(tmp / "cache"), "--no-progress"])
    assert args.run(args) == 0
    return tmp / "r.html"


def test_report_is_one_offline_file_with_every_section(html_file):
    text = html_file.read_text()
    assert "<script src=" not in text  # plotly.js is inlined: the file opens offline
    assert text.count("Plotly.newPlot") >= 10
    for section in ("rotation off / on / on ÷ off", "Softmax KL per K type", "Error vs context length",
                    "Pareto frontier", "flavors (ref / cpu / cuda) disagree", "Summary", "PR #7412", "#1034",
                    "Error vs depth", "Error compounds through the layers", "arXiv:2502.04420",
                    "Tensor parallelism", "Why it broke", "What PR #23225 and PR #23792 changed",
                    "Which pairs run now", "MQA with the rotation still aborts after PR #23792",
                    "The split of each tensor", "Where the split rules stop a graph", "Settings and versions"):
        assert section in text, section
    assert "could be retrieved here" not in text   # no authoring notes
    assert "{'settings'" not in text                # settings as a table, not a dict repr
    assert "GGML_ASSERT(src_ss[0].axis != GGML_BACKEND_SPLIT_AXIS_1)" in text   # flatten's failing rule
    assert "simultaneous use of SPLIT_MODE_TENSOR" in text                       # and its init guard
    assert (html_file.parent / "t.parquet").exists() and (html_file.parent / "t.layers.parquet").exists()


def test_pareto_front_keeps_only_undominated_points():
    points = [(4.5, 0.1), (8.5, 0.01), (6.0, 0.2), (16.0, 0.001), (8.5, 0.05)]
    assert pareto_front(points) == [0, 1, 3]


FIGURES_DRAWN = """(() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => ({
  title: (div.layout && div.layout.title && div.layout.title.text) || '',
  svg: !!div.querySelector('svg.main-svg'),
  traces: div.querySelectorAll('g.trace, g.hm, image').length,
  data: (div.data || []).length,
})))()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_report_draws_every_figure_in_chromium_without_console_errors(html_file, tmp_path):
    n_divs = html_file.read_text().count('class="plotly-graph-div"')
    deadline = Deadline(120)
    browser, tools = open_chromium(tmp_path, deadline, width=1400, height=1200)
    try:
        tools.call("Page.navigate", url=html_file.as_uri())
        figures = deadline.wait_for("every figure to draw", lambda: (
            lambda f: f if len(f) == n_divs and all(x["svg"] and x["traces"] for x in f) else None)(
                tools.js(FIGURES_DRAWN)))
        assert n_divs >= 10 and all(f["data"] > 0 for f in figures), figures
        assert tools.console_errors() == []
        height = int(tools.call("Page.getLayoutMetrics")["cssContentSize"]["height"])
        tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)   # plotly redraws at the new size
        png = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "report.png").write_bytes(png)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "browser_report.png").write_bytes(png)
        assert tools.console_errors() == []
    finally:
        tools.close()
        stop(browser)
