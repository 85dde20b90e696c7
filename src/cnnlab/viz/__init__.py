"""Looking inside a trained network: filters, feature maps, reconstructed patterns, CAMs, attributions.

The methods only: pure computations on a model and tensors. Every method is a function with one
calling shape, ``method(model, x, *, target=None, layer=None, channels=None, **options) -> Tensor`` on
a batch of normalised network inputs, in the spirit of captum's ``attribute()`` (see
:mod:`cnnlab.viz.shape`); layers are named by Table 1 row (``conv1`` … ``conv5_x``, ``fc``) or module
path. :mod:`cnnlab.inspect` runs them on a run; :mod:`cnnlab.visualize` draws what they find.
"""
