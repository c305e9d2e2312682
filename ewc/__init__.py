"""Elastic Weight Consolidation for PyTorch.

>>> from ewc import EWC
>>> reg = EWC(ewc_lambda=100.0, mode="separate", fisher="exact")

The core imports no training framework; adapters live in :mod:`ewc.adapters`.
"""

from __future__ import annotations

from ewc.core import EWC, ConsolidationReport, FisherEstimate
from ewc.errors import (
    ConsolidationError,
    EWCError,
    FallbackWarning,
    ParameterMismatchError,
    StateDictError,
    UnsupportedCriterionError,
)
from ewc.fisher import ESTIMATORS, FisherSums, fisher_from_sums, fisher_sums
from ewc.rules import register_rule
from ewc.store import FORMAT_VERSION, ConsolidatedState

__all__ = [
    "ESTIMATORS",
    "EWC",
    "FORMAT_VERSION",
    "ConsolidatedState",
    "ConsolidationError",
    "ConsolidationReport",
    "EWCError",
    "FallbackWarning",
    "FisherEstimate",
    "FisherSums",
    "ParameterMismatchError",
    "StateDictError",
    "UnsupportedCriterionError",
    "fisher_from_sums",
    "fisher_sums",
    "register_rule",
]

__version__ = "0.1.0.dev0"
