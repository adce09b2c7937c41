"""Kept for tools that call setup.py directly; the configuration lives in pyproject.toml."""

from setuptools import setup

setup()
