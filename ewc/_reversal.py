"""EWC-DR's two changes to the importance (Liu & Chang, CVPR 2026): the checks and the clamp.

"Elastic Weight Consolidation Done Right for Continual Learning" (arXiv 2603.18596) observes that
the gradient of the cross-entropy vanishes on confidently classified examples (``1 - p_y -> 0``),
so EWC's importance misses exactly the weights the old task relies on most. Two changes:

* **Logits reversal**: the importance is computed from the loss on the negated output,
  ``loss(-f(x), y)`` with the data's labels, instead of ``loss(f(x), y)``. With ``empirical`` the
  per-example term becomes ``(grad loss(-f(x), y))^2``; with ``batched`` (the published code's
  form) the per-batch term becomes ``(grad criterion(-f(X), Y))^2``.
  :func:`ewc.fisher.fisher_sums` (``logits_reversal=True``) negates the output of the Fisher
  pass's ``forward``, so every engine path and rule applies unchanged: the negation is one more
  differentiable op on the output. ``exact`` and ``sample`` refuse it (:class:`ewc.EWC` already
  at construction, with :func:`check_logits_reversal`): they take expectations under the
  model's own ``p(c|x)``, and "the Fisher of the reversed model" (``softmax(-z)``) is a
  different quantity that the paper neither defines nor evaluates.
* **Importance clamp**: every entry of a task's importance is clamped at ``max_importance``
  before the task is folded into the state (:func:`clamped`), as the published code clamps each
  task's importance (at 1e-4, a value tied to its ResNet-18 / CIFAR-100 scale). In online mode the
  clamp applies to each new task's Fisher, not to the decayed running sum.

Neither option changes what a stored quadratic means, so neither is saved in ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "REVERSIBLE_ESTIMATORS",
    "check_logits_reversal",
    "check_max_importance",
    "clamped",
]

REVERSIBLE_ESTIMATORS = ("empirical", "batched")


def check_logits_reversal(value: Any, estimator: str) -> bool:
    """``logits_reversal`` validated against the estimator; returns it.

    Raises:
        TypeError: not a bool.
        ValueError: True with an estimator other than ``empirical``/``batched``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `logits_reversal` to be a bool but got {value!r}")
    if value and estimator not in REVERSIBLE_ESTIMATORS:
        raise ValueError(
            f"Argument `logits_reversal=True` needs fisher in {REVERSIBLE_ESTIMATORS} (EWC-DR "
            f"squares gradients of the loss on -logits with the data's labels) but got "
            f"fisher={estimator!r}; exact/sample take expectations under the model's own "
            "p(c|x), for which the reversal has no published definition"
        )
    return value


def check_max_importance(value: Any) -> float | None:
    """``max_importance`` validated: None, or a finite float > 0.

    Raises:
        TypeError: neither None nor a real number.
        ValueError: not finite or not > 0.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Expected argument `max_importance` to be None or a float but got {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"Expected argument `max_importance` to be finite and > 0 but got {value!r}"
        )
    return float(value)


def clamped(fisher: Mapping[str, Tensor], max_importance: float | None) -> dict[str, Tensor]:
    """Every entry of ``fisher`` clamped at ``max_importance`` (new tensors; None: as given).

    Cost: O(P).
    """
    if max_importance is None:
        return dict(fisher)
    return {name: value.clamp(max=max_importance) for name, value in fisher.items()}
