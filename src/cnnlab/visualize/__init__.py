"""``cnnlab visualize``: the figures of a method of :mod:`cnnlab.inspect` on a run, as PNGs.

:func:`visualize` writes a method's figures (:mod:`cnnlab.visualize.figures`, one drawing function
per result type, laid out by :mod:`cnnlab.visualize.render`); :func:`sanity` the explanation checks'
table and cascade figure.
"""

from cnnlab.visualize.command import sanity, shown, visualize

__all__ = ["sanity", "shown", "visualize"]
