"""Per-example squared-gradient engine.

One entry point, :func:`squared_grad_sums`: for one forward pass and ``K`` backward signals on the
model output (a tensor or a lazy :class:`SignalSource`, read in chunks) it returns, per
parameter, ``sum_k sum_n (d <s_k[n], out[n]> / d theta)^2`` — the sum over examples ``n`` of
squared *per-example* gradients — without a Python loop over examples wherever a faster path
applies: closed-form layer rules (:mod:`ewc._per_sample.rules`, public as :mod:`ewc.rules`),
per-example sums over every use of a shared or tied parameter, the per-layer ``torch.func`` step
for modules without a rule (:mod:`ewc._per_sample.layerwise`), then a whole-model
``torch.func.vmap``, then a per-example loop (:mod:`ewc._per_sample.fallback`).
"""

from __future__ import annotations

from ewc._per_sample import rules
from ewc._per_sample.engine import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    SquaredGradSums,
    squared_grad_sums,
)
from ewc._per_sample.report import fallback_message, warn_fallbacks
from ewc._per_sample.rules.registry import register_rule
from ewc._per_sample.signals import SignalSource, TensorSignals, as_source

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "SignalSource",
    "SquaredGradSums",
    "TensorSignals",
    "as_source",
    "fallback_message",
    "register_rule",
    "rules",
    "squared_grad_sums",
    "warn_fallbacks",
]
