"""kvlab.accuracy.cache: an entry that cannot be trusted is recomputed; the key covers data, settings and code
(issue 16)."""
import numpy as np
import pandas as pd
import pytest

import kvlab
from kvlab.accuracy import sweep as sweep_mod
from tests.io_tools import half_written_then_fail, no_temporaries, small_sample

CFG = kvlab.SweepConfig(lengths=(64,), n_q=2, types_k=("q4_0", "f16"), types_v=("q8_0",), rotations=(False,),
                        flavors=("ref",))


@pytest.fixture(scope="module")
def sample():
    return small_sample()


def _entries(cache_dir):
    return sorted(cache_dir.glob("*.parquet"))


def test_a_truncated_cache_entry_is_recomputed_with_a_warning(sample, tmp_path):
    first = kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    (entry,) = _entries(tmp_path)
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])                  # a run killed mid-write, before atomic writes
    with pytest.warns(UserWarning, match="unreadable.*recomputing"):
        again = kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, first)
    assert pd.read_parquet(entry).shape[0] == 2                # rewritten whole


@pytest.mark.parametrize("bad", ["zero rows", "wrong rows", "missing column"])
def test_a_cache_entry_of_the_wrong_size_is_recomputed(sample, tmp_path, bad):
    first = kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    (entry,) = _entries(tmp_path)
    stored = pd.read_parquet(entry)
    stored = {"zero rows": stored.iloc[:0], "wrong rows": stored.iloc[:1],
              "missing column": stored.drop(columns=["kl"])}[bad]
    stored.to_parquet(entry, index=False)
    with pytest.warns(UserWarning, match="expected 2.*recomputing"):
        again = kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, first)


def test_a_failed_cache_write_leaves_no_entry_and_the_next_run_recomputes(sample, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", half_written_then_fail)
        with pytest.raises(OSError):
            kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    assert _entries(tmp_path) == [] and no_temporaries(tmp_path)
    table = kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    assert len(table) == 2 and len(_entries(tmp_path)) == 1


def test_source_edits_and_new_data_give_new_cache_entries(sample, tmp_path, monkeypatch):
    kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)              # read back: no new entry
    assert len(_entries(tmp_path)) == 1
    one_value_changed = kvlab.KVSample(sample.name, sample.q, sample.q_positions, sample.k.copy(), sample.v)
    one_value_changed.k[0, 0, 0] += 1
    kvlab.run_sweep(one_value_changed, CFG, cache_dir=tmp_path, progress=False)
    assert len(_entries(tmp_path)) == 2
    monkeypatch.setattr(sweep_mod, "source_hash", lambda: "the sources after an edit")
    kvlab.run_sweep(sample, CFG, cache_dir=tmp_path, progress=False)
    assert len(_entries(tmp_path)) == 3


def test_the_sample_fingerprint_covers_shape_and_dtype(sample):
    same_bytes_other_dtype = kvlab.KVSample(sample.name, sample.q, sample.q_positions.astype(np.int32),
                                            sample.k, sample.v)
    reshaped = kvlab.KVSample(sample.name, sample.q, sample.q_positions, sample.k.reshape(1, -1, 64), sample.v)
    prints = {s.fingerprint() for s in (sample, same_bytes_other_dtype, reshaped)}
    assert len(prints) == 3


def test_editing_a_source_file_changes_the_source_hash(tmp_path):
    from kvlab.accuracy import cache
    files = cache.source_files()
    names = {f"{f.parent.name}/{f.name}" for f in files}
    assert {"kernels/q4_0.py", "cuda/kernels.py", "kernels/rcp_approx_sm90.npz", "kvlab/quant.py",
            "kvlab/rotation.py", "kvlab/types.py", "accuracy/attention.py", "accuracy/sweep.py"} <= names
    copies = []
    for f in files:
        c = tmp_path / f.parent.name / f.name
        c.parent.mkdir(exist_ok=True)
        c.write_bytes(f.read_bytes())
        copies.append(c)
    before = cache.source_hash(copies)
    assert before == cache.source_hash()
    q40 = tmp_path / "kernels" / "q4_0.py"
    q40.write_text(q40.read_text() + "\n# edited\n")
    assert cache.source_hash(copies) != before
