"""Unit-variance Gaussian likelihood: ``nn.MSELoss`` / ``F.mse_loss``.

``p(y|x) = N(f(x), I)`` over all of an example's output components ``d``.

* exact: ``sum_d (grad f_d)^2`` through one unit signal per component (built lazily);
* sample: ``y - f = eps ~ N(0, I)``; one signal ``eps / sqrt(m)`` per draw;
* empirical: the criterion on a batch of one, in closed form: ``2 (f - y) / D`` for
  ``reduction='mean'`` (``D`` components per example), ``2 (f - y)`` for ``'sum'``/``'none'``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.errors import ConsolidationError
from ewc.likelihoods.registry import LazySignals, Likelihood, register_likelihood, widened

__all__ = ["Gaussian"]


class Gaussian(Likelihood):
    """``p(y|x) = N(f(x), I)``."""

    name = "gaussian"

    def __init__(self, criterion: Any) -> None:
        super().__init__(criterion)
        self.reduction = getattr(criterion, "reduction", "mean")

    def exact_signal_count(self, output: Tensor, target: Any) -> int:
        self.check_output(output)
        return math.prod(output.shape[1:])

    def exact_signals(self, output: Tensor, target: Any) -> LazySignals:
        self.check_output(output)
        self.check_batch_size(output, target)
        components = math.prod(output.shape[1:])
        examples = output.shape[0]

        def chunk(start: int, stop: int) -> Tensor:
            signals = output.new_zeros(stop - start, examples, components)
            rows = torch.arange(stop - start, device=output.device)
            signals[rows, :, torch.arange(start, stop, device=output.device)] = 1.0
            return signals.reshape(stop - start, *output.shape)

        return LazySignals(components, chunk, tuple(output.shape), output.dtype)

    def sample_signals(self, output: Tensor, target: Any, mc_samples: int) -> Tensor:
        self.check_output(output)
        noise = torch.randn(
            (mc_samples, *output.shape), dtype=widened(output).dtype, device=output.device
        )
        return (noise / math.sqrt(mc_samples)).to(output.dtype)

    def loss_grads(self, output: Tensor, target: Any) -> Tensor:
        self.check_output(output)
        self.check_batch_size(output, target)
        if not isinstance(target, Tensor) or target.shape != output.shape:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ConsolidationError(
                f"MSELoss needs a target of the output's shape {tuple(output.shape)}; got {shape}"
            )
        per_example = math.prod(output.shape[1:]) if self.reduction == "mean" else 1
        return 2.0 * (widened(output) - widened(target)) / per_example


for _key in (nn.MSELoss, F.mse_loss):
    register_likelihood(_key, Gaussian)
