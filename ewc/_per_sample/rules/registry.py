"""The layer-rule registry: one rule per module type, registered once.

A rule computes, for one call of a module, the sum over examples and backward signals of squared
per-example parameter gradients from the module's captured inputs and the gradients with respect
to its output, without autograd through the weight-gradient kernels.

A rule outside the package (a user's layer) is one call of the public :func:`ewc.register_rule`
(see :mod:`ewc.rules`); a rule shipped with the package is one file here, imported from
``ewc/_per_sample/rules/__init__.py``, plus its test. Modules without a rule are not lost to a
whole-model fallback: the engine runs a per-layer ``torch.func`` step on them (see
:mod:`ewc._per_sample.layerwise`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ewc._typing import TensorDict

__all__ = [
    "MATCHERS",
    "RULES",
    "BindFn",
    "LayerRule",
    "MatchFn",
    "PerExampleFn",
    "RuleFn",
    "SupportsFn",
    "accumulator_dtype",
    "chunk_size",
    "register_rule",
    "rule_for",
    "set_per_example",
    "single_batched_input",
]

RuleFn = Callable[[nn.Module, tuple[Tensor, ...], Tensor, Collection[str], int], TensorDict]
"""``rule(module, inputs, grad_outputs, names, memory_budget_bytes) -> {local name: sum}``.

``inputs`` are the module's positional inputs (detached), ``grad_outputs`` has shape
``(K, n, *output.shape[1:])``: the gradient of each of ``K`` signals with respect to the module
output. The result holds, for every local parameter name in ``names`` (``"weight"``, ``"bias"``),
``sum_k sum_n (d <s_k, out> / d theta_n)^2`` in the accumulator dtype (see
:func:`accumulator_dtype`).

The result must be fresh tensors (the engine accumulates into them), and ``grad_outputs`` must be
read only: it lives in a buffer that the next chunk of signals (and the next batch) overwrites,
and it may be a non-contiguous view (always, for a rule registered with ``examples_first``).
"""

PerExampleFn = Callable[[nn.Module, tuple[Any, ...], Tensor, Collection[str]], TensorDict]
"""``per_example(module, inputs, grad_outputs, names) -> {local name: (K, c, *param.shape)}``.

The per-example gradients themselves, for ``c`` examples (``inputs`` and ``grad_outputs`` cut to
those examples; an input broadcast along dim 0 stays as it is). The engine asks for them when a
parameter has several uses (a module called twice, tied weights), whose contributions must be
summed per example *before* squaring; it sizes ``c`` to the memory budget. Optional: without it
the engine differentiates the module call with ``torch.func`` (the per-layer step).
"""

MatchFn = Callable[[nn.Module], bool]
"""``matches(module) -> bool``: structural match for a rule registered without importing the
module's class (Hugging Face's ``Conv1D``)."""

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
        per_example: per-example gradients (see :data:`PerExampleFn`), or None.
        broadcast: the rule accepts a call whose input and output have size 1 along dim 0,
            broadcast against the batch later (position ids ``(1, L)``); the engine then hands the
            rest of the model that output expanded to the batch size, so that each example gets
            its own output gradient.
        name: the name in the reported path (default: the module type's name).
        examples_first: the rule reads ``grad_outputs`` one example at a time (per-example
            matmuls over all ``K`` signals): the engine then hands it ``(K, n, ...)`` as a
            transposed view of an ``(n, K, ...)`` buffer, so each example's signals are one
            contiguous block and the rule needs no copy to batch them.
    """

    module_type: type[nn.Module] | None
    compute: RuleFn
    supports: SupportsFn
    bind: BindFn = positional_only
    owns_children: bool = False
    tuple_output: bool = False
    per_example: PerExampleFn | None = None
    broadcast: bool = False
    name: str = ""
    examples_first: bool = False

    @property
    def path(self) -> str:
        """The path name reported per parameter, e.g. ``"rule:Linear"``."""
        name = self.name or (self.module_type.__name__ if self.module_type else "?")
        return f"rule:{name}"


RULES: dict[type[nn.Module], LayerRule] = {}
"""Registered rules by exact module type (a subclass may override ``forward``, so it gets none)."""

MATCHERS: list[tuple[MatchFn, LayerRule]] = []
"""Rules matched by structure, tried in registration order after :data:`RULES`."""


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
    per_example: PerExampleFn | None = None,
    broadcast: bool = False,
    matches: MatchFn | None = None,
    name: str = "",
    examples_first: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``rule`` for each of ``module_types`` (exact types), or for every
    module that ``matches`` (a structural match, when the class cannot be imported).

    Args:
        module_types: the ``nn.Module`` classes the rule computes.
        supports: a per-call check; default: the first input is a tensor with at least 2 dims whose
            dim 0 is the batch size.
        bind, owns_children, tuple_output, per_example, broadcast, examples_first: see
            :class:`LayerRule`.
        matches: instead of ``module_types``, a predicate on the module.
        name: the path name for a ``matches`` rule (``"rule:<name>"``).

    Raises:
        ValueError: a type is not an ``nn.Module`` subclass or already has a rule, or neither
            (or both of) ``module_types`` and ``matches`` are given.

    Example:
        >>> @register_rule(MyLayer)  # doctest: +SKIP
        ... def my_layer(module, inputs, grad_outputs, names, budget): ...
    """
    if matches is not None:
        if module_types:
            raise ValueError("register_rule takes module types or `matches`, not both")
        if not callable(matches) or not name:
            raise ValueError(
                f"Expected argument `matches` to be a callable with a `name` but got "
                f"matches={matches!r}, name={name!r}"
            )

        def decorate_match(rule: RuleFn) -> RuleFn:
            if any(existing.name == name for _, existing in MATCHERS):
                raise ValueError(f"a per-example rule named {name!r} is already registered")
            layer_rule = LayerRule(
                None,
                rule,
                supports or _batched_along_dim0,
                bind,
                owns_children,
                tuple_output,
                per_example,
                broadcast,
                name,
                examples_first=examples_first,
            )
            MATCHERS.append((matches, layer_rule))
            return rule

        return decorate_match
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
                per_example,
                broadcast,
                examples_first=examples_first,
            )
        return rule

    return decorate


def set_per_example(module_type: type[nn.Module], per_example: PerExampleFn) -> None:
    """Attach per-example gradients to the rule already registered for ``module_type``."""
    RULES[module_type] = replace(RULES[module_type], per_example=per_example)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` exactly, else the first structural match, or
    None."""
    rule = RULES.get(type(module))
    if rule is not None:
        return rule
    for matches, candidate in MATCHERS:
        if matches(module):
            return candidate
    return None


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or wider when the parameter is wider (float64): the dtype sums are kept in."""
    return torch.promote_types(dtype, torch.float32)


def chunk_size(total: int, bytes_per_item: int, memory_budget_bytes: int) -> int:
    """How many of ``total`` items fit the budget at ``bytes_per_item`` each (at least 1)."""
    return max(1, min(total, memory_budget_bytes // max(1, bytes_per_item)))
