"""Datasets as uint8 images: named datasets, image folders, archives and CSV lists, the bundled sample."""

from cnnlab.data.sources import DATASET_CHOICES, NAMED_DATASETS, Dataset, load_dataset, open_dataset

__all__ = ["DATASET_CHOICES", "NAMED_DATASETS", "Dataset", "load_dataset", "open_dataset"]
