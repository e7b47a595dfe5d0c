"""kvlab.tp on the CPU: real processes in a gloo group on a free localhost port (spawned, joined, cleaned up).

The sharded decode must give the single-process run's cache bytes, bitwise the same heads, and an output
within the all-reduce bound; skipping the all-reduce must break the bound.
"""
import argparse

import pytest
import torch.distributed as dist

from kvlab.cli.tp import add_options
from kvlab.tp.check import check, check_all
from kvlab.tp.dist import Dist, init_distributed, spawn
from kvlab.tp.model import TPConfig


def tp_parser():
    p = argparse.ArgumentParser()
    add_options(p)
    return p

SMALL = ["--device", "cpu", "--pairs", "q8_0/q4_0,f16/f16", "--head-dim", "64", "--n-head", "8",
         "--n-head-kv", "4", "--layers", "3", "--n-past", "30", "--steps", "2"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_decode_equals_single_process(world):
    rows = spawn(world, check_all, tp_parser().parse_args(SMALL))
    assert [(r["type_k"], r["type_v"], r["rotation"]) for r in rows] == [
        ("q8_0", "q4_0", True), ("q8_0", "q4_0", False), ("f16", "f16", True), ("f16", "f16", False)]
    for r in rows:
        assert (r["world_size"], r["backend"]) == (world, "gloo")
        assert r["cache_equal"], r
        assert r["heads_mismatch"] == 0, r
        assert r["within_bound"], r
        assert all(len(per_rank) == world and sum(per_rank) == 4 for per_rank in r["kv_heads"]), r
    if world == 3:   # 4 KV heads over 3 ranks: the rank taking the remainder changes with the layer
        assert len({tuple(per_rank) for per_rank in rows[0]["kv_heads"]}) == 3, rows[0]["kv_heads"]
    assert rows[0]["rot_k"] == 64 and rows[0]["rot_v"] == 64


class _NoAllReduce(Dist):
    def all_reduce(self, t):
        return t


def _check_without_all_reduce():
    d = init_distributed("cpu")
    try:
        cfg = TPConfig(head_dim=64, n_head=4, n_head_kv=2, n_layers=1, type_k="q8_0", type_v="q8_0",
                          flavor="cpu")
        return check(cfg, _NoAllReduce(d.rank, d.world, d.device, d.backend), n_past=8, n_steps=1)
    finally:
        dist.destroy_process_group()


def test_check_catches_a_missing_all_reduce():
    r = spawn(2, _check_without_all_reduce)
    assert r["cache_equal"] and r["heads_mismatch"] == 0      # the shards themselves are right
    assert not r["within_bound"] and not r["ok"]              # but each rank holds only a partial sum


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        TPConfig(cells=100)
    with pytest.raises(ValueError, match="unknown cache type"):
        TPConfig(type_k="q3_0")
    with pytest.raises(ValueError, match="device"):
        init_distributed("tpu")
    with pytest.raises(ValueError, match="nproc"):
        spawn(0, print)
