"""Datasets as uint8 tensors: official CIFAR-10, image folders and archives, the bundled sample."""

from cnnlab.data.sources import DATASET_CHOICES, Dataset, load_dataset

__all__ = ["DATASET_CHOICES", "Dataset", "load_dataset"]
