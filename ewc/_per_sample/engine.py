"""Orchestration of the per-example squared-gradient paths.

Paths, fastest first:

* ``rule:<Layer>``: one forward with hooks on the modules that have a layer rule (see
  :mod:`ewc._per_sample.rules`), then the ``K`` backward signals are propagated to those modules'
  *outputs only* (``torch.autograd.grad`` w.r.t. the captured outputs, batched over signals with
  ``is_grads_batched``), never through the weight-gradient kernels; each rule turns (inputs,
  output gradients) into the sum of squared per-example gradients in closed form where one exists.
* ``vmap``: for the parameters no rule covers, ``torch.func.vmap`` over examples of a ``vjp``
  through ``functional_call``, restricted to those parameters, in budget-sized chunks.
* ``loop``: a per-example ``torch.autograd.grad`` loop when ``vmap`` fails.

Memory: the rule path keeps what an ordinary forward/backward keeps (the activations) plus one
copy of each covered module's output, the output gradients of a chunk of signals (chunk sized so
that ``signals_in_chunk * sum(covered output bytes) <= memory_budget_bytes``), and O(P) sums;
rules that materialise per-example gradients (sequence Linear, Conv) do so in chunks within the
same budget. The fallback paths size their example chunks to the budget too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ewc._per_sample.capture import Capture, CoveredCall, edges_into, plan_candidates, release
from ewc._per_sample.fallback import RunModel, loop_sums, vmap_sums
from ewc._per_sample.rules.registry import accumulator_dtype, chunk_size
from ewc._typing import TensorDict

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "MakeSignals",
    "RunModel",
    "SquaredGradSums",
    "squared_grad_sums",
]

logger = logging.getLogger("ewc")

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
"""Budget (bytes) for the tensors the engine materialises beyond an ordinary forward/backward:
per-example gradients on the fallback paths and in the chunked rules, and the batch of output
gradients of the signals on the rule path. Chunks are sized to it; one example (one signal) is
always processed even if it alone exceeds the budget."""

MakeSignals = Callable[[Tensor, Any], Tensor]
"""``make_signals(output, target) -> (K, *output.shape)`` backward signals."""


@dataclass
class SquaredGradSums:
    """Result of :func:`squared_grad_sums` for one batch.

    Attributes:
        sums: per parameter, ``sum_k sum_n g_{k,n}^2`` in float32 (float64 for float64 params).
        examples: ``n``, the number of examples in the batch.
        signals: ``k``, the number of backward signals per example.
        paths: per parameter name, the path that computed it (``"rule:Linear"``, ``"vmap"``,
            ``"loop"``).
    """

    sums: TensorDict
    examples: int
    signals: int
    paths: dict[str, str] = field(default_factory=dict)


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
    ``K`` backward signals of shape ``(K, n, ...)``. The per-example gradient for signal ``k`` and
    example ``n`` is ``g_kn = d <signals[k, n], output[n]> / d theta`` and the result is
    ``sum_k sum_n g_kn^2``. Examples must not interact (eval mode); a covered module's input and
    output must carry the examples along dim 0 (a module whose dim 0 is not the batch size is
    sent to the fallback, but a transposed layout whose leading size happens to equal the batch
    size cannot be told apart).

    Cost: one forward; the ``K`` signals backpropagated to the covered modules' outputs (about
    ``K`` input-gradient passes, no weight-gradient kernels); per covered module the rule (for
    ``nn.Linear`` on 2-D input one ``(o, n) @ (n, i)`` matmul whatever ``K``); for uncovered
    parameters the ``vmap`` fallback (``K`` VJPs per example) or the per-example loop.

    Args:
        model: the model, in the mode it should be evaluated in (eval for the Fisher).
        params: the parameters, by their name in ``model.named_parameters()``.
        batch: the batch, any pytree whose tensors carry examples along dim 0.
        run_model: ``run_model(model, batch) -> (output, target)``.
        make_signals: ``make_signals(output, target) -> (K, *output.shape)``.
        memory_budget_bytes: bound on the extra tensors materialised (see
            :data:`DEFAULT_MEMORY_BUDGET_BYTES`).

    Returns:
        A :class:`SquaredGradSums` with the sums and the path per parameter.

    Raises:
        ValueError: ``memory_budget_bytes`` is not a positive integer.
    """
    if (
        isinstance(memory_budget_bytes, bool)
        or not isinstance(memory_budget_bytes, int)
        or memory_budget_bytes <= 0
    ):
        raise ValueError(
            "Expected argument `memory_budget_bytes` to be a positive integer but got "
            f"{memory_budget_bytes!r}"
        )
    names = list(params)
    candidates = plan_candidates(model, params)
    capture = Capture(candidates)
    if candidates:
        with capture, torch.enable_grad():
            output, target = run_model(model, batch)
    else:
        with torch.no_grad():
            output, target = run_model(model, batch)
    examples = int(output.shape[0])
    signals = make_signals(output.detach(), target)
    count = int(signals.shape[0])

    sums: TensorDict = {}
    paths: dict[str, str] = {}
    try:
        # With the graph at hand (rule candidates ran the forward with autograd on), a requested
        # parameter with no edge into the output's graph has exactly zero per-example gradients:
        # e.g. the heads of other tasks in a multi-head model. No fallback pass is needed.
        edges = edges_into(output, {id(p) for p in params.values()}) if candidates else None
        if edges is not None:
            for name in names:
                if edges[id(params[name])] == 0:
                    param = params[name]
                    sums[name] = param.new_zeros(param.shape, dtype=accumulator_dtype(param.dtype))
                    paths[name] = "unused"
        covered, rejected = capture.covered(output, examples, edges) if candidates else ([], {})
        for module, reason in rejected.items():
            logger.debug("ewc: no per-example rule for %s: %s", module, reason)
        if covered:
            sums.update(_rule_sums(output, covered, signals, memory_budget_bytes))
            for call in covered:
                paths.update(dict.fromkeys(call.candidate.names.values(), call.candidate.rule.path))
    finally:
        release(candidates)
        del output
    remaining = {name: params[name] for name in names if name not in sums}
    if remaining:
        fallback, path = _fallback_sums(
            model, remaining, batch, run_model, signals, memory_budget_bytes
        )
        sums.update(fallback)
        paths.update(dict.fromkeys(remaining, path))
    if logger.isEnabledFor(logging.DEBUG):
        for name in names:
            logger.debug("ewc: squared gradients of %s via %s", name, paths[name])
    return SquaredGradSums({name: sums[name] for name in names}, examples, count, paths)


