"""The Ray run key of a training stage: the same computation gets the same key wherever and whenever its
files were written; a different config, input content or code gets another."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cgspn.train.driver import run_key

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> Path:
    (root / "data/shards").mkdir(parents=True)
    (root / "data/shards/train-000000.tar").write_bytes(os.urandom(2048))
    (root / "models/teachers").mkdir(parents=True)
    (root / "models/teachers/t.safetensors").write_bytes(os.urandom(4096))
    return root


def key(root: Path, cfg: dict | None = None, code: Path = REPO) -> str:
    cfg = cfg or {"stage": "distill_stage1", "task": {"shards": str(root / "data/shards"), "lr": 1e-3}}
    return run_key("distill_stage1", cfg, [root / "models/teachers", root / "data/shards"], root, code)


def test_the_key_ignores_times_and_places_but_not_content(tmp_path):
    a = tree(tmp_path / "a")
    k = key(a)
    assert k.startswith("distill_stage1-") and key(a) == k
    shard = a / "data/shards/train-000000.tar"
    os.utime(shard, (1, 1))  # touched, not changed
    assert key(a) == k
    b = tmp_path / "b"
    shutil.copytree(a, b)  # a copied (or re-checked-out) tree finds its own checkpoints
    assert key(b) == k
    data = bytearray(shard.read_bytes())
    data[100] ^= 1  # same size, same time stamp, other content
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key(a) != k
    assert key(b, {"stage": "distill_stage1", "task": {"shards": str(b / "data/shards"), "lr": 2e-3}}) != k
    # per-invocation entries (the MLflow run, the driver's scratch paths) are not part of the computation
    cfg = {"stage": "distill_stage1", "task": {"shards": str(b / "data/shards"), "lr": 1e-3}}
    assert key(b, {**cfg, "mlflow": {"run_id": "x"}, "driver": {"errors": "/tmp/y"}}) == k


def test_the_key_follows_the_code_the_stage_runs(tmp_path):
    root = tree(tmp_path / "root")
    code = tmp_path / "code"
    for sub in ("stages", "cgspn", "kernels"):
        shutil.copytree(REPO / sub, code / sub, ignore=shutil.ignore_patterns("__pycache__"))
    k = key(root, code=code)
    (code / "cgspn/report/build.py").write_text("# distill_stage1 does not run this\n")
    assert key(root, code=code) == k
    (code / "kernels/gspn/reference.py").write_text((code / "kernels/gspn/reference.py").read_text() + "\n# x\n")
    assert key(root, code=code) != k
