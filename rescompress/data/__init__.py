"""Datasets behind one interface: small built-in sources as uint8 splits in memory, image folders and
manifests streamed from disk through DataLoader workers; plus the input spec that normalizes them."""

from rescompress.data.base import (IMAGENET_MEAN, IMAGENET_STD, DatasetBundle, RawDataset, Split, batches,
                                   stratified_split)
from rescompress.data.files import FileIndex, FileSplit
from rescompress.data.sources import DATASETS, ON_DISK, StreamOptions, default_root, load_dataset, read_idx
from rescompress.data.spec import InputSpec

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ON_DISK",
    "DatasetBundle",
    "FileIndex",
    "FileSplit",
    "InputSpec",
    "RawDataset",
    "Split",
    "StreamOptions",
    "batches",
    "default_root",
    "load_dataset",
    "read_idx",
    "stratified_split",
]
