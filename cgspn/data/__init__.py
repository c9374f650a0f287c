"""Data: webdataset shards (write, index, read, zip with teacher features) and the image sources."""
from cgspn.data.shards import (Sample, SplitInfo, decode_image, decode_mask, decode_npy, encode_npy, encode_png, iter_samples, split_shards, write_split, zip_samples)

__all__ = [
    "Sample", "SplitInfo", "decode_image", "decode_mask", "decode_npy", "encode_npy", "encode_png",
    "iter_samples", "split_shards", "write_split", "zip_samples",
]
