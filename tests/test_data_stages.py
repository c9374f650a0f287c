"""The first DVC stages on a micro configuration (the `micro` fixture in conftest.py: shard -> teacher ->
cache_teacher through their command lines under one MLflow parent run, the Prefect flow's own when the
session runs it), checked against fresh computations; and every kind of bad input, each of which must fail
with a message naming the culprit and leave earlier outputs intact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cgspn.data.shards import (
    decode_image,
    decode_mask,
    decode_npy,
    encode_npy,
    encode_png,
    iter_samples,
    split_shards,
    write_split,
    zip_samples,
)
from cgspn.data.own_data import table_data
from cgspn.data.sources import FASHION_CLASSES, FOREGROUND_THRESHOLD, garment_samples
from cgspn.pipeline.errors import InputError, ShardError
from cgspn.data.feature_cache import teacher_features
from cgspn.pipeline.outputs import replace_dir
from cgspn.distill.phis import Moments, PhiS, load_teacher_phis
from cgspn.teachers.registry import load_vit
from micro import MICRO, digest, expect_exit, write_params
from micro import copy_root as micro_copy

def copy_root(micro, tmp_path) -> Path:
    return micro_copy(micro["root"], tmp_path / "root")


# --- shard ----------------------------------------------------------------------------------------


def test_shard_writes_every_split_with_a_wids_index(micro, tmp_path):
    import wids

    shards = micro["root"] / "data/shards"
    meta = json.loads((shards / "dataset.json").read_text())
    expected = {"train": 40, "val": 20, "mosaic_train": 8, "mosaic_val": 4, "mosaic_train_x2": 4, "mosaic_val_x2": 2}
    for split, count in expected.items():
        assert meta["splits"][split]["count"] == count
        ds = wids.ShardListDataset(str(shards / f"{split}.json"), cache_dir=str(tmp_path))
        assert len(ds) == count
        keys = [s["__key__"] for path in split_shards(shards, split) for s in iter_samples(path)]
        assert len(set(keys)) == count and all(k.startswith(split + "_") for k in keys)
    assert meta["splits"]["photos"]["count"] >= 8  # scikit-image and scikit-learn photos that work offline
    assert len(split_shards(shards, "train")) == 3  # 40 samples at 16 per shard
    labels = [int(s["cls"]) for p in split_shards(shards, "train") for s in iter_samples(p)]
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3
    m = micro["metrics"]["shard"]
    assert m["images"] == sum(v["count"] for v in meta["splits"].values()) and "images_per_s" not in m
    timings = json.loads((micro["root"] / "reports/timings/shard.json").read_text())
    assert timings["images_per_s"] > 0 and timings["seconds"] > 0  # apart from the tracked metrics


def test_mosaic_label_maps_follow_the_garment_pixels(micro):
    shards = micro["root"] / "data/shards"
    for split, canvas in [("mosaic_train", 28), ("mosaic_val_x2", 56)]:
        for path in split_shards(shards, split):
            for s in iter_samples(path):
                image, mask = decode_image(s, path), decode_mask(s, path)
                assert image.shape == (canvas, canvas, 3) and mask.shape == (canvas, canvas)
                np.testing.assert_array_equal(mask > 0, image[..., 0] > FOREGROUND_THRESHOLD)
                named = {FASHION_CLASSES.index(c) + 1 for c in s["txt"].decode()[len("mosaic of "):].split(", ")}
                assert set(np.unique(mask)) - {0} <= named


def test_shards_are_byte_identical_for_the_same_samples(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5)
    for name in ["a", "b"]:
        (tmp_path / name).mkdir()
        write_split(tmp_path / name, "train", garment_samples("train", images, labels), 2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_table_source_reads_csv_and_parquet(tmp_path):
    import pandas as pd
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    df = pd.DataFrame({"path": [f"im{i}.png" for i in range(4)], "label": ["cat", "dog", "cat", "dog"],
                       "caption": [f"picture {i}" for i in range(4)], "split": ["train", "train", "val", "val"]})
    for table in [tmp_path / "t.csv", tmp_path / "t.parquet"]:
        df.to_csv(table, index=False) if table.suffix == ".csv" else df.to_parquet(table)
        ds = table_data(table, 0.5, 0)
        assert ds.classes == ["cat", "dog"]
        val = list(ds.splits()["val"])
        assert [s.label for s in val] == [0, 1] and val[1].caption == "picture 3"


def test_replace_dir_keeps_the_old_tree_when_the_body_fails(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "good.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with replace_dir(final) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "good.txt").read_text() == "good"
    with replace_dir(final) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in final.iterdir()] == ["new.txt"]


# --- teacher and cache_teacher ------------------------------------------------------------------


def test_feature_shards_mirror_the_image_shards_and_hold_the_teachers_features(micro):
    root = micro["root"]
    features = root / "data/features/dinov2_vits14_imgfocus"
    meta = json.loads((features / "meta.json").read_text())
    assert meta["grid"] == [2, 2] and meta["splits"] == {"train": 40, "val": 20, "mosaic_train": 8, "mosaic_val": 4}
    model = load_vit(root / "models/teachers/dinov2_vits14_imgfocus.safetensors")
    for split in meta["splits"]:  # cache_teacher.splits is auto: every split at the training resolution
        for path in split_shards(root / "data/shards", split):
            pairs = list(zip_samples(path, features / path.name))
            assert len(pairs) == sum(1 for _ in iter_samples(path))
    # Fresh teacher features for a few samples equal the cached float16 ones.
    pairs = list(zip_samples(split_shards(root / "data/shards", "mosaic_train")[0],
                             features / "mosaic_train-000000.tar"))[:3]
    fresh = teacher_features(model, [decode_image(a) for a, _ in pairs], 28, layers=[5])
    for name in ["summary", "spatial", "block5"]:
        cached = torch.tensor(np.stack([decode_npy(b, name) for _, b in pairs])).float()
        assert cached.shape == fresh[name].shape
        torch.testing.assert_close(cached, fresh[name], atol=2e-2, rtol=1e-2)
    m = micro["metrics"]["cache_teacher"]["dinov2_vits14_imgfocus"]
    assert m["images"] == 72 and m["workers"] == MICRO["cache_teacher"]["workers"] and m["bytes_per_image"] > 0


@pytest.mark.parametrize("kind", ["spatial", "summary", "block5"])
def test_phis_statistics_standardize_the_cached_features(micro, kind):
    features = micro["root"] / "data/features/dinov2_vits14_imgfocus"
    phis = load_teacher_phis(features)[kind]
    cached = [decode_npy(s, kind) for p in sorted(features.glob("train-*.tar")) for s in iter_samples(p)]
    z = phis.standardize(torch.tensor(np.stack(cached)).double().reshape(-1, 384))
    assert z.mean(0).abs().max() < 0.05  # estimated in float64 from float32 features; cached in float16
    assert (z.var(0, unbiased=False) - 1).abs().max() < 0.1


def test_phis_is_an_isotropic_rotation_that_equalizes_variance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 12, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0] + 3.0
    m = Moments.of(x[:1500]) + Moments.of(x[1500:])  # shard-wise sums add up
    phis = PhiS.estimate(m)
    z = phis.standardize(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(12, dtype=torch.float64), atol=1e-9, rtol=0)
    R = torch.tensor(phis.rotation)
    torch.testing.assert_close(R @ R.T, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(phis.destandardize(z), x)


def test_a_predicted_direction_is_put_back_at_the_typical_norm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64) + 5
    phis = PhiS.estimate(Moments.of(x))
    z = phis.standardize(x)
    # every standardized dimension has unit variance, so the mean squared norm is D
    torch.testing.assert_close((z**2).sum(1).mean(), torch.tensor(16.0, dtype=torch.float64))
    pred = z[:5] * torch.tensor([0.1, 1.0, 3.0, 7.0, 100.0], dtype=torch.float64)[:, None]  # any positive scale
    back = phis.standardize(phis.from_direction(pred))
    torch.testing.assert_close(back.norm(dim=1), torch.full((5,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(F.cosine_similarity(back, z[:5], dim=1), torch.ones(5, dtype=torch.float64))


def test_each_stage_is_an_mlflow_child_run_with_params_and_artifacts(micro):
    import mlflow

    client = mlflow.MlflowClient(micro["tracking_uri"])
    runs = client.search_runs([micro["experiment"]], f"tags.mlflow.parentRunId = '{micro['parent']}'")
    assert sorted(r.info.run_name for r in runs) == sorted(micro["stages"])  # one child per stage the parent ran
    assert {"cache_teacher", "shard", "teacher"} <= set(micro["stages"])
    for r in runs:
        assert r.info.status == "FINISHED"
        artifacts = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert "config.json" in artifacts
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["shard"].data.params["train_count"] == "40"
    assert by_name["shard"].data.metrics["images_per_s"] > 0
    assert "shard_samples.png" in [a.path for a in client.list_artifacts(by_name["shard"].info.run_id)]


# --- bad input ------------------------------------------------------------------------------------


def test_corrupt_tar_is_named_and_features_stay_intact(micro, tmp_path, capsys):
    root = copy_root(micro, tmp_path)
    victim = root / "data/shards/train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated mid-record
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(iter_samples(victim))
    before = digest(root / "data/features")
    expect_exit(capsys, "cache_teacher", micro["params"], root, "train-000001.tar")
    assert digest(root / "data/features") == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["features", "shards"]  # no staging left over


def test_undecodable_image_is_named(micro, tmp_path, capsys):
    with pytest.raises(ShardError, match=r"x.tar: sample 'k1': image does not decode"):
        decode_image({"__key__": "k1", "png": b"not a png"}, "x.tar")
    folder = tmp_path / "images"
    for cls in ["a", "b"]:
        (folder / cls).mkdir(parents=True)
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / cls / "ok.png")
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    root = copy_root(micro, tmp_path)
    before = digest(root / "data/shards")
    params = write_params(tmp_path / "p.yaml", shard__source="folder", shard__path=str(folder))
    expect_exit(capsys, "shard", params, root, "broken.jpg", "does not decode")
    assert digest(root / "data/shards") == before


@pytest.mark.parametrize("entry", ["png", "mask.png"])
def test_an_undecodable_image_or_mask_in_a_shard_is_named_by_shard_and_key_only(entry):
    """PIL names an in-memory file by its object (`<_io.BytesIO object at 0x...>`): the message must not."""
    sample = {"__key__": "k1", "png": encode_png(np.zeros((4, 4, 3), np.uint8)), entry: b"\x89PNG not really"}
    decode = decode_image if entry == "png" else decode_mask
    with pytest.raises(ShardError) as error:
        decode(sample, "data/shards/x-000000.tar")
    what = "image" if entry == "png" else "mask"
    assert str(error.value) == (f"data/shards/x-000000.tar: sample 'k1': {what} does not decode "
                                f"(cannot identify image file)")


def test_csv_row_with_a_missing_file_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\nmissing.png,a photo\n")
    with pytest.raises(InputError, match=r"t.csv line 2, column 'path': image file .*missing.png does not exist"):
        table_data(tmp_path / "t.csv", 0.1, 0)


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_feature_shard_with_mismatched_keys_is_named(micro, tmp_path, change):
    import webdataset as wds

    image_shard = split_shards(micro["root"] / "data/shards", "val")[0]
    samples = [{"__key__": s["__key__"], "summary.npy": encode_npy(np.zeros(3, np.float16))}
               for s in iter_samples(image_shard)]
    if change == "missing":
        del samples[5]
    elif change == "extra":
        samples.append({"__key__": "val_999999", "summary.npy": samples[0]["summary.npy"]})
    else:
        samples[5]["__key__"] = "val_777777"
    bad = tmp_path / image_shard.name
    with wds.TarWriter(str(bad)) as sink:
        for s in samples:
            sink.write(s)
    key = {"missing": "val_", "extra": "val_999999", "renamed": "val_777777"}[change]
    with pytest.raises(ShardError, match=f"{bad.name}: .*key '{key}"):
        list(zip_samples(image_shard, bad))


def test_unknown_teacher_is_named_and_teachers_stay_intact(micro, tmp_path, capsys):
    root = copy_root(micro, tmp_path)
    before = digest(root / "models/teachers")
    params = write_params(tmp_path / "p.yaml", teacher__names=["dinov2_vits14_imgfocus", "no_such_teacher"])
    expect_exit(capsys, "teacher", params, root, "teacher.names[1]", "no_such_teacher", "dinov2_vits14_imgfocus")
    assert digest(root / "models/teachers") == before


@pytest.mark.parametrize("stage, change, needle", [
    ("shard", {"shard__train_count": "many"}, "shard.train_count must be int"),
    ("shard", {"shard__val_fraction": 1.5}, "shard.val_fraction must be <= 1.0"),
    ("shard", {"shard__source": "webcam"}, "shard.source must be one of"),
    ("shard", {"shard__garment_size": [30, 10]}, "shard.garment_size must be [low, high]"),
    ("shard", {"shard__photos": "yes"}, "shard.photos must be bool"),
    ("cache_teacher", {"cache_teacher__workers": -1}, "cache_teacher.workers must be >= 0"),
    ("cache_teacher", {"cache_teacher__resolution": 30}, "not a multiple of teacher dinov2_vits14_imgfocus's patch"),
    ("cache_teacher", {"cache_teacher__splits": ["nope"], "cache_teacher__phis_splits": ["nope"]},
     "no index for split 'nope'"),
    ("shard", {"shard__val_fraction": float("nan")}, "shard.val_fraction must be a finite number, got nan"),
    ("cache_teacher", {"cache_teacher__gpus_per_worker": float("inf")},
     "cache_teacher.gpus_per_worker must be a finite number, got inf"),
])
def test_bad_parameter_is_named_and_outputs_stay_intact(micro, tmp_path, capsys, stage, change, needle):
    """...with the parameters file that was read in front: `<file>: <section>.<key> ...`."""
    root = copy_root(micro, tmp_path)
    before = digest(root / "data")
    params = write_params(tmp_path / "p.yaml", **change)
    line = expect_exit(capsys, stage, params, root, needle)
    assert line.startswith(f"stage {stage}: error: {params}: {stage}."), line
    assert digest(root / "data") == before


def test_a_missing_parameters_file_or_section_is_named(micro, tmp_path, capsys):
    root = copy_root(micro, tmp_path)
    expect_exit(capsys, "shard", tmp_path / "nope.yaml", root, f"{tmp_path / 'nope.yaml'}: no such parameters file")
    (tmp_path / "p.yaml").write_text("teacher: {names: []}\n")
    expect_exit(capsys, "shard", tmp_path / "p.yaml", root, "p.yaml: no section 'shard' (sections: ['teacher'])")


def test_a_teacher_whose_library_is_missing_says_what_to_install(micro, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here: the message for its absence cannot be seen")
    root = copy_root(micro, tmp_path)
    before = digest(root / "models/teachers")
    params = write_params(tmp_path / "p.yaml", teacher__names=["timm:vit_small_patch14_dinov2"])
    expect_exit(capsys, "teacher", params, root, "teacher.names[0]", "needs the package 'timm'", "pip install timm")
    assert digest(root / "models/teachers") == before


def test_an_image_that_a_ray_actor_cannot_decode_is_one_line_and_nothing_is_left(micro, tmp_path, capsys):
    """The tar is complete (the check before Ray passes); an actor finds the image: one line naming the
    shard and the key, earlier features byte-identical, no staging folder left behind."""
    from micro import break_image

    root = copy_root(micro, tmp_path)
    key = break_image(root / "data/shards/val-000000.tar", 3)
    before = digest(root / "data/features")
    expect_exit(capsys, "cache_teacher", micro["params"], root, "val-000000.tar", f"sample '{key}'",
                "image does not decode")
    assert digest(root / "data/features") == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["features", "shards"]


def test_shard_members_are_read_from_the_headers_and_a_truncation_is_found(micro, tmp_path):
    from cgspn.data.shards import check_shard_pair, shard_keys, shard_members

    shard = split_shards(micro["root"] / "data/shards", "val")[0]
    samples = list(iter_samples(shard))
    assert shard_keys(shard) == [s["__key__"] for s in samples]
    assert [set(exts) for _, exts in shard_members(shard)] == [set(s) - {"__key__"} for s in samples]
    import tarfile

    data = Path(shard.url).read_bytes()
    with tarfile.open(shard.url) as tar:
        last = tar.getmembers()[-1]
    end_of_data = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks begin
    for cut in (end_of_data, len(data) // 2, 700):  # no end marker, in a member's data, in a header
        (tmp_path / "t.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match="t.tar: .*truncated"):
            shard_keys(tmp_path / "t.tar")
    features = micro["root"] / "data/features/dinov2_vits14_imgfocus" / shard.name
    check_shard_pair(shard, shard_keys(shard), features, ("summary", "spatial", "block5"))
    with pytest.raises(ShardError, match=f"{features.name}: sample .* has no block7.npy"):
        check_shard_pair(shard, shard_keys(shard), features, ("summary", "block7"))
    with pytest.raises(ShardError, match=f"{features.name}: key .* is missing"):
        check_shard_pair(shard, shard_keys(shard) + ["val_999"], features)
