"""What a network can be: the configuration refuses anything beyond, and a checkpoint that claims more is
refused before anything is built. Beyond them a model no longer fits in memory or a tensor side overflows.

A module of its own, free of torch, so that the command line can build its flags (cnnlab.config) at once.
"""

MAX_WIDTH = 256
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024
MAX_CLASSES = 100_000
