"""The test set through the network's eyes: its penultimate features embedded in two dimensions.

The features are the input of the network's last linear layer (the classifier reads nothing else), recorded
by a forward pre-hook in the pass that scores the test set (:func:`cnnlab.core.metrics.score`'s
``features``). They are embedded with t-SNE (van der Maaten & Hinton 2008) by openTSNE (Poličar et al.
2024): its FFT-accelerated gradients (Linderman et al. 2019) embedded 10,000 points of 512 features on
two busy CPU cores in 38 s, where scikit-learn's Barnes–Hut t-SNE took 339 s (1,000 points: 2.0 s and
2.4 s); it installs as one 3 MB wheel over numpy, scipy and scikit-learn (umap-learn would bring numba
and llvmlite), and a seed fixes the result. The features are
reduced to at most :data:`PCA_DIMS` principal components first, as both t-SNE libraries advise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError

__all__ = ["PCA_DIMS", "PERPLEXITY", "TSNE", "last_linear", "spread_points", "tsne"]

PCA_DIMS = 50
PERPLEXITY = 30.0
TSNE = f"t-SNE (openTSNE, perplexity {PERPLEXITY:g}, PCA to {PCA_DIMS} dimensions first)"


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The module path and module of ``model``'s last linear layer (in registration order), or None."""
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (path, module)
    return found


def tsne(features: Tensor, seed: int = 0, threads: int | None = None) -> Tensor:
    """Each row of ``features`` (N, D) as a point (N, 2) of a t-SNE map; the same ``seed`` gives the same map.
    ``threads``: default torch's."""
    n = len(features)
    if n < 4:
        raise UserError(f"an embedding needs at least 4 test images (got {n}); give a larger `count`")
    from openTSNE import TSNE as OpenTSNE  # imported here: a second or more, for this method alone
    from sklearn.decomposition import PCA

    x = features.double().numpy()
    dims = min(PCA_DIMS, n, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    # Perplexity must stay below a third of the points: a handful of images gets a smaller one.
    perplexity = min(PERPLEXITY, (n - 1) / 3)
    points = OpenTSNE(n_components=2, perplexity=perplexity, random_state=seed, verbose=False,
                      n_jobs=threads or torch.get_num_threads()).fit(np.ascontiguousarray(x))
    return torch.from_numpy(np.asarray(points, dtype=np.float32))


def spread_points(points: Tensor, grid: int = 8) -> list[int]:
    """A spread of the points to show as thumbnails: in each cell of a ``grid`` × ``grid`` division of the
    map's bounding box that holds any, the point nearest the cell's centre; returned row by row."""
    lo, hi = points.amin(0), points.amax(0)
    size = (hi - lo).clamp_min(1e-12) / grid
    cell = ((points - lo) / size).floor().clamp(0, grid - 1).long()
    centre = lo + (cell.float() + 0.5) * size
    distance = (points - centre).norm(dim=1)
    chosen = []
    for key in torch.unique(cell[:, 1] * grid + cell[:, 0]).tolist():
        inside = ((cell[:, 1] * grid + cell[:, 0]) == key).nonzero()[:, 0]
        chosen.append(int(inside[distance[inside].argmin()]))
    return chosen
