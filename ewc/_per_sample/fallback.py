"""Generic paths for parameters no layer rule covers.

* ``vmap``: ``torch.func.vmap`` over examples of a ``vjp`` through ``functional_call``, in chunks
  whose per-example gradients fit ``memory_budget_bytes``. Works for any module written with
  functional tensor ops. Cost: one forward and ``K`` vector-Jacobian products per example,
  batched; memory ``O(chunk * K * P_fallback)`` with ``chunk * K * P_fallback * 2 * itemsize``
  kept under the budget.
* ``loop``: a Python loop over examples with ``torch.autograd.grad``, when ``vmap`` fails
  (in-place ops on captured tensors, data-dependent control flow, custom autograd functions).
  Cost: ``n`` forwards and ``n K`` backwards; memory ``O(P_fallback)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from ewc._per_sample.batching import slice_examples
from ewc._per_sample.rules.registry import accumulator_dtype, chunk_size
from ewc._per_sample.signals import SignalSource, as_source
from ewc._typing import TensorDict

__all__ = ["RunModel", "loop_sums", "vmap_sums"]

_SLOW_BATCHING_NOTICE = "There is a performance drop because we have not yet implemented"

RunModel = Callable[[nn.Module, Any], tuple[Tensor, Any]]
"""``forward(model, batch) -> (output, target)``, examples along dim 0 of the output."""


class _Runner(nn.Module):
    """Wraps ``run_model(model, batch)`` as a module so ``functional_call`` can drive it."""

    def __init__(self, model: nn.Module, run_model: RunModel) -> None:
        super().__init__()
        self.model = model
        self.run_model = run_model

    def forward(self, batch: Any) -> Tensor:
        output, _ = self.run_model(self.model, batch)
        return output


def vmap_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: Tensor | SignalSource,
    memory_budget_bytes: int,
) -> TensorDict:
    """``sum_k sum_n g_kn^2`` for ``params`` with ``vmap`` over examples (other params fixed).

    Runs under ``torch.no_grad()`` (``torch.func`` transforms ignore it inside): the other
    parameters still require grad, and without it the results would carry an autograd graph
    back to them.

    Args:
        model: the model; parameters not in ``params`` are used as they are.
        params: the parameters to differentiate, by their name in ``model``.
        batch: the batch ``run_model`` reads.
        run_model: ``run_model(model, batch) -> (output, target)``.
        signals: ``(K, n, *output.shape[1:])`` backward signals, or a source of them; read in
            chunks of signals sized to the budget.
        memory_budget_bytes: bound on the per-example gradients of one chunk.

    Raises:
        Exception: whatever ``vmap`` raises when the model cannot be vectorised.
    """
    source = as_source(signals)
    runner = _Runner(model, run_model)
    names = list(params)
    values = tuple(params[name].detach() for name in names)
    count = len(source)
    first = source.chunk(0, 1)
    examples = int(first.shape[1])
    signal_bytes = first.numel() * first.element_size()
    param_bytes = sum(v.numel() * v.element_size() for v in values) * 2
    k_step = chunk_size(count, signal_bytes + examples * param_bytes, memory_budget_bytes)
    chunk = chunk_size(examples, k_step * param_bytes, memory_budget_bytes)
    del first

    # Which leaves carry the examples is decided on the whole batch, so that a tensor shared by
    # all examples (a broadcast mask) is never cut or given a batch dimension of its own.
    flat, spec = pytree.tree_flatten(batch)
    batched = [
        i
        for i, leaf in enumerate(flat)
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == examples
    ]

    def output_of(param_values: tuple[Tensor, ...], example: tuple[Tensor, ...]) -> Tensor:
        leaves = list(flat)
        for i, tensor in zip(batched, example):
            leaves[i] = tensor.unsqueeze(0)
        one = pytree.tree_unflatten(leaves, spec)
        bound = {f"model.{name}": value for name, value in zip(names, param_values)}
        return functional_call(runner, bound, (one,), strict=False)

    def squared_for_example(example: tuple[Tensor, ...], example_signals: Tensor) -> Any:
        pullback = vjp(lambda *vals: output_of(vals, example), *values)[1]
        grads = vmap(pullback)(example_signals.unsqueeze(1))
        return tuple(g.to(accumulator_dtype(g.dtype)).square().sum(0) for g in grads)

    sums = [v.new_zeros(v.shape, dtype=accumulator_dtype(v.dtype)) for v in values]
    for k0 in range(0, count, k_step):
        part_signals = source.chunk(k0, min(count, k0 + k_step))
        for start in range(0, examples, chunk):
            stop = min(examples, start + chunk)
            part = tuple(flat[i][start:stop] for i in batched)
            with warnings.catch_warnings(), torch.no_grad():
                # functorch's notice that an op (e.g. attention's backward) is batched by a loop
                # inside vmap: expected here, and the report already names this path ("vmap")
                warnings.filterwarnings("ignore", message=_SLOW_BATCHING_NOTICE)
                squared = vmap(squared_for_example, in_dims=(0, 1))(
                    part, part_signals[:, start:stop]
                )
            for total, term in zip(sums, squared):
                total.add_(term.sum(0))
    return dict(zip(names, sums))


def loop_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: Tensor | SignalSource,
    memory_budget_bytes: int | None = None,
) -> TensorDict:
    """``sum_k sum_n g_kn^2`` for ``params`` with one forward and ``K`` backwards per example.

    Signals are read in chunks sized to ``memory_budget_bytes`` (one forward per example and
    chunk); the gradients never carry a graph (``torch.autograd.grad`` without
    ``create_graph``).
    """
    source = as_source(signals)
    names = list(params)
    values = [params[name] for name in names]
    sums = [v.new_zeros(v.shape, dtype=accumulator_dtype(v.dtype)) for v in values]
    count = len(source)
    first = source.chunk(0, 1)
    examples = int(first.shape[1])
    budget = memory_budget_bytes or count * first.numel() * first.element_size()
    k_step = chunk_size(count, first.numel() * first.element_size(), budget)
    del first
    for k0 in range(0, count, k_step):
        part = source.chunk(k0, min(count, k0 + k_step))
        kc = int(part.shape[0])
        for n in range(examples):
            with torch.enable_grad():
                output, _ = run_model(model, slice_examples(batch, n, n + 1, examples))
                if not output.requires_grad:
                    continue
                for k in range(kc):
                    grads = torch.autograd.grad(
                        output,
                        values,
                        grad_outputs=part[k, n : n + 1].to(output.dtype),
                        retain_graph=k < kc - 1,
                        allow_unused=True,
                    )
                    for total, grad in zip(sums, grads):
                        if grad is not None:
                            total.add_(grad.detach().to(total.dtype).square())
    return dict(zip(names, sums))
