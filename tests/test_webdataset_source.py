"""The webdataset source: img2dataset shards (benchmarks/img2dataset_shards.py, JPEG + caption + metadata,
some samples failed) indexed where they lie, from a brace pattern, lists of shards per split, a pipe:
command and an S3-compatible server (tests/object_store.py, moto's own process); read back exactly,
streamed and by byte range; cache_teacher and a training stage straight from object storage; bad input
in one line. The whole pipeline on such shards runs in tests/test_own_data_pipeline.py."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.img2dataset_shards import write_shards
from micro import TRAIN_STAGES, copy_tree, expect_exit, run, write_params

REPO = Path(__file__).resolve().parents[1]
N, PER_SHARD, FAILED_EVERY = 40, 10, 7  # 4 shards; samples 6, 13, 20, 27, 34 failed to download


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("img2dataset")
    write_shards(folder, N, PER_SHARD, side=48, labels=True, failed_every=FAILED_EVERY)
    return folder


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a tar read with Python's tarfile alone: {key: {ext: bytes}}."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def shard_params(tmp_path: Path, path, **changes) -> Path:
    return write_params(tmp_path / "params.yaml", shard__source="webdataset", shard__path=path, **changes)


def test_img2dataset_shards_are_indexed_in_place_and_read_back_exactly(shards, tmp_path):
    from cgspn.data.shards import iter_samples, split_shards
    from cgspn.data.subset import ShardSubset

    root = tmp_path / "root"
    m = run("shard", shard_params(tmp_path, f"{shards}/{{00000..00003}}.tar"), root)
    assert m["samples_seen"] == N and m["skipped"] == {"status failed_to_download": 5} and m["copied"] is False
    assert m["images"] == N - 5 == sum(s["count"] for s in m["splits"].values())
    assert sorted(m["splits"]) == ["train", "val"] and all(s["captions"] and s["labels"] for s in m["splits"].values())
    assert sorted(p.name for p in (root / "data/shards").iterdir()) == ["dataset.json", "train.json", "val.json"]
    assert json.loads((root / "data/shards/dataset.json").read_text())["splits"]["val"]["captions"] is True
    original = {k: v for p in sorted(shards.glob("*.tar")) for k, v in tar_samples(p).items()}
    good = {k for k, v in original.items() if "jpg" in v}
    seen = []
    for split in ("train", "val"):
        refs = split_shards(root / "data/shards", split)
        streamed = [s for ref in refs for s in iter_samples(ref)]
        subset = ShardSubset(root / "data/shards", [split])
        assert [s["__key__"] for s in streamed] == subset.keys
        for i in np.random.default_rng(0).permutation(len(subset))[:6]:
            key = subset.keys[i]
            expected = np.array(Image.open(io.BytesIO(original[key]["jpg"])).convert("RGB"))
            np.testing.assert_array_equal(subset.images[i], expected)
            sample = subset.sample(i)
            assert sample["txt"] == original[key]["txt"] and sample["json"] == original[key]["json"]
        seen += subset.keys
    assert sorted(seen) == sorted(good)  # every good sample once, in one split; no failed one


def test_splits_by_lists_of_shards_and_from_a_pipe_command(shards, tmp_path):
    from cgspn.data.subset import ShardSubset

    root = tmp_path / "lists"
    path = {"train": f"{shards}/{{00000..00002}}.tar", "val": [f"pipe:cat {shards}/00003.tar"]}
    m = run("shard", shard_params(tmp_path, path), root)
    assert {s: v["shards"] for s, v in m["splits"].items()} == {"train": 3, "val": 1}
    val = ShardSubset(root / "data/shards", ["val"])
    expected = [k for k, v in tar_samples(shards / "00003.tar").items() if "jpg" in v]
    assert val.keys == expected
    np.testing.assert_array_equal(val.images[len(val) - 1], np.array(Image.open(io.BytesIO(
        tar_samples(shards / "00003.tar")[expected[-1]]["jpg"])).convert("RGB")))
    folder = run("shard", shard_params(tmp_path, str(shards), shard__val_fraction=0.0), tmp_path / "folder")
    assert list(folder["splits"]) == ["train"] and folder["images"] == N - 5


def test_bad_webdataset_input_is_one_line_and_exit_2(shards, tmp_path, capsys):
    root = tmp_path / "root"
    expect_exit(capsys, "shard", shard_params(tmp_path, f"{shards}/{{00007..00008}}.tar"), root,
                "00007.tar: no such file")
    data = (shards / "00001.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut/00000.tar").write_bytes(data[: len(data) // 2])
    expect_exit(capsys, "shard", shard_params(tmp_path, str(tmp_path / "cut/00000.tar")), root,
                "cut/00000.tar: truncated in ")
    no_image = tmp_path / "no-image"
    no_image.mkdir()
    with tarfile.open(no_image / "00000.tar", "w") as tar:
        for name, payload in [("000000000.txt", b"a caption"), ("000000000.json", b'{"status": "success"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    expect_exit(capsys, "shard", shard_params(tmp_path, str(no_image)), root,
                "00000.tar: sample '000000000' has no image")
    expect_exit(capsys, "shard", shard_params(tmp_path, f"pipe:cat {tmp_path}/nothing.tar"), root,
                "the command exited with 1")
    assert not (root / "data/shards").exists()  # nothing half-written


def stage(name: str, params: Path, root: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(params), "--root", str(root)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_shards_in_object_storage_feed_cache_teacher_and_training(shards, micro, tmp_path):
    """The whole pipeline on the S3 test server: the shard stage indexes the shards in the bucket (the listing
    records their ETags), cache_teacher's Ray workers read them from there and write the features back into it
    (cache_teacher.store), the training stages train from the bucket's shards and features, evaluate and
    report follow. Training's reader takes the features from the bucket: they equal the teacher's own forward
    on the images of the local tars."""
    import torch

    from object_store import s3_server
    from cgspn.data.preprocess import to_batch
    from cgspn.data.shards import split_shards
    from cgspn.data.subset import ShardSubset
    from cgspn.teachers.registry import load_teacher_file

    root = tmp_path / "root"
    copy_tree(micro["root"] / "models/teachers", root / "models/teachers")
    with s3_server() as s3:
        s3.upload(shards, "img2dataset/")
        env = {**os.environ, **s3.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        env.pop("RAY_ADDRESS", None)
        fast = {f"{stage}__{k}": v for stage in ("distill_stage1", "distill_stage2")
                for k, v in {"steps": 2, "checkpoint_every": 2, "val_count": 4, "workers": 1}.items()}
        params = shard_params(tmp_path, f"s3://{s3.bucket}/img2dataset/{{00000..00003}}.tar",
                              cache_teacher__store=f"s3://{s3.bucket}/features", evaluate__seg_steps=4, **fast)
        for name in ("data_listing", "shard", "cache_teacher", *TRAIN_STAGES, "evaluate", "report"):
            done = stage(name, params, root, env)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
            assert s3.secret not in done.stdout + done.stderr
        listing = json.loads((root / "data/listing.json").read_text())
        assert [f["url"].rsplit("/", 1)[-1] for f in listing["files"]] == [f"0000{i}.tar" for i in range(4)]
        assert all(f["etag"] and f["size"] for f in listing["files"])
        index = json.loads((root / "data/shards/val.json").read_text())
        assert all(e["url"].startswith(f"s3://{s3.bucket}/") for e in index["shardlist"])
        folder = root / "data/features/dinov2_vits14_imgfocus"
        assert sorted(p.name for p in folder.glob("*.tar")) == []  # the feature shards went to the bucket
        store = json.loads((folder / "shards.json").read_text())
        assert store["store"].startswith(f"s3://{s3.bucket}/features/dinov2_vits14_imgfocus/")
        expected = {ref.name for s in ("train", "val") for ref in split_shards(root / "data/shards", s)}
        assert set(store["shards"]) == expected and all(v["etag"] for v in store["shards"].values())
        env_before = dict(os.environ)
        os.environ.update(s3.env)
        try:
            val = ShardSubset(root / "data/shards", ["val"], feature_dirs={"t": folder}, feature_names=("summary",))
            cached = val.features["t"]["summary"][range(3)].float()
            images = val.images[0:3]
        finally:
            os.environ.clear()
            os.environ.update(env_before)
        index = json.loads((root / "data/shards/val.json").read_text())
        local = tar_samples(shards / Path(index["shardlist"][0]["url"]).name)
        assert [np.array(Image.open(io.BytesIO(local[k]["jpg"])).convert("RGB")).tolist() for k in val.keys[:3]] == [
            im.tolist() for im in images]
        teacher = load_teacher_file(root / "models/teachers/dinov2_vits14_imgfocus.safetensors").eval()
        with torch.no_grad():
            summary = teacher(to_batch(images, 28, "cpu")).summary
        torch.testing.assert_close(cached, summary, atol=2e-2, rtol=1e-2)
        assert all((root / "models" / s / "student.safetensors").exists() for s in TRAIN_STAGES)
        evaluated = json.loads((root / "reports/metrics/evaluate.json").read_text())
        assert evaluated["models"]["distill_stage2"]["knn_summary"] is not None  # the .cls labels reached kNN
        assert "s3://" in (root / "reports/REPORT.md").read_text()  # the report names the data's place

        # a changed object changes the listing (its ETag), which is what makes DVC rerun shard
        other = tmp_path / "other"
        write_shards(other, 10, PER_SHARD, side=48, seed=5)
        s3.client().upload_file(str(other / "00000.tar"), s3.bucket, "img2dataset/00001.tar")
        assert stage("data_listing", params, root, env).returncode == 0
        relisted = json.loads((root / "data/listing.json").read_text())["files"]
        assert [a["etag"] == b["etag"] for a, b in zip(listing["files"], relisted)] == [True, False, True, True]
        (tmp_path / "missing").mkdir()
        missing = shard_params(tmp_path / "missing", f"s3://{s3.bucket}/img2dataset/{{00003..00004}}.tar")
        done = stage("shard", missing, tmp_path / "missing", env)
        assert done.returncode == 2 and "img2dataset/00004.tar: not found" in done.stderr, done.stderr[-2000:]
        wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        done = stage("shard", params, tmp_path / "denied", wrong)
        assert done.returncode == 2 and "access denied" in done.stderr, done.stderr[-2000:]
        assert "not-the-secret" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    from object_store import free_port

    gone = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    done = stage("shard", params, tmp_path / "gone", gone)
    assert done.returncode == 2 and "unreachable" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_dvc_reruns_shard_when_a_shard_changes_and_only_then(shards, tmp_path):
    """Through DVC itself: data_listing runs on every repro and lists the shards with their MD5s; shard
    depends on that listing, so rewriting one shard reruns it, and an unchanged listing leaves it alone."""
    import shutil

    from micro import make_repo

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    repo = make_repo(tmp_path / "repo")
    write_params(repo / "params.yaml", shard__source="webdataset", shard__path=f"{data}/{{00000..00003}}.tar")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = str(Path(sys.executable).with_name("dvc"))

    def repro() -> str:
        done = subprocess.run([dvc, "repro", "shard"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    first = repro()
    assert "Running stage 'data_listing'" in first and "Running stage 'shard'" in first
    again = repro()
    assert "Running stage 'data_listing'" in again and "Stage 'shard' didn't change, skipping" in again
    write_shards(data, 20, PER_SHARD, side=48, seed=1)  # shards 00000 and 00001 rewritten with other images
    changed = repro()
    assert "Running stage 'shard'" in changed
    listing = json.loads((repo / "data/listing.json").read_text())
    assert [f["url"] for f in listing["files"]] == [f"{data}/{i:05d}.tar" for i in range(4)]
    assert all(len(f["md5"]) == 32 for f in listing["files"])
