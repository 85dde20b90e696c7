"""Looking inside a run, once for every front-end: the command line, the report and the explorer.

:class:`~cnnlab.inspect.inspector.Inspection` opens a run once and runs the methods of
:mod:`cnnlab.viz` on it; :mod:`~cnnlab.inspect.registry` is the one registry of those methods (what
each takes, whether its maps are signed, its quick settings, the result it gives);
:mod:`~cnnlab.inspect.results` holds the typed results the front-ends draw; :func:`show` runs a method
as the user chose, :func:`~cnnlab.inspect.checks.sanity` the explanation checks.
"""

from cnnlab.inspect.checks import sanity
from cnnlab.inspect.inspector import Inspection
from cnnlab.inspect.registry import METHODS, TECHNIQUES, Choices
from cnnlab.inspect.views import show

__all__ = ["METHODS", "TECHNIQUES", "Choices", "Inspection", "sanity", "show"]
