"""The embedding in TensorBoard's projector: the penultimate features of the test images, with their
classes as metadata and a sprite of their thumbnails (``SummaryWriter.add_embedding``).

The projector makes its own map of the features (PCA, t-SNE or UMAP in the browser); the features are
those cnnlab's map was made from, so the two show the same images by the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from cnnlab.core.errors import one_line
from cnnlab.inspect.inspector import Inspection
from cnnlab.inspect.results import Embedding

__all__ = ["SPRITE_SIDE", "TAG", "projector"]

# Thumbnails of the sprite at most this many pixels a side: TensorBoard reads the sprite as one image, at most
# 8192 px a side, so 10,000 images fit at 32 px (100 × 100 of them, 3200 px).
SPRITE_SIDE = 32
TAG = "test_set_penultimate_features"


def sprite(inspection: Inspection, indices: torch.Tensor) -> torch.Tensor:
    """The test images ``indices`` as the network sees them, (N, 3, s, s) in [0, 1], s at most
    :data:`SPRITE_SIDE`."""
    images, _ = inspection.test_set()
    pre = inspection.preprocess
    tiles = []
    for start in range(0, len(indices), 256):
        x = pre.to_pixels(pre.to_input(images[indices[start:start + 256]].to(inspection.device))).float().cpu()
        if x.shape[-1] > SPRITE_SIDE:
            x = F.interpolate(x, size=(SPRITE_SIDE, SPRITE_SIDE), mode="bilinear", antialias=True, align_corners=False)
        tiles.append(x.clamp(0, 1).expand(-1, 3, -1, -1))
    return torch.cat(tiles)


def projector(inspection: Inspection, result: Embedding, log_dir: Path) -> Path:
    """Write ``result``'s features, metadata (index, true class, predicted class, probability) and sprite to
    the TensorBoard folder ``log_dir``; returns the folder."""
    classes = [one_line(c) for c in result.classes]
    metadata = [[str(i), classes[t], classes[p], f"{q:.3f}"]
                for i, t, p, q in zip(result.indices.tolist(), result.labels.tolist(), result.predictions.tolist(),
                                      result.probabilities.tolist())]
    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_embedding(result.features, metadata=metadata, metadata_header=["index", "true", "predicted",
                                                                                  "probability"],
                             label_img=sprite(inspection, result.indices), tag=TAG)
    finally:
        writer.close()
    return log_dir
