"""Temporary: the import path ``mlc transfer`` used before :mod:`.v2` held it (removed with the CLI's move)."""

from .v2 import run_from_args  # noqa: F401
