"""The public layer-rule registry of the per-example Fisher engine.

A *layer rule* tells the engine how to get, for one call of a module type, the sum over examples
``n`` and backward signals ``k`` of squared per-example parameter gradients,
``sum_k sum_n (d <s_k, out_n> / d theta)^2``, from what a forward hook sees (the call's inputs)
and the gradients of the signals with respect to the call's output, without running the
weight-gradient kernels and without a loop over examples.

The contract of a rule ``rule(module, inputs, grad_outputs, names, memory_budget_bytes)``:

* ``inputs``: the call's positional arguments, detached (or what ``bind`` makes of the call);
* ``grad_outputs``: ``(K, n, *output.shape[1:])``, the gradient of each of ``K`` signals with
  respect to the module's output, example ``n`` along dim 1;
* ``names``: the local parameter names wanted (``"weight"``, ``"bias"``);
* return ``{local name: tensor of the parameter's shape}`` in :func:`accumulator_dtype`, fresh
  tensors (the engine accumulates into them), without an autograd graph;
* materialise at most ``memory_budget_bytes`` of per-example tensors (chunk with
  :func:`chunk_size`);
* ``supports(module, inputs, batch_size)`` says whether the rule's assumptions hold for this call
  (examples along dim 0, eval-mode statistics, ...); a call it refuses goes to the per-layer
  ``torch.func`` step on that module, not to a whole-model fallback;
* optionally ``per_example(module, inputs, grad_outputs, names) -> {name: (K, c, *shape)}`` for
  ``c`` examples, used when a parameter has several uses (a module called twice, tied weights),
  whose per-example gradients are summed before squaring.

The engine checks every call: a module called more than once, a parameter also used outside the
module, an input modified in place, or an output not batched along dim 0 never silently takes the
rule. A module type without a rule is not lost either: its own parameters get the per-layer
``torch.func`` step (per-example ``vjp`` of that module's call alone). A rule is a speed-up; every
path is checked against a brute-force per-example autograd loop in the package's tests, and a new
rule should be too (``tests/reference.py``).

Example: a layer ``y = x * w`` (elementwise, ``w`` of shape ``(d,)``) on inputs ``(n, d)``. Per
example ``dw_kn = g_kn * x_n``, so the sum of squares is ``sum_k sum_n g_kn^2 x_n^2``:

    >>> import torch
    >>> from torch import nn
    >>> import ewc
    >>> class Gain(nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * self.w
    >>> @ewc.register_rule(Gain)
    ... def gain_rule(module, inputs, grad_outputs, names, memory_budget_bytes):
    ...     (x,) = inputs
    ...     g = grad_outputs.to(ewc.rules.accumulator_dtype(x.dtype))
    ...     return {"w": (g.square() * x.square()).sum((0, 1))}
    >>> ewc.rules.rule_for(Gain(3)).path
    'rule:Gain'
"""

from __future__ import annotations

from ewc._per_sample.rules.linear import linear_squared_sums
from ewc._per_sample.rules.registry import (
    BindFn,
    LayerRule,
    MatchFn,
    PerExampleFn,
    RuleFn,
    SupportsFn,
    accumulator_dtype,
    chunk_size,
    register_rule,
    rule_for,
    single_batched_input,
)

__all__ = [
    "BindFn",
    "LayerRule",
    "MatchFn",
    "PerExampleFn",
    "RuleFn",
    "SupportsFn",
    "accumulator_dtype",
    "chunk_size",
    "linear_squared_sums",
    "register_rule",
    "rule_for",
    "single_batched_input",
]
