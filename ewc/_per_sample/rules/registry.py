"""The layer-rule registry: one rule per module type, registered once.

A rule computes, for one call of a module, the sum over examples and backward signals of squared
per-example parameter gradients from the module's captured inputs and the gradients with respect
to its output, without autograd through the weight-gradient kernels.

Adding a layer touches one place: a new file in this package with a function decorated by
:func:`register_rule`, imported from ``ewc/_per_sample/rules/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ewc._typing import TensorDict

__all__ = [
    "RULES",
    "BindFn",
    "LayerRule",
    "RuleFn",
    "SupportsFn",
    "accumulator_dtype",
    "chunk_size",
    "register_rule",
    "rule_for",
    "single_batched_input",
]

RuleFn = Callable[[nn.Module, tuple[Tensor, ...], Tensor, Collection[str], int], TensorDict]
"""``rule(module, inputs, grad_outputs, names, memory_budget_bytes) -> {local name: sum}``.

``inputs`` are the module's positional inputs (detached), ``grad_outputs`` has shape
``(K, n, *output.shape[1:])``: the gradient of each of ``K`` signals with respect to the module
output. The result holds, for every local parameter name in ``names`` (``"weight"``, ``"bias"``),
``sum_k sum_n (d <s_k, out> / d theta_n)^2`` in the accumulator dtype (see
:func:`accumulator_dtype`).
"""

SupportsFn = Callable[[nn.Module, tuple[Tensor, ...], int], bool]
"""``supports(module, inputs, batch_size) -> bool``: whether the rule's assumptions hold for this
call (batched input along dim 0, eval-mode statistics, no per-batch gradient rescaling, ...)."""


BindFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], "tuple[Any, ...] | None"]
"""``bind(module, args, kwargs) -> inputs``: the call's arguments as the ``inputs`` tuple that
``supports`` and ``compute`` receive, or None when the rule cannot take this call. The default
takes positional arguments only."""


def positional_only(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The default :data:`BindFn`: the positional arguments; None if there are keywords."""
    return None if kwargs else args


@dataclass(frozen=True)
class LayerRule:
    """A registered rule: the computation and the check that it applies to one call.

    Attributes:
        bind: maps a call's arguments to the rule's ``inputs`` (see :data:`BindFn`).
        owns_children: the rule also computes the parameters of the module's children, which
            the module uses directly instead of calling them (``MultiheadAttention.out_proj``);
            their local names are dotted (``"out_proj.weight"``).
        tuple_output: the module returns a tuple whose first item is the output the rule is
            about (``MultiheadAttention`` returns ``(output, weights)``).
    """

    module_type: type[nn.Module]
    compute: RuleFn
    supports: SupportsFn
    bind: BindFn = positional_only
    owns_children: bool = False
    tuple_output: bool = False

    @property
    def path(self) -> str:
        """The path name reported per parameter, e.g. ``"rule:Linear"``."""
        return f"rule:{self.module_type.__name__}"


RULES: dict[type[nn.Module], LayerRule] = {}
"""Registered rules by exact module type (a subclass may override ``forward``, so it gets none)."""


def single_batched_input(inputs: tuple[Tensor, ...], batch_size: int, min_dim: int) -> bool:
    """One tensor input of rank >= ``min_dim`` with the examples along dim 0 (a rule's common
    precondition)."""
    return (
        len(inputs) == 1
        and isinstance(inputs[0], Tensor)
        and inputs[0].dim() >= min_dim
        and inputs[0].shape[0] == batch_size
    )


def _batched_along_dim0(module: nn.Module, inputs: tuple[Tensor, ...], batch_size: int) -> bool:
    return (
        len(inputs) >= 1
        and isinstance(inputs[0], Tensor)
        and inputs[0].dim() >= 2
        and inputs[0].shape[0] == batch_size
    )


def register_rule(
    *module_types: type[nn.Module],
    supports: SupportsFn | None = None,
    bind: BindFn = positional_only,
    owns_children: bool = False,
    tuple_output: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``rule`` for each of ``module_types`` (exact types).

    Args:
        module_types: the ``nn.Module`` classes the rule computes.
        supports: a per-call check; default: the first input is a tensor with at least 2 dims whose
            dim 0 is the batch size.
        bind, owns_children, tuple_output: see :class:`LayerRule`.

    Raises:
        ValueError: a type is not an ``nn.Module`` subclass or already has a rule.

    Example:
        >>> @register_rule(MyLayer)  # doctest: +SKIP
        ... def my_layer(module, inputs, grad_outputs, names, budget): ...
    """
    if not module_types:
        raise ValueError("register_rule needs at least one module type; got none")
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise ValueError(
                f"Expected argument `module_types` to hold nn.Module subclasses but got "
                f"{module_type!r}"
            )
        if module_type in RULES:
            raise ValueError(
                f"a per-example rule for {module_type.__name__} is already registered "
                f"({RULES[module_type].compute.__qualname__}); registering twice is an error"
            )

    def decorate(rule: RuleFn) -> RuleFn:
        for module_type in module_types:
            if module_type in RULES:
                raise ValueError(
                    f"a per-example rule for {module_type.__name__} is already registered"
                )
            RULES[module_type] = LayerRule(
                module_type,
                rule,
                supports or _batched_along_dim0,
                bind,
                owns_children,
                tuple_output,
            )
        return rule

    return decorate


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` exactly, or None."""
    return RULES.get(type(module))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or wider when the parameter is wider (float64): the dtype sums are kept in."""
    return torch.promote_types(dtype, torch.float32)


def chunk_size(total: int, bytes_per_item: int, memory_budget_bytes: int) -> int:
    """How many of ``total`` items fit the budget at ``bytes_per_item`` each (at least 1)."""
    return max(1, min(total, memory_budget_bytes // max(1, bytes_per_item)))
