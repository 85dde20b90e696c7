"""Looking inside a trained network: filters, feature maps, reconstructed patterns, CAMs, attributions.

Every method is a function with one calling shape — a model, a batch of network inputs (B, C, H, W),
a target class or a layer — returning a tensor, in the spirit of captum's ``attribute()``; layers
are named by Table 1 row (``conv1`` … ``conv5_x``, ``fc``) or module path. :func:`visualize` is
the ``cnnlab visualize`` command: it loads a run, runs one method and writes paper-ready PNGs.
"""

from cnnlab.viz.command import visualize

__all__ = ["visualize"]
