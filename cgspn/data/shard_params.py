"""The shard section of params.yaml: what the shard stage reads, and data_listing with it (source, path)."""
from __future__ import annotations

from cgspn.pipeline.params import Param

SCHEMA = {
    "source": Param(str, choices=("fashion_mnist", "folder", "table", "segmentation", "webdataset")),
    # the data: Fashion-MNIST's folder, the image folder, the table, the segmentation root; webdataset shards
    # (a brace pattern, folder, URL or pipe: command, a list of them, or {split: those})
    "path": Param((str, list, dict)),
    "train_count": Param(int, min=1),
    "val_count": Param(int, min=1),
    "mosaic_train_count": Param(int, min=0),
    "mosaic_val_count": Param(int, min=0),
    "mosaic_canvas": Param(int, min=14),
    "garments_per_mosaic": Param(list, item=int, min=1, length=2),
    "garment_size": Param(list, item=int, min=4, length=2),
    "mosaic_scales": Param(list, item=int, min=2),
    "mosaic_scaled_train_count": Param(int, min=0),
    "mosaic_eval_count": Param(int, min=0),
    "photos": Param(bool),
    "val_fraction": Param(float, min=0.0, max=1.0),  # own data without splits: this share goes to val
    "ignore_label": Param(int, min=0, max=255, optional=True),  # own masks: this value is not scored (null: none)
    "max_per_shard": Param(int, min=1),
    "seed": Param(int, min=0),
}
