"""The researcher's own data (cgspn.data.own_data, the shard stage): an image folder, a table and the
segmentation layout, built from real photos that are not Fashion-MNIST (tests/own_data_sets.py); keys and
splits that stay put when files are added; strict, explained labels; 16-bit images; DVC tracking the data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgspn.data.own_data import folder_data, read_image, segmentation_data, table_data
from cgspn.data.shards import decode_image, decode_mask, iter_samples, split_shards
from cgspn.pipeline.errors import InputError
from micro import digest, expect_exit, write_params
from own_data_sets import make_folder, make_segmentation, make_table


def shard_with(tmp_path: Path, name: str, **shard) -> tuple[Path, dict]:
    """Run the shard stage on a root of its own; returns the root and its dataset.json."""
    from micro import run

    root = tmp_path / name
    params = write_params(tmp_path / f"{name}.yaml", **{f"shard__{k}": v for k, v in shard.items()})
    run("shard", params, root)
    return root, json.loads((root / "data/shards/dataset.json").read_text())


def samples_of(root: Path) -> dict[str, dict]:
    shards = root / "data/shards"
    return {s["__key__"]: {**s, "split": sh.name.rsplit("-", 1)[0]}
            for idx in shards.glob("*.json") if idx.name != "dataset.json"
            for sh in split_shards(shards, idx.stem) for s in iter_samples(sh)}


def test_a_folder_is_sharded_with_stable_keys_and_splits_and_its_sources(micro, tmp_path):
    folder = make_folder(tmp_path / "photos")
    root, dataset = shard_with(tmp_path, "a", source="folder", path=str(folder), val_fraction=0.25)
    assert dataset["classes"] == ["astronaut", "chelsea", "coffee", "rocket"] and dataset["mask_classes"] is None
    assert dataset["splits"]["train"]["labels"] and not dataset["splits"]["train"]["masks"]
    before = samples_of(root)
    assert len(before) == 32 and {s["split"] for s in before.values()} == {"train", "val"}
    for s in before.values():  # every sample says which file it came from, and its class is that folder
        source = s["source.txt"].decode()
        assert (folder / source).is_file()
        assert dataset["classes"][int(s["cls"])] == source.split("/")[0]
    # one more image, and one less: no other sample changes key, split or content
    Image.fromarray(np.full((50, 60, 3), 128, np.uint8)).save(folder / "coffee" / "new.png")
    removed = next(f for f in sorted((folder / "rocket").iterdir()))
    removed.unlink()
    root2, _ = shard_with(tmp_path, "b", source="folder", path=str(folder), val_fraction=0.25)
    after = samples_of(root2)
    gone = {k for k, s in before.items() if s["source.txt"].decode() == f"rocket/{removed.name}"}
    assert set(after) - set(before) == {k for k, s in after.items() if s["source.txt"] == b"coffee/new.png"}
    assert set(before) - set(after) == gone and len(gone) == 1
    for k in set(before) & set(after):
        assert after[k]["split"] == before[k]["split"] and after[k]["png" if "png" in after[k] else "jpg"] == \
            before[k]["png" if "png" in before[k] else "jpg"]


def test_a_16_bit_image_is_scaled_to_8_bit_not_clipped(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 65535 // (64 * 48 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    data, ext, change = read_image(tmp_path / "deep.png", "deep.png")
    assert change == "16-bit" and ext == "png"
    rgb = decode_image({"__key__": "k", "png": data})
    expected = np.round(ramp / 257).astype(np.uint8)
    assert rgb.shape == (48, 64, 3) and np.array_equal(rgb[..., 0], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200  # a ramp, not solid white
    Image.fromarray(expected).save(tmp_path / "plain.png")  # an 8-bit image is kept byte for byte
    assert read_image(tmp_path / "plain.png", "x") == ((tmp_path / "plain.png").read_bytes(), "png", None)


def test_notes_on_changed_images_are_in_shards_metrics(tmp_path):
    """reports/metrics/shard.json's "notes": a sentence per kind of change made to the images, with the count;
    the same on a rerun (the file is tracked); an empty list when nothing was changed."""
    from micro import own_tracking

    folder = make_folder(tmp_path / "photos", n=8)  # the 6th image is a 16-bit greyscale PNG
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "coffee" / "flat.tif")
    with own_tracking(tmp_path / "mlflow.db"):
        roots = [shard_with(tmp_path, name, source="folder", path=str(folder))[0] for name in ("a", "b")]
        metrics = [(root / "reports/metrics/shard.json").read_bytes() for root in roots]
        assert json.loads(metrics[0])["notes"] == ["1 16-bit image scaled to 8 bit (value / 257)",
                                                   "1 image re-encoded as RGB PNG (from tiff)"]
        assert metrics[0] == metrics[1]
        for f in [*folder.rglob("*16bit.png"), *folder.rglob("*.tif")]:
            f.unlink()
        plain, _ = shard_with(tmp_path, "plain", source="folder", path=str(folder))
    assert json.loads((plain / "reports/metrics/shard.json").read_text())["notes"] == []


def test_the_segmentation_layout_keeps_its_label_maps_and_class_names(micro, tmp_path):
    data = make_segmentation(tmp_path / "ade")
    root, dataset = shard_with(tmp_path, "seg", source="segmentation", path=str(data))
    assert dataset["mask_classes"] == ["(0)", "darkest", "dark", "bright", "brightest"]
    assert dataset["ignore_label"] == 0 and dataset["classes"] is None
    assert {s: (v["count"], v["masks"], v["labels"]) for s, v in dataset["splits"].items()} == {
        "train": (24, True, False), "val": (8, True, False)}  # ADE20K's training/validation folders
    for s in samples_of(root).values():
        source = Path(s["source.txt"].decode())  # images/<split>/<name>.jpg
        annotation = data / "annotations" / source.parent.name / f"{source.stem}.png"
        assert np.array_equal(decode_mask(s), np.asarray(Image.open(annotation)))  # that image's own map
        assert decode_image(s).shape == np.asarray(Image.open(data / source)).shape
        assert set(np.unique(decode_mask(s))) <= {0, 1, 2, 3, 4}


def test_a_table_with_masks_and_captions_in_parquet(micro, tmp_path):
    table = make_table(tmp_path / "t", "parquet", masks=True)
    root, dataset = shard_with(tmp_path, "p", source="table", path=str(table))
    assert dataset["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert dataset["mask_classes"] == ["class 0", "class 1", "class 2", "class 3", "class 4"]
    samples = samples_of(root)
    assert sum(s["split"] == "val" for s in samples.values()) == 7  # rows 0, 5, ..., 30
    assert all(s["txt"].decode().startswith("a crop of the ") and "mask.png" in s for s in samples.values())


BAD_TABLES = {
    "mixed labels": ("path,label\nimages/a.png,3\nimages/b.png,cat\nimages/a.png,4\n",
                     "line 3, column 'label': 'cat' is a class name, but", "line 2, column 'label' holds '3'"),
    "empty label": ("path,label\nimages/a.png,1\nimages/b.png,\n", "line 3, column 'label': empty"),
    "negative label": ("path,label\nimages/a.png,-1\n", "line 2, column 'label': -1 is negative"),
    "empty split": ("path,split\nimages/a.png,train\nimages/b.png,\n", "line 3, column 'split': empty"),
    "header only": ("path,label,split\n", "no rows (only a header"),
    "a directory": ("path\nimages\n", "line 2, column 'path'", "is a directory"),
    "missing file": ("path\nimages/nope.png\n", "line 2, column 'path'", "nope.png does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_table_is_one_line_naming_the_table_row_and_column(micro, tmp_path, capsys, case):
    text, *needles = BAD_TABLES[case]
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / name)
    (tmp_path / "t.csv").write_text(text)
    root = tmp_path / "root"
    shutil.copytree(micro["root"] / "data/shards", root / "data/shards")
    before = digest(root / "data/shards")
    params = write_params(tmp_path / "p.yaml", shard__source="table", shard__path=str(tmp_path / "t.csv"))
    line = expect_exit(capsys, "shard", params, root, *needles)
    assert str(tmp_path / "t.csv") in line
    assert digest(root / "data/shards") == before  # the earlier shards are untouched


def test_own_data_errors_name_the_file(tmp_path):
    data = make_segmentation(tmp_path / "ade", n_train=2, n_val=1)
    victim = next((data / "annotations/training").iterdir())
    victim.unlink()
    with pytest.raises(InputError, match=f"no label map .*{victim.name}"):
        segmentation_data(data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        folder_data(tmp_path / "empty", 0.1, 0)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb_mask.png")
    (tmp_path / "m.csv").write_text("path,mask\nrgb_mask.png,rgb_mask.png\n")
    table = table_data(tmp_path / "m.csv", 0.1, 0)
    with pytest.raises(InputError, match="must be a one-channel label map"):
        list(next(iter(table.splits().values())))


@pytest.mark.parametrize("layout", ["folder", "table"])
def test_an_undecodable_image_of_a_folder_or_table_names_the_file_only(tmp_path, layout):
    """No `<_io.BytesIO object at 0x...>` from PIL in the message: the file, and the table's row."""
    (tmp_path / "data/a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data/a/ok.png")
    broken = tmp_path / "data/a/broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is no jpeg")
    if layout == "folder":
        data, where = folder_data(tmp_path / "data", 0.0, 0), str(broken)
    else:
        (tmp_path / "data/t.csv").write_text("path\na/ok.png\na/broken.jpg\n")
        data, where = table_data(tmp_path / "data/t.csv", 0.0, 0), f"{tmp_path / 'data/t.csv'} line 3, column 'path'"
    with pytest.raises(InputError) as error:
        [sample for samples in data.splits().values() for sample in samples]
    assert str(error.value) == f"{where}: image file {broken} does not decode (cannot identify image file)"


