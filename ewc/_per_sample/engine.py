"""Orchestration of the per-example squared-gradient paths.

Paths, fastest first:

* ``vmap``: ``torch.func.vmap`` over examples of a ``vjp`` through ``functional_call``, in chunks
  whose per-example gradients fit ``memory_budget_bytes``. Works for any module written with
  functional tensor ops.
* ``loop``: a Python loop over examples with ``torch.autograd.grad``, when ``vmap`` fails
  (in-place ops on captured tensors, data-dependent control flow, custom autograd functions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from ewc._per_sample.batching import slice_examples, vmap_in_dims
from ewc._typing import TensorDict

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "SquaredGradSums", "squared_grad_sums"]

logger = logging.getLogger("ewc")

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
"""Budget for materialised per-example gradients on the fallback paths (chunks are sized to it)."""

RunModel = Callable[[nn.Module, Any], tuple[Tensor, Any]]
"""``forward(model, batch) -> (output, target)``, examples along dim 0 of the output."""
MakeSignals = Callable[[Tensor, Any], Tensor]
"""``make_signals(output, target) -> (K, *output.shape)`` backward signals."""


@dataclass
class SquaredGradSums:
    """Result of :func:`squared_grad_sums` for one batch.

    Attributes:
        sums: per parameter, ``sum_k sum_n g_{k,n}^2`` in float32 (float64 for float64 params).
        examples: ``n``, the number of examples in the batch.
        signals: ``k``, the number of backward signals per example.
        paths: per parameter name, the path that computed it (``"vmap"``, ``"loop"``, a rule).
    """

    sums: TensorDict
    examples: int
    signals: int
    paths: dict[str, str] = field(default_factory=dict)


class _Runner(nn.Module):
    """Wraps ``run_model(model, batch)`` as a module so ``functional_call`` can drive it."""

    def __init__(self, model: nn.Module, run_model: RunModel) -> None:
        super().__init__()
        self.model = model
        self.run_model = run_model

    def forward(self, batch: Any) -> Tensor:
        output, _ = self.run_model(self.model, batch)
        return output


def _accumulator_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


def squared_grad_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    make_signals: MakeSignals,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> SquaredGradSums:
    """Sum over examples and signals of squared per-example gradients, for every ``params`` entry.

    ``run_model(model, batch)`` returns ``(output, target)`` with examples along dim 0 of the
    output; ``make_signals(output, target)`` maps the (detached) output of shape ``(n, ...)`` to
    ``K`` backward signals of shape ``(K, n, ...)``. The per-example gradient for signal ``k`` and example ``n`` is
    ``d <signals[k, n], output[n]> / d theta``. Examples must not interact (eval mode).

    Cost: one forward to build the signals, then on the ``vmap`` path ``K`` vector-Jacobian
    products per example, batched; memory O(chunk * K * P) with the chunk sized to the budget.
    """
    with torch.no_grad():
        output, target = run_model(model, batch)
    examples = int(output.shape[0])
    signals = make_signals(output.detach(), target)
    names = list(params)
    try:
        sums = _vmap_sums(model, params, batch, run_model, signals, memory_budget_bytes)
        path = "vmap"
    except Exception as error:  # vmap cannot run this model: fall back to the example loop
        logger.debug("ewc: vmap path failed (%s); using the per-example loop", error)
        sums = _loop_sums(model, params, batch, run_model, signals)
        path = "loop"
    return SquaredGradSums(sums, examples, int(signals.shape[0]), dict.fromkeys(names, path))


def _vmap_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: Tensor,
    memory_budget_bytes: int,
) -> TensorDict:
    runner = _Runner(model, run_model)
    names = list(params)
    values = tuple(params[name].detach() for name in names)
    examples, count = int(signals.shape[1]), int(signals.shape[0])
    bytes_per_example = count * sum(v.numel() * v.element_size() for v in values) * 2
    chunk = max(1, min(examples, memory_budget_bytes // max(1, bytes_per_example)))

    def output_of(param_values: tuple[Tensor, ...], example: Any) -> Tensor:
        one = pytree.tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, example)
        bound = {f"model.{name}": value for name, value in zip(names, param_values)}
        return functional_call(runner, bound, (one,), strict=False)

    def squared_for_example(example: Any, example_signals: Tensor) -> tuple[Tensor, ...]:
        _, pullback = vjp(lambda *vals: output_of(vals, example), *values)
        grads = vmap(pullback)(example_signals.unsqueeze(1))
        return tuple(g.to(_accumulator_dtype(g)).square().sum(0) for g in grads)

    sums = [torch.zeros(v.shape, dtype=_accumulator_dtype(v), device=v.device) for v in values]
    for start in range(0, examples, chunk):
        stop = min(examples, start + chunk)
        part = slice_examples(batch, start, stop, examples)
        in_dims = (vmap_in_dims(part, stop - start), 1)
        squared = vmap(squared_for_example, in_dims=in_dims)(part, signals[:, start:stop])
        for total, term in zip(sums, squared):
            total.add_(term.sum(0))
    return dict(zip(names, sums))


def _loop_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: Tensor,
) -> TensorDict:
    names = list(params)
    values = [params[name] for name in names]
    sums = [torch.zeros(v.shape, dtype=_accumulator_dtype(v), device=v.device) for v in values]
    examples, count = int(signals.shape[1]), int(signals.shape[0])
    for n in range(examples):
        with torch.enable_grad():
            output, _ = run_model(model, slice_examples(batch, n, n + 1, examples))
            for k in range(count):
                grads = torch.autograd.grad(
                    output,
                    values,
                    grad_outputs=signals[k, n : n + 1].to(output.dtype),
                    retain_graph=k < count - 1,
                    allow_unused=True,
                )
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total.add_(grad.to(total.dtype).square())
    return dict(zip(names, sums))
