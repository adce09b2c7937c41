"""mlc-kernels: fused kernels for the Multi-Lingual Consistency (MLC) loss (arXiv 2602.16660).

Public API: :func:`mlc_loss`, :class:`MLCLoss`, :func:`consistency_metrics`.
"""

from .loss import IMPLEMENTATIONS, ImplementationUnavailableError, MLCLoss, mlc_loss
from .metrics import consistency_metrics

__version__ = "0.1.0"

__all__ = ["IMPLEMENTATIONS", "ImplementationUnavailableError", "MLCLoss", "consistency_metrics", "mlc_loss"]
