"""Image sources for the `shard` stage, each yielding `Sample`s per split.

- `fashion_mnist_splits`: the embedded default, real data that works offline. Single garments (kNN
  evaluation, training), mosaics of garments with a per-pixel label map (segmentation probe) at the base
  canvas and at bigger canvases, and the natural photos that ship with scikit-image and scikit-learn.
- the researcher's own data (an image folder, a table, the ADE20K/mmseg segmentation layout): own_data.py.
"""
from __future__ import annotations

import gzip
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cgspn.pipeline.errors import InputError, ParamError
from cgspn.data.shards import Sample, encode_png

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
    """What the embedded source yields: samples per split, plus names for labels and mask values."""

    samples: SplitSamples
    classes: list[str]
    mask_classes: list[str] | None = None
    notes: tuple = ()  # sharding changes no image (cgspn.data.own_data: OwnData.notes)
    changed: dict = field(default_factory=dict)

    def splits(self) -> SplitSamples:
        return self.samples


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
            f"files from {FASHION_URL} into {dirs[0]} (params: shard.path)"
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


def garment_samples(prefix: str, images: np.ndarray, labels: np.ndarray, sources=None) -> Iterator[Sample]:
    """Single garments; `sources`: where each came from (`<IDX file>:<index>`), kept in the shard."""
    for i, (img, label) in enumerate(zip(images, labels)):
        rgb = np.repeat(img[:, :, None], 3, axis=2)
        yield Sample(f"{prefix}_{i:06d}", encode_png(rgb), label=int(label), caption=FASHION_CLASSES[label],
                     source=None if sources is None else sources[i])


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
    tr_img, tr_lab = load_fashion_mnist("train", p["path"], download_dir)
    te_img, te_lab = load_fashion_mnist("test", p["path"], download_dir)
    for name, n, have in [("train_count", p["train_count"], len(tr_img)), ("val_count", p["val_count"], len(te_img))]:
        if n > have:
            raise ParamError(f"shard.{name}={n} but Fashion-MNIST has only {have} images there")
    tr_order, te_order = rng.permutation(len(tr_img)), rng.permutation(len(te_img))
    train, val = tr_order[: p["train_count"]], te_order[: p["val_count"]]
    # Mosaics draw from the garments that the single-garment splits do not use.
    mtrain, mval = tr_order[p["train_count"] :], te_order[p["val_count"] :]
    canvas, per, sizes, seed = p["mosaic_canvas"], p["garments_per_mosaic"], p["garment_size"], p["seed"]
    splits: SplitSamples = {
        "train": garment_samples("train", tr_img[train], tr_lab[train],
                                 [f"{FASHION_FILES['train'][0]}:{i}" for i in train]),
        "val": garment_samples("val", te_img[val], te_lab[val], [f"{FASHION_FILES['test'][0]}:{i}" for i in val]),
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
