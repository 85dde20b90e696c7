"""The assignment's input pipeline, re-created faithfully so that cnnlab can be compared with it.

The assignment read CIFAR-10 with a torchvision image-folder dataset and this per-image transform::

    transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

inside ``DataLoader(batch_size=64, shuffle=True, num_workers=2)``. One deliberate difference: the
images are handed to the dataset already decoded, as PIL images in memory, so that neither the disk
nor JPEG decoding is part of the comparison. That only helps the assignment's side (an image folder
would also decode every JPEG every epoch), so the measured speed-ups are, if anything, understated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

BATCH_SIZE = 64
WORKERS = 2
MEAN = STD = (0.5, 0.5, 0.5)


def transform(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The assignment's per-image transform: PIL bilinear resize (with antialias), to [0, 1], normalise."""
    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, C, H, W) tensors → PIL images, as an image folder would produce after decoding."""
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


class InMemoryImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` with the decoded images held in memory (see module doc)."""

    def __init__(self, images: list[Image.Image], labels: list[int],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


def loader(images: torch.Tensor, labels: torch.Tensor, image_size: int = 224, batch_size: int = BATCH_SIZE,
           workers: int = WORKERS, seed: int = 0) -> DataLoader:
    """The assignment's training DataLoader over uint8 ``images`` (N, C, H, W) and int ``labels``."""
    dataset = InMemoryImageFolder(to_pil(images), labels.tolist(), transform(image_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))
