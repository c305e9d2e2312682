"""Exceptions raised by :mod:`ewc`.

Every exception for bad user input is also a ``ValueError``/``TypeError``/``RuntimeError`` so
callers that catch the builtin types keep working.
"""

from __future__ import annotations

__all__ = [
    "ConsolidationError",
    "EWCError",
    "FallbackWarning",
    "ParameterMismatchError",
    "StateDictError",
    "UnsupportedCriterionError",
]


class EWCError(Exception):
    """Base class of every error :mod:`ewc` raises on purpose."""


class ConsolidationError(EWCError, RuntimeError):
    """A consolidation could not finish; the previously consolidated state is unchanged."""


class ParameterMismatchError(EWCError, ValueError):
    """A consolidated parameter is missing from the model or no longer fits its stored state."""


class StateDictError(EWCError, ValueError):
    """A state dict is foreign, damaged, of an unknown format version, or does not fit."""


class UnsupportedCriterionError(EWCError, ValueError):
    """The estimator needs a likelihood that the given criterion does not define."""


class FallbackWarning(UserWarning):
    """Some parameters left the per-layer paths of the per-example engine for the whole-model
    ``vmap`` or the per-example loop: the Fisher is still exact, but slower to compute.

    Issued once per consolidation, naming the modules, their share of the parameters and the
    reason; ``report.paths`` has the path of every parameter. Silence it with
    ``warnings.filterwarnings("ignore", category=ewc.FallbackWarning)``.
    """
