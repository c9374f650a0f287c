"""Synthetic webdataset shards in img2dataset's layout, for the tests and the scale benchmark.

Shard `{i:05d}.tar` holds, per sample, `<key>.jpg` (a small JPEG of coloured shapes), `<key>.txt` (its
caption), `<key>.json` (img2dataset's metadata, `status` "success") and, with `labels`, `<key>.cls`; every
`failed_every`-th sample is one that failed to download: metadata only, status "failed_to_download", as
img2dataset records it. Keys are img2dataset's: shard number then sample number, 9 digits.

    python -m benchmarks.img2dataset_shards /tmp/shards --samples 1000 --per-shard 100
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle")


def synthetic_image(rng: np.random.Generator, side: int) -> tuple[bytes, int, str]:
    """(JPEG bytes of one coloured shape on a coloured ground, its class = shape index, a caption)."""
    cls = int(rng.integers(len(SHAPES)))
    ground, ink = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    im = Image.new("RGB", (side, side), ground)
    draw = ImageDraw.Draw(im)
    a, b = sorted(rng.integers(side // 8, side - side // 8, 2).tolist())
    b = max(b, a + side // 4)
    if SHAPES[cls] == "ellipse":
        draw.ellipse([a, a, b, b], fill=ink)
    elif SHAPES[cls] == "rectangle":
        draw.rectangle([a, a, b, b], fill=ink)
    else:
        draw.polygon([(a, b), (b, b), ((a + b) // 2, a)], fill=ink)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), cls, f"a {SHAPES[cls]} in {ink} on {ground}"


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: str | Path, samples: int, per_shard: int, side: int = 64, seed: int = 0,
                 labels: bool = False, failed_every: int = 0) -> list[Path]:
    """Write ceil(samples / per_shard) shards into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(-(-samples // per_shard)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(min(per_shard, samples - shard * per_shard)):
                key = f"{shard:05d}{i:04d}"
                meta = {"key": key, "url": f"https://example.org/{key}.jpg", "status": "success",
                        "error_message": None}
                if failed_every and (shard * per_shard + i) % failed_every == failed_every - 1:
                    meta.update(status="failed_to_download", error_message="HTTP Error 404")
                    add(tar, f"{key}.json", json.dumps(meta).encode())
                    continue
                jpg, cls, caption = synthetic_image(rng, side)
                meta.update(caption=caption, width=side, height=side)
                add(tar, f"{key}.jpg", jpg)
                add(tar, f"{key}.txt", caption.encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
                if labels:
                    add(tar, f"{key}.cls", str(cls).encode())
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--labels", action="store_true")
    parser.add_argument("--failed-every", type=int, default=0)
    a = parser.parse_args()
    paths = write_shards(a.folder, a.samples, a.per_shard, a.side, labels=a.labels, failed_every=a.failed_every)
    print(f"{len(paths)} shards in {a.folder}")


if __name__ == "__main__":
    main()
