"""``mlc-bench`` / ``mlc bench``: throughput and peak memory of the MLC loss on this machine, one module per suite
(``loss``, ``fused_linear``, ``hf_capture``, ``train_step``) on the shared ``utils``; ``runner`` parses the
arguments and runs the suites. On CPU each suite module is also its own memory child
(``python -m mlc_kernels.bench.<suite> PARAMS_JSON``)."""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str = "mlc-bench") -> None:
    """The ``mlc-bench`` command (:func:`mlc_kernels.bench.runner.main`); ``prog`` names it in the usage and error
    lines (``mlc bench`` under the ``mlc`` command)."""
    from .runner import main as run  # on call: a suite run as a memory child does not import the other suites

    run(argv, prog)


__all__ = ["main"]
