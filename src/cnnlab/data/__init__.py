"""Datasets as uint8 images: named datasets, image folders, archives and CSV lists, the bundled sample."""

from cnnlab.data.dataset import Dataset, load_dataset, open_dataset
from cnnlab.data.readers import DATASET_CHOICES, NAMED_DATASETS, default_data_dir

__all__ = ["DATASET_CHOICES", "NAMED_DATASETS", "Dataset", "default_data_dir", "load_dataset", "open_dataset"]
