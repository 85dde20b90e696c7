"""What a figure is asked to show: the loaded run, the images and the user's choices."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cnnlab.run import LoadedRun
from cnnlab.viz.inputs import Batch, from_files, from_test_set

__all__ = ["Job"]


@dataclass
class Job:
    """The parameters of :func:`cnnlab.viz.visualize`, resolved: layers by name, targets as class indices."""

    method: str
    run: LoadedRun
    layers: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # empty: each image's predicted class
    channels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    count: int | None = None
    steps: int | None = None
    images: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    data_dir: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 test images and labels the run reported on (loaded once)."""
        return self.run.test_set(data_dir=self.data_dir)

    def batch(self, default_count: int = 1) -> Batch:
        """The images asked for: ``image`` files, else ``index`` test images, else the first ``count``."""
        pre = self.run.preprocess
        if self.images:
            batch = from_files(self.images, pre)
        else:
            x, y = self.test_set()
            batch = from_test_set(x, y, self.indices or list(range(self.count or default_count)), pre)
        batch.x = batch.x.to(self.run.device)
        return batch
