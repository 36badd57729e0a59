"""Datasets for training: read local files, render task formats into token ids with masked labels, split."""

from .dataset import DataError, DataSplits, load_data
from .formats import Example

__all__ = ["DataError", "DataSplits", "Example", "load_data"]
