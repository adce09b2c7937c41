"""Benchmarks of the MLC loss (installed as ``mlc_kernels.benchmarks``; console script ``mlc-bench``)."""
