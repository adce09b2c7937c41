"""The ``mlc`` command line, TRL's way: a thin entry point (:mod:`.main`) and one module per command
(:mod:`.train`, :mod:`.eval`, :mod:`.demo`, :mod:`.transfer`, :mod:`.bench`), each with ``make_parser(subparsers)``
and ``main``; what they share is in :mod:`.options`. Nothing in the package imports from here."""

from .main import main

__all__ = ["main"]
