"""Small data sets of real photos that are not Fashion-MNIST, in the three layouts a researcher brings:
an image folder, a table (CSV or parquet, with captions), and the ADE20K/mmseg segmentation layout.

The pictures are random crops of the photos that ship with scikit-image (no download); a crop's class is
the photo it comes from. Label maps are derived from the crop's own pixels: four brightness bands
(labels 1-4), and 0 ("ignore", as ADE20K's "other") on a border strip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]


def crops(n: int, seed: int, sizes=(40, 90)):
    """n (class name, uint8 [h, w, 3]) crops of varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    pictures = {name: photo(name) for name in PHOTOS}
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        img = pictures[name]
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], size=2))
        top, left = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        yield name, np.ascontiguousarray(img[top : top + h, left : left + w])


def label_map(rgb: np.ndarray) -> np.ndarray:
    """uint8 [h, w]: brightness bands 1..4 (quartiles of the crop's own grey levels), 0 on a 2-px border."""
    grey = rgb.astype(np.float64).mean(-1)
    edges = np.quantile(grey, [0.25, 0.5, 0.75])
    labels = (1 + np.searchsorted(edges, grey)).astype(np.uint8)
    labels[:2], labels[-2:], labels[:, :2], labels[:, -2:] = 0, 0, 0, 0
    return labels


def make_folder(root: Path, n: int = 32, seed: int = 0) -> Path:
    """root/<class>/<i>.png|jpg; one image is a 16-bit greyscale PNG."""
    for i, (name, img) in enumerate(crops(n, seed)):
        (root / name).mkdir(parents=True, exist_ok=True)
        if i == 5:
            grey16 = (img.astype(np.uint16).mean(-1) * 257).astype(np.uint16)
            Image.fromarray(grey16).save(root / name / f"{i:03d}_16bit.png")
        else:
            Image.fromarray(img).save(root / name / f"{i:03d}.{'jpg' if i % 3 else 'png'}")
    return root


def make_table(root: Path, fmt: str = "csv", n: int = 32, seed: int = 1, masks: bool = False) -> Path:
    """root/images/<i>.png and root/photos.<fmt>: path, label (class names), caption, split (every 5th val),
    and a mask column with root/masks/<i>.png when `masks`."""
    import pandas as pd

    (root / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (root / "masks").mkdir(exist_ok=True)
    rows = []
    for i, (name, img) in enumerate(crops(n, seed)):
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        row = {"path": f"images/{i:03d}.png", "label": name, "caption": f"a crop of the {name} photo",
               "split": "val" if i % 5 == 0 else "train"}  # every class in both splits (classes cycle by 4)
        if masks:
            Image.fromarray(label_map(img)).save(root / "masks" / f"{i:03d}.png")
            row["mask"] = f"masks/{i:03d}.png"
        rows.append(row)
    table = root / f"photos.{fmt}"
    df = pd.DataFrame(rows)
    df.to_parquet(table) if fmt == "parquet" else df.to_csv(table, index=False)
    return table


def make_segmentation(root: Path, n_train: int = 24, n_val: int = 8, seed: int = 2) -> Path:
    """ADE20K's layout: images/{training,validation}/<name>.jpg, annotations/.../<name>.png, classes.txt."""
    pictures = crops(n_train + n_val, seed, sizes=(48, 96))
    for i, (_, img) in enumerate(pictures):
        split = "training" if i < n_train else "validation"
        name = f"SEG_{split}_{i:05d}"
        for sub in ("images", "annotations"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=92)
        Image.fromarray(label_map(img)).save(root / "annotations" / split / f"{name}.png")
    (root / "classes.txt").write_text("darkest\ndark\nbright\nbrightest\n")
    return root
