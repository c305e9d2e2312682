"""Per-layer rules for the sum of squared per-example gradients, one file per layer family.

Importing this package registers every rule in :data:`RULES`.
"""

from __future__ import annotations

from ewc._per_sample.rules import attention, conv, embedding, linear, norm, transposed_linear
from ewc._per_sample.rules.registry import RULES, LayerRule, register_rule, rule_for

__all__ = [
    "RULES",
    "LayerRule",
    "attention",
    "conv",
    "embedding",
    "linear",
    "norm",
    "register_rule",
    "rule_for",
    "transposed_linear",
]
