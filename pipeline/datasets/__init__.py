"""The SED paper's benchmark datasets: a registry, `prepare` from the official downloads, a reader."""

from .prepare import prepare_dataset
from .prepared import BenchmarkItem, PreparedDataset, read_label_map, read_prepared
from .registry import DATASETS, DatasetError, DatasetSpec, get_dataset

__all__ = [
    "DATASETS",
    "BenchmarkItem",
    "DatasetError",
    "DatasetSpec",
    "PreparedDataset",
    "get_dataset",
    "prepare_dataset",
    "read_label_map",
    "read_prepared",
]
