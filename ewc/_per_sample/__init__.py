"""Per-example squared-gradient engine.

One entry point, :func:`squared_grad_sums`: for one forward pass and ``K`` backward signals on the
model output it returns, per parameter, ``sum_k sum_n (d <s_k[n], out[n]> / d theta)^2`` — the
sum over examples ``n`` of squared *per-example* gradients — without a Python loop over examples
wherever a faster path applies: closed-form layer rules (:mod:`ewc._per_sample.rules`), then
``torch.func.vmap``, then a per-example loop.
"""

from __future__ import annotations

from ewc._per_sample import rules
from ewc._per_sample.engine import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    SquaredGradSums,
    squared_grad_sums,
)
from ewc._per_sample.rules.registry import register_rule

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "SquaredGradSums",
    "register_rule",
    "rules",
    "squared_grad_sums",
]
