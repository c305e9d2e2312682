"""Type aliases shared by the core modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "Criterion",
    "FisherEstimator",
    "ForwardFn",
    "Mode",
    "ParamSelector",
    "TensorDict",
    "present",
    "short_repr",
]

TensorDict = dict[str, Tensor]
"""Per-parameter tensors keyed by the parameter's name in ``model.named_parameters()``."""

Batch = Any
"""Whatever the dataloader yields: by default ``(inputs, targets, *ignored)``."""

ForwardFn = Callable[[nn.Module, Batch], tuple[Tensor, Any]]
"""``forward(model, batch) -> (output, target)``: maps any batch layout to model output + target."""

Criterion = Callable[..., Tensor]
"""A loss ``criterion(output, target) -> scalar``, e.g. ``nn.CrossEntropyLoss()``."""

Mode = Literal["separate", "online"]
FisherEstimator = Literal["exact", "sample", "empirical", "batched"]

ParamSelector = Union[None, Iterable[str], Callable[[str, torch.nn.Parameter], bool]]  # noqa: UP007
"""Which parameters to regularise: all trainable ones, named ones, or those a predicate keeps."""


_T = TypeVar("_T")


def present(value: _T | None, what: str) -> _T:
    """``value``, which an internal invariant guarantees is not None.

    A ``RuntimeError`` naming ``what`` if it is (a bug in ewc, not a user error); unlike
    ``assert``, the check survives ``python -O``."""
    if value is None:
        raise RuntimeError(f"ewc internal error: {what} is None; please report this")
    return value


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, for error messages that name a value."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
