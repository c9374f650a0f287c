"""A picture of what is in the shards: the first images of each split, masks shown beside mosaics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cgspn.data.shards import decode_image, decode_mask, iter_samples, split_shards

# One colour per mask value: black background, then ten distinct hues for the garment classes.
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W] class map -> uint8 [H, W, 3]."""
    return PALETTE[mask % len(PALETTE)]


def sample_grid(shard_dir: str | Path, splits: list[str], per_split: int = 8, cell: int = 96) -> Image.Image:
    """One row per split: its first `per_split` images, each followed by its mask when it has one."""
    rows = []
    for split in splits:
        tiles = []
        shard = split_shards(shard_dir, split)[0]
        for sample in iter_samples(shard):
            if len(tiles) >= per_split:
                break
            tiles.append(decode_image(sample, shard))
            if "mask.png" in sample:
                tiles.append(colorize(decode_mask(sample, shard)))
        tiles = [np.asarray(Image.fromarray(t).resize((cell, cell), Image.NEAREST)) for t in tiles[:per_split]]
        row = np.zeros((cell, cell * per_split, 3), np.uint8)
        for i, t in enumerate(tiles):
            row[:, i * cell : (i + 1) * cell] = t
        rows.append(row)
    return Image.fromarray(np.concatenate(rows, axis=0))
