"""Image sources for the `shard` stage, each yielding `Sample`s per split.

- `fashion_mnist_splits`: the embedded default, real data that works offline. Single garments (kNN
  evaluation, training), mosaics of garments with a per-pixel label map (segmentation probe) at the base
  canvas and at bigger canvases, and the natural photos that ship with scikit-image and scikit-learn.
- `folder_splits`: `<root>/<class>/<image>`, one subfolder per class.
- `table_splits`: a CSV or parquet file with a `path` column and optional `label`, `caption`, `split`.
"""
from __future__ import annotations

import gzip
import io
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import InputError
from .shards import Sample, encode_png

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FOREGROUND_THRESHOLD = 25  # a garment pixel brighter than this (of 255) is foreground in the label map

SplitSamples = dict[str, Iterator[Sample]]


@dataclass
class Dataset:
    """What a source yields: samples per split, plus names for labels and mask values."""

    splits: SplitSamples
    classes: list[str]
    mask_classes: list[str] | None = None


# --- Fashion-MNIST --------------------------------------------------------------------------------


def _find_or_fetch(name: str, dirs: list[Path]) -> Path:
    for d in dirs:
        if (d / name).exists():
            return d / name
    cache = dirs[-1]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(FASHION_URL + name, timeout=20) as r:
            data = r.read()
        (cache / name).write_bytes(data)
        return cache / name
    except OSError as e:
        raise InputError(
            f"Fashion-MNIST file {name} not found in {', '.join(map(str, dirs))} and the download failed ({e}). "
            "Install it with `apt-get install dataset-fashion-mnist` (Debian), or put the official IDX .gz "
            f"files from {FASHION_URL} into {dirs[0]} (params: shard.fashion_mnist_dir)"
        ) from None


