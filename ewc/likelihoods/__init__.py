"""Likelihoods the ``exact``/``sample`` estimators read from the criterion, one file each.

============================  ===========  ===================================================
criterion                     likelihood   exact signals per example
============================  ===========  ===================================================
``nn.CrossEntropyLoss``,      categorical  positions not ignored x classes
``nn.NLLLoss``, ``F.*``
``nn.MSELoss``                gaussian     output components
``nn.BCEWithLogitsLoss``      bernoulli    output units
============================  ===========  ===================================================

Register another with :func:`register_likelihood` (see :mod:`ewc.likelihoods.registry` for what
a :class:`Likelihood` owes). Every module of this package is imported here, so a new likelihood
is one new file plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil

from ewc.likelihoods.registry import (
    LazySignals,
    Likelihood,
    likelihood_for,
    register_likelihood,
    registered_criteria,
)

__all__ = [
    "LazySignals",
    "Likelihood",
    "likelihood_for",
    "register_likelihood",
    "registered_criteria",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
