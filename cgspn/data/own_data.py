"""The researcher's own data as `Sample`s per split: an image folder, a table, or a segmentation layout.

- `folder`: `<path>/<class>/<image>` (labels from the class folders), or `<path>/<split>/<class>/<image>`
  when every top-level folder is a split name (train, val, test, training, validation).
- `table`: a CSV or parquet file; `path` (relative to the table's folder, or absolute) and optional
  `label` (integers or class names, not a mix), `caption`, `split`, `mask` (a label-map PNG).
- `segmentation`: the layout ADE20K and mmseg use, `<path>/images/<split>/<name>.jpg|png` with
  `<path>/annotations/<split>/<name>.png` (training/validation are read as train/val); class names from
  `classes.txt` (one per line, for labels 1, 2, ...) or ADE20K's `objectInfo150.txt|csv` when present.

Every sample keeps its source file (relative to `path`) in the shard, and its key is made from that path,
so adding or removing one image changes no other sample's key. Without a split, a file's split follows from
a hash of its path (stable too). Images in 16-bit or float modes are scaled to 8 bit, images in formats
the shards do not store re-encoded as PNG; `OwnData.notes` says so, per kind of change with the count.
Everything the sources reject is an InputError naming the file, or the table, its row and its column.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cgspn.pipeline.errors import InputError
from cgspn.data.shards import MMSEG_IGNORE, Sample, encode_png, pil_reason

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SPLIT_NAMES = {"training": "train", "validation": "val"}  # ADE20K's folder names -> the pipeline's
SPLIT_FOLDERS = {"train", "val", "test", "training", "validation"}
STORED_FORMATS = {"png": "png", "jpeg": "jpg", "mpo": "jpg", "webp": "webp", "bmp": "bmp"}
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


@dataclass
class Record:
    """One image to shard, before it is read."""

    path: Path  # the image file
    source: str  # its path relative to the source (posix), kept in the shard
    where: str  # for messages: the file, or "<table> line <n>"
    split: str
    label: int | None = None
    caption: str | None = None
    mask: Path | None = None


@dataclass
class OwnData:
    """What a source of the researcher's data holds: records in order, class names, mask class names."""

    records: list[Record]
    classes: list[str] | None  # None: the data has no labels
    mask_names: list[str] | None  # names of mask values 0, 1, ... where the data names them
    changed: dict[str, list[str]] = field(default_factory=dict)  # change -> sources (filled while sharding)
    max_mask_label: int = -1  # the largest value in any mask (filled while sharding)

    @property
    def notes(self) -> list[str]:
        """What sharding changed in the images, a short sentence per kind with how many (after sharding)."""
        return change_notes(self.changed)

    @property
    def mask_classes(self) -> list[str] | None:
        """Names of the mask values 0..max (the given names, else "class <v>"); None without masks."""
        if not any(r.mask is not None for r in self.records):
            return None
        names = list(self.mask_names or [])
        return names + [f"class {v}" for v in range(len(names), self.max_mask_label + 1)]

    def splits(self) -> dict[str, Iterator[Sample]]:
        return {s: self._samples(s) for s in sorted({r.split for r in self.records})}

    def _samples(self, split: str) -> Iterator[Sample]:
        for r in self.records:
            if r.split == split:
                data, ext, change = read_image(r.path, r.where)
                if change:
                    self.changed.setdefault(change, []).append(r.source)
                mask = None
                if r.mask is not None:
                    mask_array = read_mask(r.mask, r.where)
                    labels = mask_array[mask_array != MMSEG_IGNORE]  # 255: mmseg's "ignore", never a class
                    top = int(labels.max(initial=0))
                    if self.mask_names and top >= len(self.mask_names):
                        raise InputError(f"{r.mask}: label value {top} is not a declared class (the class names "
                                         f"give values 0..{len(self.mask_names) - 1}; 255 is ignored)")
                    self.max_mask_label = max(self.max_mask_label, top)
                    with Image.open(io.BytesIO(data)) as im:
                        if im.size[::-1] != mask_array.shape:
                            raise InputError(f"{r.where}: mask {r.mask} is {mask_array.shape[1]}x{mask_array.shape[0]} "
                                             f"but image {r.path} is {im.size[0]}x{im.size[1]}")
                    mask = encode_png(mask_array)
                yield Sample(sample_key(r.source), data, ext, r.label, mask=mask, caption=r.caption, source=r.source)


