"""cnnlab: train a convolutional network for image recognition, then see what it learned."""

__version__ = "0.1.0"
