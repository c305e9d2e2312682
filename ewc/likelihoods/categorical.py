"""Categorical likelihood over the last output dimension: ``nn.CrossEntropyLoss``/``nn.NLLLoss``.

Outputs ``(n, *S, C)`` (logits; log-probabilities for NLL) with class-index targets ``(n, *S)``,
class dimension last as Hugging Face models emit it. Positions whose target equals the
criterion's ``ignore_index`` are left out of every estimator; an example's log-likelihood is the
sum over its other positions.

* exact: ``sum_s sum_c p_sc (grad log p_sc)^2``, the Fisher ``diag(p_s) - p_s p_s^T`` of the
  logits at position ``s`` factored into ``C - 1`` signals (its rank; see
  :meth:`Categorical.exact_signals`), zero elsewhere: ``S' * (C - 1)`` signals, ``S'`` the
  positions not ignored in every example of the batch. Built lazily, a chunk at a time.
* sample: ``y_s ~ Categorical(p_s)`` drawn per position; one signal ``(p - e_y) / sqrt(m)`` per
  draw for the whole example.
* empirical: per position ``(1 - eps) w_y (p - e_y) + (eps / C) sum_c w_c (p - e_c)`` (weights
  ``w``, label smoothing ``eps``; NLL: ``-w_y e_y``), zero at ignored positions, summed over the
  example's positions whatever the ``reduction`` (so that N counts examples for every estimator).
  Probability targets (same shape as the output) are honoured for cross-entropy.

Options: ``weight`` and ``label_smoothing`` are honoured by ``empirical``/``batched`` and refused
by ``exact``/``sample`` (they change the loss, not the model's predictive distribution).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.errors import ConsolidationError
from ewc.likelihoods.registry import LazySignals, Likelihood, register_likelihood, widened

__all__ = ["Categorical"]


class Categorical(Likelihood):
    """``p(y|x) = softmax(f(x))`` over the last dimension, per position."""

    name = "categorical"

    def __init__(self, criterion: Any) -> None:
        super().__init__(criterion)
        self.log_probs_input = isinstance(criterion, nn.NLLLoss) or criterion is F.nll_loss
        self.ignore_index = int(getattr(criterion, "ignore_index", -100))
        self.weight: Tensor | None = getattr(criterion, "weight", None)
        self.label_smoothing = float(getattr(criterion, "label_smoothing", 0.0))
        self.reduction = getattr(criterion, "reduction", "mean")

    def check_estimator(self, estimator: str) -> None:
        if estimator in ("exact", "sample"):
            why = (
                "it reweights the loss, not the model's predictive distribution; use "
                "fisher='empirical' or a criterion without it"
            )
            if self.weight is not None:
                self._refuse(estimator, "weight", self.weight, why)
            if self.label_smoothing != 0.0:
                self._refuse(estimator, "label_smoothing", self.label_smoothing, why)

    # -- helpers -----------------------------------------------------------------------------
    def _probs(self, output: Tensor) -> Tensor:
        return torch.softmax(widened(output), dim=-1)

    def _index_target(self, output: Tensor, target: Any) -> Tensor | None:
        """Class-index targets ``(n, *S)``, or None when the target is absent or of another kind."""
        self.check_batch_size(output, target)
        if (
            isinstance(target, Tensor)
            and not target.is_floating_point()
            and not target.is_complex()
            and target.shape == output.shape[:-1]
        ):
            return target
        return None

    def _mask(self, output: Tensor, target: Any) -> Tensor | None:
        """``(n, P)`` with 1 where the position counts; None when every position counts."""
        index = self._index_target(output, target)
        if index is None:
            return None
        return (index != self.ignore_index).reshape(output.shape[0], -1)

    def _valid_positions(self, output: Tensor, mask: Tensor | None) -> Tensor:
        positions = math.prod(output.shape[1:-1])
        if mask is None:
            return torch.arange(positions, device=output.device)
        return mask.any(dim=0).nonzero().flatten()

    # -- exact ---------------------------------------------------------------------------------
    def exact_signal_count(self, output: Tensor, target: Any) -> int:
        self.check_output(output, min_dim=2)
        positions = self._valid_positions(output, self._mask(output, target)).numel()
        return int(positions) * _signals_per_position(int(output.shape[-1]))

    def exact_signals(self, output: Tensor, target: Any) -> LazySignals:
        """``C - 1`` signals per position whose outer products sum to ``diag(p) - p p^T``.

        The Fisher of the logits at a position is ``H = diag(p) - p p^T``, of rank ``C - 1``
        (``H 1 = 0``). With ``u = sqrt(p)`` (a unit vector) ``H = D (I - u u^T) D``, ``D =
        diag(u)``, and the Householder reflection ``Q = I - v v^T / (1 + u_C)``, ``v = u + e_C``,
        maps ``e_C`` to ``-u``, so ``I - u u^T`` is the sum of ``Q_j Q_j^T`` over the other
        ``C - 1`` columns of ``Q``. The signals are ``l_j = u * Q_j`` (``j < C``): one backward
        fewer per position than the ``C`` signals ``sqrt(p_c) (p - e_c)`` with the same sum,
        and no cancellation (``1 + u_C >= 1``). Cost: ``O(n k C)`` per chunk of ``k`` signals.
        """
        self.check_output(output, min_dim=2)
        mask = self._mask(output, target)
        valid = self._valid_positions(output, mask)
        examples, classes = output.shape[0], output.shape[-1]
        per_position = _signals_per_position(classes)
        flat = self._probs(output).reshape(examples, -1, classes)  # (n, P, C)
        weight = None if mask is None else mask.to(flat.dtype)
        eye = torch.eye(classes, dtype=flat.dtype, device=flat.device)

        def chunk(start: int, stop: int) -> Tensor:
            ks = torch.arange(start, stop, device=flat.device)
            pos, column = valid[ks // per_position], ks % per_position
            root = flat[:, pos, :].sqrt()  # u: (n, k, C)
            if classes == 1:  # H = 0: one zero signal
                block = torch.zeros_like(root)
            else:
                last = root[..., -1:]  # u_C: (n, k, 1)
                reflector = root.clone()
                reflector[..., -1] += 1.0  # v = u + e_C
                coefficient = root.gather(-1, column.expand(examples, -1).unsqueeze(-1))
                householder = eye[column] - reflector * (coefficient / (1.0 + last))  # Q_j
                block = root * householder
            if weight is not None:
                block = block * weight[:, pos].unsqueeze(-1)
            signals = flat.new_zeros(stop - start, *flat.shape)  # (k, n, P, C)
            signals[torch.arange(stop - start, device=flat.device), :, pos, :] = block.transpose(
                0, 1
            )
            return signals.reshape(stop - start, *output.shape).to(output.dtype)

        count = int(valid.numel()) * per_position
        return LazySignals(count, chunk, tuple(output.shape), output.dtype)

    # -- sample --------------------------------------------------------------------------------
    def sample_signals(self, output: Tensor, target: Any, mc_samples: int) -> Tensor:
        self.check_output(output, min_dim=2)
        mask = self._mask(output, target)
        probs = self._probs(output)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat, mc_samples, replacement=True)  # (n*P, m)
        onehot = F.one_hot(draws.T, probs.shape[-1]).to(probs.dtype)  # (m, n*P, C)
        signals = (flat.unsqueeze(0) - onehot) / math.sqrt(mc_samples)
        if mask is not None:
            signals = signals * mask.reshape(1, -1, 1).to(signals.dtype)
        return signals.reshape(mc_samples, *output.shape).to(output.dtype)

    # -- empirical -----------------------------------------------------------------------------
    def loss_grads(self, output: Tensor, target: Any) -> Tensor:
        self.check_output(output, min_dim=2)
        self.check_batch_size(output, target)
        classes = output.shape[-1]
        if isinstance(target, Tensor) and target.is_floating_point():
            if target.shape != output.shape or self.log_probs_input:
                raise ConsolidationError(
                    f"{_criterion_name(self.criterion)} got a floating-point target of shape "
                    f"{tuple(target.shape)} for an output of shape {tuple(output.shape)}: expected "
                    f"class indices of shape {tuple(output.shape[:-1])}"
                    + ("" if self.log_probs_input else " or class probabilities of the output's")
                )
            return self._probability_target_grads(output, target)
        index = self._index_target(output, target)
        if index is None:
            raise ConsolidationError(
                f"{_criterion_name(self.criterion)} needs class-index targets of shape "
                f"{tuple(output.shape[:-1])} for an output of shape {tuple(output.shape)} "
                f"(classes along the last dim); got target "
                + (
                    f"of shape {tuple(target.shape)}"
                    if isinstance(target, Tensor)
                    else f"{type(target).__name__}"
                )
            )
        keep = index != self.ignore_index
        labels = index.long()
        bad = keep & ((labels < 0) | (labels >= classes))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ConsolidationError(
                f"target (label) {value} is out of range for {classes} classes (valid: 0 to "
                f"{classes - 1}, or ignore_index={self.ignore_index})"
            )
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        onehot = F.one_hot(safe, classes).to(widened(output).dtype)
        weight = self._weight(output)
        w_y = (weight[safe] if weight is not None else torch.ones_like(onehot[..., 0])) * keep.to(
            onehot.dtype
        )
        if self.log_probs_input:
            grads = -w_y.unsqueeze(-1) * onehot
        else:
            eps = self.label_smoothing
            probs = self._probs(output)
            kept = keep.to(probs.dtype)
            w: Tensor | float = weight if weight is not None else 1.0
            total_w: Tensor | float = weight.sum() if weight is not None else float(classes)
            scale = (1.0 - eps) * w_y + (eps / classes) * total_w * kept
            smooth = (eps / classes) * kept.unsqueeze(-1) * w
            grads = probs * scale.unsqueeze(-1) - (1.0 - eps) * w_y.unsqueeze(-1) * onehot - smooth
        return grads

    def _weight(self, output: Tensor) -> Tensor | None:
        if self.weight is None:
            return None
        return self.weight.to(device=output.device, dtype=widened(output).dtype)

    def _probability_target_grads(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy on class probabilities: ``p * sum_c w_c t'_c - w t'``."""
        classes = output.shape[-1]
        soft = widened(target).to(widened(output).dtype)
        soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        weight = self._weight(output)
        weighted = soft if weight is None else soft * weight
        return self._probs(output) * weighted.sum(-1, keepdim=True) - weighted

    # -- batched -------------------------------------------------------------------------------
    def batch_loss(self, output: Tensor, target: Any) -> Tensor:
        """The criterion on the batch; token-level ``(n, *S, C)`` outputs are flattened to
        ``(n * S, C)`` (class dim last, as Hugging Face computes its loss)."""
        if output.dim() > 2 and isinstance(target, Tensor):
            classes = output.shape[-1]
            if target.shape == output.shape[:-1]:
                return self.criterion(output.reshape(-1, classes), target.reshape(-1))
            if target.shape == output.shape and target.is_floating_point():
                return self.criterion(output.reshape(-1, classes), target.reshape(-1, classes))
        return self.criterion(output, target)


def _signals_per_position(classes: int) -> int:
    """``C - 1`` exact signals per position (the rank of ``diag(p) - p p^T``), one for ``C = 1``."""
    return max(1, classes - 1)


def _criterion_name(criterion: Any) -> str:
    if isinstance(criterion, nn.Module):
        return type(criterion).__name__
    return getattr(criterion, "__name__", repr(criterion))


for _key in (nn.CrossEntropyLoss, nn.NLLLoss, F.cross_entropy, F.nll_loss):
    register_likelihood(_key, Categorical)
