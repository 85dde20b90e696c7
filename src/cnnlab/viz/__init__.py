"""Looking inside a trained network: filters, feature maps, reconstructed patterns, CAMs, attributions.

Every method is a function with one calling shape, ``method(model, x, *, target=None, layer=None,
channels=None, **options) -> Tensor`` on a batch of normalised network inputs, in the spirit of
captum's ``attribute()`` (see :mod:`cnnlab.viz.shape`); layers are named by Table 1 row (``conv1`` …
``conv5_x``, ``fc``) or module path. :func:`visualize` is the ``cnnlab visualize`` command: it loads
a run, runs one method and writes paper-ready PNGs.
"""

from cnnlab.viz.command import visualize

__all__ = ["visualize"]
