"""cache_teacher run twice on the same shards and teachers, on two Ray workers, writes byte-identical
outputs: features, PHI-S statistics, meta.json and its metrics file (issue 29)."""
from __future__ import annotations

import json

import pytest

from cgspn.data.feature_cache import in_order
from micro import copy_root, digest, run, write_params

METRICS = "reports/metrics/cache_teacher.json"


def test_cache_teacher_twice_on_two_workers_is_byte_identical(micro, tmp_path):
    # Two images per shard: the PHI-S sums then gather 20 train shards, which two workers finish in an order
    # that differs run to run (with the micro root's 3 train shards it rarely does).
    root = copy_root(micro["root"], tmp_path / "root", parts=("models/teachers",))
    params = write_params(tmp_path / "p.yaml", shard__max_per_shard=2, cache_teacher__workers=2)
    run("shard", params, root)
    runs = []
    for _ in range(2):
        metrics = run("cache_teacher", params, root)
        runs.append({**digest(root / "data/features"), METRICS: (root / METRICS).read_bytes()})
    assert runs[0].keys() == runs[1].keys()
    differ = sorted(name for name in runs[0] if runs[0][name] != runs[1][name])
    assert not differ, f"differ between the two runs: {differ}"
    # nothing run-dependent (timings, the nodes the workers happened to run on) in the tracked metrics
    assert set(metrics["dinov2_vits14_imgfocus"]) == {"images", "workers", "bytes", "bytes_per_image"}
    meta = json.loads((root / "data/features/dinov2_vits14_imgfocus/meta.json").read_text())
    assert list(meta["splits"]) == ["train", "val", "mosaic_train", "mosaic_val"]  # the jobs' order


def test_in_order_yields_by_index_whatever_the_arrival_order():
    assert list(in_order([(2, "c"), (0, "a"), (3, "d"), (1, "b")])) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="no item 1"):
        list(in_order([(0, "a"), (2, "c")]))
