"""Datasets as uint8 splits at the model input size, plus the input spec that normalizes them."""

from rescompress.data.base import DatasetBundle, RawDataset, Split, batches, stratified_split
from rescompress.data.sources import DATASETS, default_root, load_dataset, read_idx
from rescompress.data.spec import InputSpec

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "InputSpec",
    "RawDataset",
    "Split",
    "batches",
    "default_root",
    "load_dataset",
    "read_idx",
    "stratified_split",
]
