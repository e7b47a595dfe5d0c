"""`kvlab report`: one offline HTML file with every section; Chromium renders the heatmaps."""
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

from kvlab.cli import build_parser
from kvlab.viz.plots import pareto_front

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
    assert text.count("Plotly.newPlot") >= 7
    for section in ("rotation off / on / difference", "Error vs context length", "Pareto frontier",
                    "flavors (ref / cpu / cuda) disagree", "Summary", "PR #7412", "#1034",
                    "Error vs depth", "Error compounds through the layers", "arXiv:2502.04420"):
        assert section in text, section
    assert (html_file.parent / "t.parquet").exists() and (html_file.parent / "t.layers.parquet").exists()


def test_pareto_front_keeps_only_undominated_points():
    points = [(4.5, 0.1), (8.5, 0.01), (6.0, 0.2), (16.0, 0.001), (8.5, 0.05)]
    assert pareto_front(points) == [0, 1, 3]


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) to (h, w, channels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6)
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    for y in range(height):  # undo the per-row filters of the PNG spec
        f, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros_like(row)
        if f in (0, 2):
            out[y] = (row + (up if f == 2 else 0)) % 256
            continue
        cur = out[y]
        for x in range(len(row)):
            left = cur[x - bpp] if x >= bpp else 0
            if f == 1:
                pred = left
            elif f == 3:
                pred = (left + up[x]) // 2
            else:
                ul = up[x - bpp] if x >= bpp else 0
                p = left + up[x] - ul
                pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - ul)
                pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else ul)
            cur[x] = (row[x] + pred) % 256
    return out.reshape(height, width, bpp)[..., :3]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_headless_chromium_shows_the_heatmaps(html_file, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2000", "--virtual-time-budget=20000", f"--screenshot={shot}",
                    html_file.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = _png_pixels(shot.read_bytes())
    background = np.all(pixels >= 250, axis=-1)
    colors = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert (~background).mean() > 0.1       # not a blank page
    assert len(colors) > 200                 # rendered heatmap colour scales, not just text
    # the heatmaps sit below the text: the lower half of the shot holds many coloured cells
    lower = pixels[pixels.shape[0] // 2:]
    saturated = (lower.max(axis=-1) - lower.min(axis=-1)) > 60
    assert saturated.mean() > 0.02
