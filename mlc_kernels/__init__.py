"""mlc-kernels: fused kernels for the Multi-Lingual Consistency (MLC) loss (arXiv 2602.16660).

Public API: :func:`mlc_loss`, :class:`MLCLoss`, :func:`consistency_metrics`, :class:`MLCHead`,
:func:`fused_linear_mlc_loss`, :class:`FusedLinearMLCLoss`; the collapse guards' registry :data:`GUARDS`.
"""

from .fused_linear import FusedLinearMLCLoss, fused_linear_mlc_loss
from .guards import GUARDS
from .head import MLCHead
from .loss import IMPLEMENTATIONS, ImplementationUnavailableError, MLCLoss, mlc_loss
from .metrics import consistency_metrics

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "FusedLinearMLCLoss",
    "GUARDS",
    "ImplementationUnavailableError",
    "MLCHead",
    "MLCLoss",
    "consistency_metrics",
    "fused_linear_mlc_loss",
    "mlc_loss",
]