def load_fashion_mnist(split: str, directory: str | Path, download_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `train` or `test`: (images uint8 [N, 28, 28], labels int64 [N])."""
    images_file, labels_file = FASHION_FILES[split]
    dirs = [Path(directory), Path(download_dir)]
    with gzip.open(_find_or_fetch(images_file, dirs)) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(_find_or_fetch(labels_file, dirs)) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise InputError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def garment_samples(prefix: str, images: np.ndarray, labels: np.ndarray) -> Iterator[Sample]:
    for i, (img, label) in enumerate(zip(images, labels)):
        rgb = np.repeat(img[:, :, None], 3, axis=2)
        yield Sample(f"{prefix}_{i:06d}", encode_png(rgb), label=int(label), caption=FASHION_CLASSES[label])


def make_mosaic(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, canvas: int, count: int, size_range: list[int]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`count` garments at random positions and sizes on a black canvas.

    Returns (rgb uint8 [canvas, canvas, 3], mask uint8 [canvas, canvas], the garment classes). The mask is
    0 for background and class + 1 where a garment's own (resized) pixel is foreground; later garments
    cover earlier ones, in pixels and in the mask alike.
    """
    gray = np.zeros((canvas, canvas), np.uint8)
    mask = np.zeros((canvas, canvas), np.uint8)
    picks = rng.integers(0, len(images), size=count)
    for idx in picks:
        side = int(rng.integers(size_range[0], size_range[1] + 1))
        side = min(side, canvas)
        garment = np.asarray(Image.fromarray(images[idx]).resize((side, side), Image.BILINEAR))
        top, left = rng.integers(0, canvas - side + 1, size=2)
        fg = garment > FOREGROUND_THRESHOLD
        gray[top : top + side, left : left + side][fg] = garment[fg]
        mask[top : top + side, left : left + side][fg] = labels[idx] + 1
    return np.repeat(gray[:, :, None], 3, axis=2), mask, [int(labels[i]) for i in picks]


def mosaic_samples(
    prefix: str, images, labels, n: int, canvas: int, per_mosaic: list[int], size_range: list[int], seed: int
) -> Iterator[Sample]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        count = int(rng.integers(per_mosaic[0], per_mosaic[1] + 1))
        rgb, mask, classes = make_mosaic(rng, images, labels, canvas, count, size_range)
        caption = "mosaic of " + ", ".join(FASHION_CLASSES[c] for c in classes)
        yield Sample(f"{prefix}_{i:06d}", encode_png(rgb), mask=encode_png(mask), caption=caption)


def photo_samples() -> Iterator[Sample]:
    """The natural photos that ship inside scikit-image and scikit-learn (no download)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                 "retina"]:
        try:
            photos[name] = getattr(skdata, name)()
        except Exception:  # a photo that skimage would fetch over the network: skip it offline
            continue
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        photos[Path(fname).stem] = img
    for i, (name, img) in enumerate(sorted(photos.items())):
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        yield Sample(f"photos_{i:06d}", encode_png(np.ascontiguousarray(img[:, :, :3])), caption=name)


def fashion_mnist_splits(p: dict, download_dir: Path) -> Dataset:
    """The embedded default. Splits: train, val (garments from the official test set), mosaic_train,
    mosaic_val, mosaic_train_x<s> and mosaic_val_x<s> for each bigger scale s (canvas x s, garments x s^2),
    photos."""
    rng = np.random.default_rng(p["seed"])
    tr_img, tr_lab = load_fashion_mnist("train", p["fashion_mnist_dir"], download_dir)
    te_img, te_lab = load_fashion_mnist("test", p["fashion_mnist_dir"], download_dir)
    for name, n, have in [("train_count", p["train_count"], len(tr_img)), ("val_count", p["val_count"], len(te_img))]:
        if n > have:
            raise InputError(f"params: shard.{name}={n} but Fashion-MNIST has only {have} images there")
    tr_order, te_order = rng.permutation(len(tr_img)), rng.permutation(len(te_img))
    train, val = tr_order[: p["train_count"]], te_order[: p["val_count"]]
    # Mosaics draw from the garments that the single-garment splits do not use.
    mtrain, mval = tr_order[p["train_count"] :], te_order[p["val_count"] :]
    canvas, per, sizes, seed = p["mosaic_canvas"], p["garments_per_mosaic"], p["garment_size"], p["seed"]
    splits: SplitSamples = {
        "train": garment_samples("train", tr_img[train], tr_lab[train]),
        "val": garment_samples("val", te_img[val], te_lab[val]),
        "mosaic_train": mosaic_samples("mosaic_train", tr_img[mtrain], tr_lab[mtrain], p["mosaic_train_count"],
                                       canvas, per, sizes, seed + 1),
        "mosaic_val": mosaic_samples("mosaic_val", te_img[mval], te_lab[mval], p["mosaic_val_count"], canvas, per,
                                     sizes, seed + 2),
    }
    for s in p["mosaic_scales"]:  # bigger canvases with proportionally more garments of the same sizes
        bigger = (canvas * s, [per[0] * s * s, per[1] * s * s], sizes)
        splits[f"mosaic_train_x{s}"] = mosaic_samples(f"mosaic_train_x{s}", tr_img[mtrain], tr_lab[mtrain],
                                                      p["mosaic_scaled_train_count"], *bigger, seed + 10 + s)
        splits[f"mosaic_val_x{s}"] = mosaic_samples(f"mosaic_val_x{s}", te_img[mval], te_lab[mval],
                                                    p["mosaic_eval_count"], *bigger, seed + 20 + s)
    if p["photos"]:
        splits["photos"] = photo_samples()
    return Dataset(splits, FASHION_CLASSES, ["background"] + FASHION_CLASSES)


# --- image folder and table -----------------------------------------------------------------------


def _read_checked(path: Path, where: str) -> tuple[bytes, str]:
    """The file's bytes and image extension, after checking that it decodes."""
    if not path.exists():
        raise InputError(f"{where}: image file {path} does not exist")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = (im.format or "").lower()
    except Exception as e:
        raise InputError(f"{where}: image file {path} does not decode ({e})") from None
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
    if ext not in ("png", "jpg", "webp", "bmp"):
        # Unusual formats are stored as PNG so that every reader can open them.
        with Image.open(io.BytesIO(data)) as im:
            return encode_png(np.asarray(im.convert("RGB"))), "png"
    return data, ext


def _assign_splits(n: int, val_fraction: float, seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    split = ["train"] * n
    for i in order[:n_val]:
        split[i] = "val"
    return split


def _records_to_splits(records: list[dict], val_fraction: float, seed: int, classes: list[str]) -> SplitSamples:
    """records: {"path", "where", "label", "caption", "split"?} -> lazily read samples per split."""
    if any(r.get("split") is None for r in records):
        for r, s in zip(records, _assign_splits(len(records), val_fraction, seed)):
            r["split"] = r.get("split") or s

    def samples(split: str) -> Iterator[Sample]:
        for i, r in enumerate(x for x in records if x["split"] == split):
            data, ext = _read_checked(r["path"], r["where"])
            yield Sample(f"{split}_{i:06d}", data, ext, r.get("label"), caption=r.get("caption"))

    return {s: samples(s) for s in sorted({r["split"] for r in records})}


def folder_splits(root: str | Path, val_fraction: float, seed: int) -> Dataset:
    """`root/<class>/<image>`: class names are the sorted subfolder names."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"params: shard.path={str(root)!r} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    records = [
        {"path": f, "where": str(f), "label": ci, "caption": c}
        for ci, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]
    if not records:
        raise InputError(f"{root}: the class subfolders hold no files")
    return Dataset(_records_to_splits(records, val_fraction, seed, classes), classes)


def table_splits(table: str | Path, val_fraction: float, seed: int) -> Dataset:
    """A CSV or parquet file: `path` (relative to the table's folder or absolute), optional `label`
    (class name or integer), `caption`, `split` (train/val/...)."""
    import pandas as pd

    table = Path(table)
    if not table.exists():
        raise InputError(f"params: shard.path={str(table)!r} does not exist")
    try:
        df = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    except Exception as e:
        raise InputError(f"{table}: not a readable {'parquet' if table.suffix == '.parquet' else 'CSV'} file ({e})")
    if "path" not in df.columns:
        raise InputError(f"{table}: no 'path' column (columns: {list(df.columns)})")
    classes: list[str] = []
    labels = [None] * len(df)
    if "label" in df.columns:
        raw = df["label"].tolist()
        if all(isinstance(v, (int, np.integer)) for v in raw):
            labels = [int(v) for v in raw]
            classes = [str(c) for c in range(max(labels) + 1)]
        else:
            classes = sorted({str(v) for v in raw})
            labels = [classes.index(str(v)) for v in raw]
    captions = df["caption"].tolist() if "caption" in df.columns else [None] * len(df)
    splits = [str(v) for v in df["split"]] if "split" in df.columns else [None] * len(df)
    csv = table.suffix != ".parquet"
    records = []
    for i, path in enumerate(df["path"].tolist()):
        p = Path(str(path))
        records.append({
            "path": p if p.is_absolute() else table.parent / p,
            "where": f"{table} line {i + 2}" if csv else f"{table} row {i}",  # CSV line 1 is the header
            "label": labels[i],
            "caption": None if captions[i] is None or pd.isna(captions[i]) else str(captions[i]),
            "split": splits[i],
        })
    # Check every file exists before any shard is written: a missing file is named at once.
    for r in records:
        if not r["path"].exists():
            raise InputError(f"{r['where']}: image file {r['path']} does not exist")
    return Dataset(_records_to_splits(records, val_fraction, seed, classes), classes)
