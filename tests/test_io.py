"""kvlab._io: every file kvlab writes is whole or absent: a temporary file beside it, renamed (issue 16)."""
import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch

import kvlab
from kvlab import _io
from tests.io_tools import half_written_then_fail, no_temporaries, small_sample

@pytest.fixture(scope="module")
def sample():
    return small_sample()


def test_atomic_path_replaces_whole_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    _io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and no_temporaries(tmp_path)
    _io.write_text(target, "new")
    assert target.read_text() == "new" and no_temporaries(tmp_path)


def test_a_failed_save_table_leaves_the_previous_table(tmp_path, monkeypatch):
    table = pd.DataFrame({"kl": [0.1, 0.2]})
    table.attrs["settings"] = {"a": 1}
    path = tmp_path / "t.parquet"
    kvlab.save_table(table, path)
    before, meta_before = path.read_bytes(), (tmp_path / "t.parquet.json").read_text()
    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written_then_fail)
    with pytest.raises(OSError, match="No space"):
        kvlab.save_table(pd.DataFrame({"kl": [9.0]}), path)
    assert path.read_bytes() == before and (tmp_path / "t.parquet.json").read_text() == meta_before
    assert no_temporaries(tmp_path)
    assert pd.read_parquet(path)["kl"].tolist() == [0.1, 0.2]


def _fail_text_midway(monkeypatch):
    """Path.write_text that writes half the text, then hits a full disk."""
    def write_half(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", write_half)


def test_a_failed_report_write_leaves_the_previous_report(tmp_path, monkeypatch, sample):
    from kvlab.viz import report, report_tp
    monkeypatch.setattr(report_tp, "tp_section", lambda plots: [])   # its figures cost seconds, written the same way
    cfg = kvlab.SweepConfig(lengths=(64,), n_q=2, types_k=("q8_0", "f16"), types_v=("q8_0", "f16"),
                            rotations=(False,), flavors=("ref",))
    table = kvlab.run_sweep(sample, cfg, cache_dir=tmp_path / "cache", progress=False)
    out = tmp_path / "r.html"
    out.write_text("<html>previous</html>")
    _fail_text_midway(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        report.build_report(table, out)
    assert out.read_text() == "<html>previous</html>" and no_temporaries(tmp_path)


def test_a_failed_eval_json_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from kvlab.cli import build_parser
    from kvlab.hf import evaluate

    class Result:   # what evaluate returns, as far as the JSON goes: the model run is tests/hf's business
        n_chunks = 1

        def summaries(self):
            return [{"type_k": "q8_0", "type_v": "q8_0", "mean_kld": 0.0}]
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: Result())
    monkeypatch.setattr(evaluate, "format_table", lambda result: "")
    monkeypatch.setattr(evaluate, "tiny_llama", torch.nn.Identity)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = tmp_path / "kld.json"
    out.write_text('{"previous": true}')
    args = build_parser().parse_args(["eval", "--tiny", "--text", str(text), "--ctx", "32", "--chunks", "1",
                                      "--quiet", "--pairs", "q8_0/q8_0", "--json", str(out), "--device", "cpu"])
    assert args.run(args) == 0
    assert json.loads(out.read_text())["pairs"] == Result().summaries()
    out.write_text('{"previous": true}')
    _fail_text_midway(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        args.run(args)
    assert json.loads(out.read_text()) == {"previous": True} and no_temporaries(tmp_path)


def test_save_sample_is_atomic_and_names_the_file_it_wrote(tmp_path, sample, monkeypatch):
    written = kvlab.save_sample(sample, tmp_path / "s")
    assert written == tmp_path / "s.npz" and written.exists()
    assert kvlab.load_sample(written).fingerprint() != ""
    before = written.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", lambda path, **kw: half_written_then_fail(None, path))
    with pytest.raises(OSError):
        kvlab.save_sample(sample, written)
    assert written.read_bytes() == before and no_temporaries(tmp_path)