def sample_key(source: str) -> str:
    """A webdataset key from a source path: readable, no dots, unique (a hash of the path ends it)."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", source.rsplit(".", 1)[0]).strip("_")[-80:] or "image"
    return f"{stem}_{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def stable_split(source: str, val_fraction: float, seed: int) -> str:
    """train or val from a hash of the path: the same file always lands in the same split."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def split_name(name: str, where: str) -> str:
    name = SPLIT_NAMES.get(name, name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise InputError(f"{where}: split {name!r} is not a usable split name (letters, digits, '_' and '-')")
    return name


# --- reading files ----------------------------------------------------------------------------------


SIXTEEN_BIT, DEEP = "16-bit", "32-bit or float"  # the changes `to_8bit` makes
SCALING = {SIXTEEN_BIT: "value / 257", DEEP: "each image's minimum to maximum onto 0..255"}
REENCODED = "format "  # + the format's name: an 8-bit image in a format the shards do not store


def to_8bit(im: Image.Image) -> tuple[np.ndarray, str]:
    """A 16-bit, 32-bit integer or float image -> (uint8 [H, W] scaled to 0..255, not clipped; SIXTEEN_BIT
    or DEEP: how it was scaled)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        return np.round(a.astype(np.float64) / 257).astype(np.uint8), SIXTEEN_BIT  # 65535 -> 255
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
    return np.round((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8), DEEP


def change_notes(changed: dict[str, list[str]]) -> list[str]:
    """{change: sources} (changes as `read_image` names them) -> one sentence per kind of change, in a fixed
    order: "3 16-bit images scaled to 8 bit (value / 257)", "1 image re-encoded as RGB PNG (from tiff)"."""
    notes = []
    for depth in (SIXTEEN_BIT, DEEP):
        n = len(changed.get(depth, []))
        if n:
            notes.append(f"{n} {depth} image{'s' * (n != 1)} scaled to 8 bit ({SCALING[depth]})")
    formats = sorted(c.removeprefix(REENCODED) for c in changed if c.startswith(REENCODED))
    if formats:
        n = sum(len(changed[REENCODED + f]) for f in formats)
        notes.append(f"{n} image{'s' * (n != 1)} re-encoded as RGB PNG (from {', '.join(formats)})")
    return notes


def read_image(path: Path, where: str) -> tuple[bytes, str, str | None]:
    """(encoded bytes, extension, change): the file as it is when it decodes as an 8-bit image in a format
    every reader opens (change None), else re-encoded as PNG: 16-bit and float modes scaled to 8 bit (change
    SIXTEEN_BIT or DEEP), other formats as RGB (change "format <name>")."""
    if not path.exists():
        raise InputError(f"{where}: image file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{where}: {path} is a directory, not an image file")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode = (im.format or "").lower(), im.mode
            if mode not in EIGHT_BIT_MODES:
                grey, change = to_8bit(im)
                return encode_png(np.repeat(grey[:, :, None], 3, axis=2)), "png", change
            if fmt not in STORED_FORMATS:
                return encode_png(np.asarray(im.convert("RGB"))), "png", REENCODED + (fmt or "unknown")
    except InputError:
        raise
    except Exception as e:  # PIL raises several types for a bad file
        raise InputError(f"{where}: image file {path} does not decode ({pil_reason(e)})") from None
    return data, STORED_FORMATS[fmt], None


def read_mask(path: Path, where: str) -> np.ndarray:
    """A label map: one channel of class values (modes L, P, or 16-bit with values up to 255) -> uint8 [H, W]."""
    if not path.is_file():
        raise InputError(f"{where}: mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode, a = im.mode, np.asarray(im)
    except Exception as e:
        raise InputError(f"{where}: mask file {path} does not decode ({pil_reason(e)})") from None
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise InputError(f"{where}: mask {path} must be a one-channel label map (PNG mode L or P), got mode {mode}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise InputError(f"{where}: mask {path} holds label {int(a.max() if a.max() > 255 else a.min())}; "
                         f"labels must be 0..255")
    return a.astype(np.uint8)


def image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


# --- the three layouts ------------------------------------------------------------------------------


def folder_data(root: Path, val_fraction: float, seed: int) -> OwnData:
    """`root/<class>/<image>`, or `root/<split>/<class>/<image>` when every top-level folder is a split."""
    if not root.is_dir():
        raise InputError(f"shard.path={str(root)!r} is not a directory")
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_split = bool(top) and all(d.name in SPLIT_FOLDERS for d in top)
    groups = [(split_name(d.name, str(d)), d) for d in top] if by_split else [(None, root)]
    classes = sorted({c.name for _, base in groups for c in base.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not classes:
        raise InputError(f"{root}: no class folders (expected {root}/<class>/<image> or {root}/<split>/<class>/<image>)")
    records = []
    for split, base in groups:
        for c in classes:
            for f in image_files(base / c) if (base / c).is_dir() else []:
                source = f.relative_to(root).as_posix()
                records.append(Record(f, source, str(f), split or stable_split(source, val_fraction, seed),
                                      classes.index(c), caption=c))
    if not records:
        raise InputError(f"{root}: the class folders hold no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return OwnData(records, classes, None)


def segmentation_data(root: Path, val_fraction: float = 0.0, seed: int = 0) -> OwnData:
    """`root/images/<split>/<name>.<ext>` with `root/annotations/<split>/<name>.png` (ADE20K, mmseg). A split
    folder without images is refused; without a val (or test) folder, `val_fraction` of train goes to val
    (by a hash of each path, as for the other sources). Mask value 255 is mmseg's "ignore": not a class."""
    images, annotations = root / "images", root / "annotations"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise InputError(f"shard.path={str(root)!r}: no {folder.name}/ folder (the segmentation layout is "
                             f"images/<split>/<name>.jpg with annotations/<split>/<name>.png)")
    records = []
    for split_dir in sorted(d for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")):
        split = split_name(split_dir.name, str(split_dir))
        if not image_files(split_dir):
            raise InputError(f"{split_dir}: no images in this split folder (remove it, or put its images there; "
                             f"without a val folder, shard.val_fraction of train becomes val)")
        for f in image_files(split_dir):
            rel = f.relative_to(split_dir)
            mask = annotations / split_dir.name / rel.with_suffix(".png")
            if not mask.is_file():
                raise InputError(f"{f}: no label map {mask} for this image")
            records.append(Record(f, f.relative_to(root).as_posix(), str(f), split, mask=mask))
    if not records:
        raise InputError(f"{images}: no images under images/<split>/")
    if not any(r.split in ("val", "test") for r in records):
        if val_fraction <= 0:
            raise InputError(f"{images}: no val (or test) folder, and shard.val_fraction is 0: give the data a "
                             f"validation split (images/val/) or a shard.val_fraction > 0")
        for r in records:
            r.split = stable_split(r.source, val_fraction, seed) if r.split == "train" else r.split
    names = segmentation_class_names(root)
    return OwnData(records, None, names)


def segmentation_class_names(root: Path) -> list[str] | None:
    """Names for label values 0, 1, ...: `classes.txt` (names of 1, 2, ...) or ADE20K's objectInfo150."""
    if (root / "classes.txt").is_file():
        names = [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
        return ["(0)"] + names
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        f = root / name
        if f.is_file():
            import pandas as pd

            df = pd.read_csv(f, sep="\t" if f.suffix == ".txt" else ",")
            column = next((c for c in df.columns if c.strip().lower() == "name"), None)
            if column is not None:
                return ["other"] + [str(n).split(";")[0].strip() for n in df[column]]
    return None


def table_data(table: Path, val_fraction: float, seed: int) -> OwnData:
    """A CSV or parquet table: `path` and optional `label`, `caption`, `split`, `mask` columns."""
    rows, columns = read_table(table)
    csv = table.suffix.lower() != ".parquet"

    def where(i: int, column: str) -> str:
        return f"{table} {'line' if csv else 'row'} {i + 2 if csv else i}, column {column!r}"  # CSV line 1: header

    if "path" not in columns:
        raise InputError(f"{table}: no 'path' column (columns: {columns})")
    labels, classes = table_labels(rows, columns, where)
    records = []
    for i, row in enumerate(rows):
        if not row["path"]:
            raise InputError(f"{where(i, 'path')}: empty")
        path = Path(row["path"]) if Path(row["path"]).is_absolute() else table.parent / row["path"]
        if path.is_dir():
            raise InputError(f"{where(i, 'path')}: {path} is a directory, not an image file")
        if not path.exists():
            raise InputError(f"{where(i, 'path')}: image file {path} does not exist")
        source = Path(row["path"]).as_posix()
        if "split" in columns:
            if not row["split"]:
                raise InputError(f"{where(i, 'split')}: empty (give every row a split, or drop the column)")
            split = split_name(row["split"], where(i, "split"))
        else:
            split = stable_split(source, val_fraction, seed)
        mask = None
        if "mask" in columns and row["mask"]:
            mask = Path(row["mask"]) if Path(row["mask"]).is_absolute() else table.parent / row["mask"]
            if not mask.is_file():
                raise InputError(f"{where(i, 'mask')}: mask file {mask} does not exist")
        records.append(Record(path, source, where(i, "path"), split, labels[i], row.get("caption") or None, mask))
    for split in {r.split for r in records}:
        have = [r.mask is not None for r in records if r.split == split]
        if any(have) and not all(have):
            first = next(i for i, r in enumerate(records) if r.split == split and r.mask is None)
            raise InputError(f"{where(first, 'mask')}: empty, but other rows of split {split!r} have masks "
                             f"(a split has masks on every row or on none)")
    return OwnData(records, classes, segmentation_class_names(table.parent))


def read_table(table: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The table's rows as {column: stripped text, '' for an empty cell}, and its column names."""
    import pandas as pd

    if not table.is_file():
        raise InputError(f"shard.path={str(table)!r} is not a file")
    parquet = table.suffix.lower() == ".parquet"
    try:
        df = pd.read_parquet(table) if parquet else pd.read_csv(table, dtype=str, keep_default_na=False)
    except Exception as e:
        raise InputError(f"{table}: not a readable {'parquet' if parquet else 'CSV'} file "
                         f"({' '.join(str(e).split())})") from None
    columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise InputError(f"{table}: no rows (only a header: {columns})")
    rows = [{c: _cell(v) for c, v in zip(columns, values)} for values in df.itertuples(index=False)]
    return rows, columns


def _cell(v) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def table_labels(rows: list[dict], columns: list[str], where) -> tuple[list[int | None], list[str] | None]:
    """Labels as class indices, and the class names: integers (>= 0; classes 0..max) or names (sorted),
    never a mix; no empty cell."""
    if "label" not in columns:
        return [None] * len(rows), None
    kinds = []
    for i, row in enumerate(rows):
        value = row["label"]
        if not value:
            raise InputError(f"{where(i, 'label')}: empty (every row needs a label, or drop the column)")
        if re.fullmatch(r"[+-]?\d+", value):
            if int(value) < 0:
                raise InputError(f"{where(i, 'label')}: {value} is negative (labels are class indices >= 0 or names)")
            kinds.append("integer")
        else:
            kinds.append("name")
    if len(set(kinds)) > 1:
        minority = min(("integer", "name"), key=kinds.count)  # name the odd one out
        i, j = kinds.index(minority), kinds.index("name" if minority == "integer" else "integer")
        raise InputError(f"{where(i, 'label')}: {rows[i]['label']!r} is a class {minority}, but "
                         f"{where(j, 'label')} holds {rows[j]['label']!r}: labels must be all integers or all names")
    if kinds[0] == "integer":
        labels = [int(r["label"]) for r in rows]
        return labels, [str(c) for c in range(max(labels) + 1)]
    classes = sorted({r["label"] for r in rows})
    return [classes.index(r["label"]) for r in rows], classes
