"""Experiments that live beside the package, not in the wheel: run from a checkout (``python -m experiments...``)."""