def test_dvc_reruns_shard_when_the_data_changes_and_only_then(tmp_path):
    """shard depends on the listing of shard.path (data_listing, run on every repro): `dvc repro shard` reruns
    shard after one image is added to the folder, and skips it when nothing changed."""
    from micro import make_repo

    folder = make_folder(tmp_path / "photos", n=8)
    repo = make_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    import yaml

    p = yaml.safe_load(params.read_text())
    p["shard"].update(source="folder", path=str(folder))
    params.write_text(yaml.safe_dump(p))
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc_run(*args):
        done = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    assert "Running stage 'shard'" in dvc_run("repro", "shard")
    assert "Stage 'shard' didn't change, skipping" in dvc_run("repro", "shard")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(folder / "coffee" / "added.png")
    assert "Running stage 'shard'" in dvc_run("repro", "shard")
    assert "coffee/added.png" in (repo / "data/listing.json").read_text()
    assert "Stage 'shard' didn't change, skipping" in dvc_run("repro", "shard")
    assert json.loads((repo / "reports/metrics/shard.json").read_text())["images"] == 9


def test_mmseg_ignore_255_declared_classes_and_empty_or_missing_val(tmp_path):
    """mmseg's 255 is no class (4 declared classes stay 5 mask classes, not 256); a value past the declared
    classes is one error naming the file and the value; an empty split folder is refused at once; without a
    val folder, shard.val_fraction of train becomes val."""
    data = make_segmentation(tmp_path / "ade", n_train=6, n_val=2)
    masks = sorted((data / "annotations/training").iterdir())
    m = np.asarray(Image.open(masks[0])).copy()
    m[:4, :4] = 255
    Image.fromarray(m).save(masks[0])
    own = segmentation_data(data)
    samples = [s for split in own.splits().values() for s in split]
    assert len(samples) == 8 and own.mask_classes == ["(0)", "darkest", "dark", "bright", "brightest"]
    m[:4, :4] = 7
    Image.fromarray(m).save(masks[0])
    own = segmentation_data(data)
    with pytest.raises(InputError, match=f"{masks[0]}: label value 7 is not a declared class"):
        [s for split in own.splits().values() for s in split]
    m[:4, :4] = 1
    Image.fromarray(m).save(masks[0])
    for f in (data / "images/validation").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="images/validation: no images in this split folder"):
        segmentation_data(data)
    (data / "images/validation").rmdir()
    with pytest.raises(InputError, match="no val .*shard.val_fraction is 0"):
        segmentation_data(data, 0.0, 0)
    splits = [r.split for r in segmentation_data(data, 0.5, 0).records]
    assert sorted(set(splits)) == ["train", "val"] and len(splits) == 6
