"""Bernoulli likelihood per output unit: ``nn.BCEWithLogitsLoss`` (multi-label heads).

``p(y_u = 1|x) = sigmoid(f_u(x))`` independently for every unit ``u`` of an example's output.

* exact: per unit, both labels weighted by their probability:
  ``sum_u sum_{l in {0,1}} p(l) (grad log p(l))^2 = sum_u s_u (1 - s_u) (grad f_u)^2``,
  ``s = sigmoid(f)``: one signal ``sqrt(s_u (1 - s_u)) e_u`` per unit (built lazily);
* sample: ``y_u ~ Bernoulli(s_u)``; one signal ``(s - y) / sqrt(m)`` per draw for all units;
* empirical: ``w (s (p_w y + 1 - y) - p_w y)`` per unit (``weight`` ``w``, ``pos_weight``
  ``p_w``), summed over the example's units whatever the ``reduction``.

Options: ``weight`` and ``pos_weight`` are honoured by ``empirical``/``batched`` and refused by
``exact``/``sample`` (they reweight the loss, not the model's predictive distribution).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.errors import ConsolidationError
from ewc.likelihoods.registry import LazySignals, Likelihood, register_likelihood, widened

__all__ = ["Bernoulli"]


class Bernoulli(Likelihood):
    """Independent Bernoulli labels on the logits ``f(x)``, one per output unit."""

    name = "bernoulli"

    def __init__(self, criterion: Any) -> None:
        super().__init__(criterion)
        self.weight: Tensor | None = getattr(criterion, "weight", None)
        self.pos_weight: Tensor | None = getattr(criterion, "pos_weight", None)

    def check_estimator(self, estimator: str) -> None:
        if estimator in ("exact", "sample"):
            why = (
                "it reweights the loss, not the model's predictive distribution; use "
                "fisher='empirical' or a criterion without it"
            )
            if self.weight is not None:
                self._refuse(estimator, "weight", self.weight, why)
            if self.pos_weight is not None:
                self._refuse(estimator, "pos_weight", self.pos_weight, why)

    def exact_signal_count(self, output: Tensor, target: Any) -> int:
        self.check_output(output)
        return math.prod(output.shape[1:])

    def exact_signals(self, output: Tensor, target: Any) -> LazySignals:
        self.check_output(output)
        self.check_batch_size(output, target)
        examples = output.shape[0]
        probs = torch.sigmoid(widened(output)).reshape(examples, -1)
        scale = (probs * (1.0 - probs)).sqrt()  # (n, U)
        units = scale.shape[1]

        def chunk(start: int, stop: int) -> Tensor:
            signals = scale.new_zeros(stop - start, examples, units)
            index = torch.arange(start, stop, device=output.device)
            signals[torch.arange(stop - start, device=output.device), :, index] = scale[:, index].T
            return signals.reshape(stop - start, *output.shape).to(output.dtype)

        return LazySignals(units, chunk, tuple(output.shape), output.dtype)

    def sample_signals(self, output: Tensor, target: Any, mc_samples: int) -> Tensor:
        self.check_output(output)
        probs = torch.sigmoid(widened(output))
        draws = torch.bernoulli(probs.expand(mc_samples, *probs.shape))
        return ((probs - draws) / math.sqrt(mc_samples)).to(output.dtype)

    def loss_grads(self, output: Tensor, target: Any) -> Tensor:
        self.check_output(output)
        self.check_batch_size(output, target)
        if not isinstance(target, Tensor) or target.shape != output.shape:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ConsolidationError(
                f"BCEWithLogitsLoss needs a target of the output's shape {tuple(output.shape)}; "
                f"got {shape}"
            )
        dtype = widened(output).dtype
        labels = target.to(dtype)
        probs = torch.sigmoid(output.to(dtype))
        if self.pos_weight is None:
            grads = probs - labels
        else:
            pos = self.pos_weight.to(device=output.device, dtype=dtype)
            grads = probs * (pos * labels + 1.0 - labels) - pos * labels
        if self.weight is not None:
            grads = grads * self.weight.to(device=output.device, dtype=dtype)
        return grads


for _key in (nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits):
    register_likelihood(_key, Bernoulli)