def _rule_sums(
    output: Tensor, covered: list[CoveredCall], signals: Tensor, memory_budget_bytes: int
) -> TensorDict:
    """Backpropagate the signals to the covered outputs in budget-sized chunks; apply the rules."""
    sums: TensorDict = {}
    if output.requires_grad:  # else nothing covered reaches the output: every gradient is zero
        _accumulate_rules(output, covered, signals, memory_budget_bytes, sums)
    for call in covered:
        for local, name in call.candidate.names.items():
            if name not in sums:  # the output does not depend on this module
                param = call.candidate.module.get_parameter(local)
                sums[name] = param.new_zeros(param.shape, dtype=accumulator_dtype(param.dtype))
    return sums


def _accumulate_rules(
    output: Tensor,
    covered: list[CoveredCall],
    signals: Tensor,
    memory_budget_bytes: int,
    sums: TensorDict,
) -> None:
    count = int(signals.shape[0])
    outputs = [call.output for call in covered]
    bytes_per_signal = sum(out.numel() * out.element_size() for out in outputs)
    step = chunk_size(count, bytes_per_signal, memory_budget_bytes)
    for start in range(0, count, step):
        chunk = signals[start : start + step].to(output.dtype)
        grads = _output_grads(output, outputs, chunk)
        for call, grad in zip(covered, grads):
            if grad is None:
                continue
            candidate = call.candidate
            terms = candidate.rule.compute(
                candidate.module, call.inputs, grad, candidate.names.keys(), memory_budget_bytes
            )
            for local, name in candidate.names.items():
                if name in sums:
                    sums[name].add_(terms[local])
                else:  # rules return fresh tensors: the first chunk's term is the accumulator
                    sums[name] = terms[local]
        del grads


def _output_grads(
    output: Tensor, targets: list[Tensor], signals: Tensor
) -> tuple[Tensor | None, ...]:
    """``d <signals[k], output> / d target`` for every target: ``(K, *target.shape)`` or None.

    One batched backward over the ``K`` signals (``is_grads_batched``); a loop over signals when
    an op on the way has no batching rule.
    """
    if signals.shape[0] > 1:
        try:
            return torch.autograd.grad(
                output,
                targets,
                grad_outputs=signals,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            logger.debug("ewc: batched backward over signals failed (%s); looping", error)
    per_signal = [
        torch.autograd.grad(
            output, targets, grad_outputs=signal, retain_graph=True, allow_unused=True
        )
        for signal in signals
    ]
    if len(per_signal) == 1:  # one signal (empirical): a view, not a stacked copy
        return tuple(None if grad is None else grad.unsqueeze(0) for grad in per_signal[0])
    return tuple(None if grads[0] is None else torch.stack(grads) for grads in zip(*per_signal))


def _fallback_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    run_model: RunModel,
    signals: Tensor,
    memory_budget_bytes: int,
) -> tuple[TensorDict, str]:
    """``vmap`` over examples for ``params``; the per-example loop if ``vmap`` cannot run."""
    try:
        return vmap_sums(model, params, batch, run_model, signals, memory_budget_bytes), "vmap"
    except Exception as error:  # vmap cannot run this model: fall back to the example loop
        logger.debug("ewc: vmap path failed (%s); using the per-example loop", error)
        return loop_sums(model, params, batch, run_model, signals), "loop"
