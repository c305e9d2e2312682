"""Diagonal Fisher estimators at the model's current weights, as pure functions.

Every estimator returns *sums* and a count (examples, or batches for ``batched``) so that sums can
be all-reduced across processes before the one division (see :func:`fisher_from_sums`).

=============  ====================================================  ==============================
estimator      per-example term                                      cost per batch of n
=============  ====================================================  ==============================
``exact``      ``sum_c p(c|x) (grad log p(c|x))^2``                  C backward signals (classes)
``sample``     ``mean_m (grad log p(y_m|x))^2``, ``y_m ~ p(.|x)``    ``mc_samples`` signals
``empirical``  ``(grad loss(f(x), y))^2`` with the data's label      1 signal
``batched``    ``(grad criterion(batch))^2``, averaged over batches  1 ordinary backward
=============  ====================================================  ==============================

``exact`` and ``sample`` need a likelihood: categorical over the last output dimension
(``nn.CrossEntropyLoss``/``nn.NLLLoss``) or unit-variance Gaussian (``nn.MSELoss``). For outputs
with extra dimensions (sequences) the per-example log-likelihood sums over positions; the exact
Fisher then needs one signal per (position, class) pair.

``batched`` reproduces Avalanche's ``EWCPlugin.compute_importances``: it squares mini-batch
gradients, which is *not* the Fisher; it is here for comparison and compatibility.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc._per_sample import squared_grad_sums
from ewc._per_sample.batching import batch_size_of, first_examples
from ewc._per_sample.report import warn_fallbacks
from ewc._typing import Batch, Criterion, ForwardFn, TensorDict
from ewc.errors import ConsolidationError, UnsupportedCriterionError

__all__ = [
    "ESTIMATORS",
    "FisherSums",
    "default_forward",
    "fisher_from_sums",
    "fisher_sums",
    "likelihood_of",
]

ESTIMATORS = ("exact", "sample", "empirical", "batched")
EXACT_SIGNAL_WARNING_THRESHOLD = 100

_warned_signal_counts: set[int] = set()


@dataclass
class FisherSums:
    """Un-normalised Fisher of one data pass: ``fisher = sums / count``.

    Attributes:
        sums: per parameter, the sum of per-example (``batched``: per-batch) squared gradients.
        count: examples seen (``batched``: batches seen).
        examples: examples seen (equal to ``count`` except for ``batched``).
        batches: batches seen.
        paths: per parameter, the engine path that computed it.
    """

    sums: TensorDict
    count: int
    examples: int
    batches: int
    paths: dict[str, str] = field(default_factory=dict)


def default_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Any]:
    """``batch = (inputs, targets, *ignored)`` -> ``(model(inputs), targets)``.

    Extra items (Avalanche's task labels) are ignored. A bare tensor batch has no targets.
    """
    if isinstance(batch, Tensor):
        return model(batch), None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        target = batch[1] if len(batch) >= 2 else None
        return model(batch[0]), target
    raise TypeError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); pass "
        "`forward=lambda model, batch: (output, target)` to consolidate"
    )


def likelihood_of(criterion: Criterion) -> str | None:
    """``"categorical"``, ``"gaussian"``, or None when the criterion defines no likelihood."""
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) or criterion in (
        F.cross_entropy,
        F.nll_loss,
    ):
        return "categorical"
    if isinstance(criterion, nn.MSELoss) or criterion is F.mse_loss:
        return "gaussian"
    return None


def fisher_from_sums(sums: Mapping[str, Tensor], count: int) -> TensorDict:
    """The one division that turns (all-reduced) sums into the Fisher: ``sums / count``."""
    return {name: total / float(count) for name, total in sums.items()}


def fisher_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[Batch],
    criterion: Criterion,
    *,
    estimator: str,
    mc_samples: int = 1,
    max_samples: int | None = None,
    forward: ForwardFn | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> FisherSums:
    """Accumulate the chosen estimator's squared-gradient sums over ``batches``.

    The caller puts the model in eval mode and restores it; this function only reads weights and
    never touches ``.grad``. Raises :class:`ConsolidationError` on NaN/inf or no data, and
    :class:`UnsupportedCriterionError` when ``exact``/``sample`` meet an unknown criterion.

    Cost: ``exact`` C signals, ``sample`` ``mc_samples`` signals, ``empirical`` one signal per
    batch through the per-example engine; ``batched`` one ordinary backward per batch.
    """
    forward = forward or default_forward
    likelihood = likelihood_of(criterion)
    if estimator in ("exact", "sample") and likelihood is None:
        raise UnsupportedCriterionError(
            f"fisher={estimator!r} needs a likelihood, read from the criterion: "
            "nn.CrossEntropyLoss/nn.NLLLoss (categorical) or nn.MSELoss (Gaussian); got "
            f"criterion={criterion!r}. Use fisher='empirical' for any other criterion."
        )
    run_model = _checked(forward)
    make_signals = _signal_maker(estimator, likelihood, criterion, mc_samples)
    accumulated: TensorDict = {}  # the first batch's fresh sums become the accumulators
    count = examples = batch_count = 0
    paths: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for batch in _limited(batches, max_samples):
        batch_count += 1
        if estimator == "batched":
            sums = _batch_gradient_squares(model, params, batch, criterion, forward)
            count += 1
            seen = batch_size_of(batch) or 1
            paths = dict.fromkeys(params, "batch-gradient")
        else:
            result = squared_grad_sums(model, params, batch, run_model, make_signals)
            sums, seen = result.sums, result.examples
            paths.update(result.paths)
            reasons.update(result.reasons)
            del result
            count += seen
        examples += seen
        if accumulated:
            for name, total in accumulated.items():
                total.add_(sums[name])
        else:
            accumulated = dict(sums)
        del sums
        if on_batch is not None:
            on_batch(seen)
    if examples == 0:
        raise ConsolidationError("the dataloader yielded no examples; nothing to consolidate")
    for name, total in accumulated.items():
        # Entries are sums of squares (>= 0): their total is finite iff every entry is, and one
        # reduction is cheaper than an elementwise isfinite over P.
        if not torch.isfinite(total.sum()):
            raise ConsolidationError(
                f"the Fisher of parameter {name!r} is NaN or infinite (the loss or a gradient "
                "overflowed); the consolidated state is unchanged"
            )
    warn_fallbacks(paths, params, reasons)  # once per pass, naming what left the rules
    return FisherSums(accumulated, count, examples, batch_count, paths)


def _limited(batches: Iterable[Batch], max_samples: int | None) -> Iterator[Batch]:
    """The batches, cut so that at most ``max_samples`` examples are yielded in total."""
    try:
        yield from first_examples(batches, max_samples)
    except ValueError as error:
        raise ConsolidationError(f"max_samples={max_samples}: {error}") from error


def _checked(forward: ForwardFn) -> ForwardFn:
    def run_model(model: nn.Module, batch: Batch) -> tuple[Tensor, Any]:
        output, target = forward(model, batch)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"forward(model, batch) must return (output, target) with a tensor output; got "
                f"output of type {type(output).__name__}"
            )
        return output, target

    return run_model


def _batch_gradient_squares(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    criterion: Criterion,
    forward: ForwardFn,
) -> TensorDict:
    """``(d criterion(batch) / d theta)^2``: Avalanche's importance term for one mini-batch."""
    names = list(params)
    with torch.enable_grad():
        output, target = forward(model, batch)
        loss = criterion(output, target)
        _check_finite(loss, "loss")
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {
        name: (
            torch.zeros_like(
                params[name], dtype=torch.promote_types(params[name].dtype, torch.float32)
            )
            if grad is None
            else grad.to(torch.promote_types(grad.dtype, torch.float32)).pow(2)
        )
        for name, grad in zip(names, grads)
    }


def _check_finite(tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ConsolidationError(
            f"the {what} is NaN or infinite during consolidation; the consolidated state is "
            "unchanged"
        )


def _signal_maker(
    estimator: str, likelihood: str | None, criterion: Criterion, mc_samples: int
) -> Callable[[Tensor, Any], Tensor]:
    """Backward signals on the output whose squared per-example gradients give the estimator."""

    def make(output: Tensor, target: Any) -> Tensor:
        _check_finite(output, "model output")
        if estimator == "empirical":
            if target is None:
                raise ConsolidationError(
                    "fisher='empirical' needs targets: batches of (inputs, targets, ...) or a "
                    "`forward` returning (output, target)"
                )
            return per_example_loss_grads(criterion, output, target).unsqueeze(0)
        if likelihood == "categorical":
            if estimator == "exact":
                return categorical_exact_signals(output)
            return categorical_sample_signals(output, mc_samples)
        if estimator == "exact":
            return gaussian_exact_signals(output)
        return gaussian_sample_signals(output, mc_samples)

    return make


def _widened(tensor: Tensor) -> Tensor:
    """At least float32, so bfloat16 models get accurate probabilities and float64 keep theirs."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def categorical_exact_signals(logits: Tensor) -> Tensor:
    """Signals ``sqrt(p_c) (p - e_c)`` for every (position, class): ``(K, n, ..., C)``.

    Their squared per-example gradients sum to ``sum_c p_c (grad log p_c)^2`` per position.
    """
    probs = torch.softmax(_widened(logits), dim=-1)
    classes = probs.shape[-1]
    positions = math.prod(probs.shape[1:-1])
    _warn_signal_count(positions * classes)
    flat = probs.reshape(probs.shape[0], positions, classes)  # (n, S, C)
    eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
    # per class c: sqrt(p_c) * (p - e_c), at one position at a time
    per_class = flat.sqrt().unsqueeze(-1) * (flat.unsqueeze(-2) - eye)  # (n, S, c, C)
    if positions == 1:
        signals = per_class[:, 0].permute(1, 0, 2)  # (C, n, C)
        return signals.reshape(classes, *logits.shape).to(logits.dtype)
    signals = per_class.new_zeros(positions, classes, probs.shape[0], positions, classes)
    for s in range(positions):
        signals[s, :, :, s, :] = per_class[:, s].permute(1, 0, 2)
    return signals.reshape(positions * classes, *logits.shape).to(logits.dtype)


def categorical_sample_signals(logits: Tensor, mc_samples: int) -> Tensor:
    """Signals ``(p - e_y) / sqrt(m)``, ``y ~ Categorical(p)`` drawn per example and position."""
    probs = torch.softmax(_widened(logits), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, mc_samples, replacement=True)  # (n*S, m)
    onehot = F.one_hot(draws.T, probs.shape[-1]).to(probs.dtype)  # (m, n*S, C)
    signals = (flat.unsqueeze(0) - onehot) / math.sqrt(mc_samples)
    return signals.reshape(mc_samples, *logits.shape).to(logits.dtype)


def gaussian_exact_signals(output: Tensor) -> Tensor:
    """Unit vectors on each output component: ``sum_d (grad f_d)^2``, the unit-variance Fisher."""
    components = math.prod(output.shape[1:])
    _warn_signal_count(components)
    eye = torch.eye(components, dtype=output.dtype, device=output.device)
    signals = eye.unsqueeze(1).expand(components, output.shape[0], components)
    return signals.reshape(components, *output.shape)


def gaussian_sample_signals(output: Tensor, mc_samples: int) -> Tensor:
    """Signals ``eps / sqrt(m)`` with ``eps ~ N(0, I)``: ``y - f`` for ``y ~ N(f, I)``."""
    noise = torch.randn(
        (mc_samples, *output.shape), dtype=_widened(output).dtype, device=output.device
    )
    return (noise / math.sqrt(mc_samples)).to(output.dtype)


def per_example_loss_grads(criterion: Criterion, output: Tensor, target: Any) -> Tensor:
    """``d criterion(f(x_n)[None], y_n[None]) / d f(x_n)`` for every example: the criterion applied
    to a batch of one, so its reduction does not matter.

    Closed forms for the common criteria (see :func:`_closed_form_loss_grads`); otherwise
    ``vmap(grad(criterion))`` over examples, and a loop over examples if that fails."""
    closed = _closed_form_loss_grads(criterion, output, target)
    if closed is not None:
        _check_finite(closed, "per-example loss gradient")
        return closed.to(output.dtype)

    def loss_of_one(out: Tensor, tgt: Any) -> Tensor:
        return criterion(out.unsqueeze(0), tgt.unsqueeze(0) if isinstance(tgt, Tensor) else tgt)

    detached = output.detach()
    try:
        grads = torch.func.vmap(torch.func.grad(loss_of_one))(detached, target)
    except Exception:
        rows = []
        for n in range(detached.shape[0]):
            with torch.enable_grad():
                row = detached[n : n + 1].clone().requires_grad_(True)
                tgt = target[n : n + 1] if isinstance(target, Tensor) else target
                loss = criterion(row, tgt)
                (grad,) = torch.autograd.grad(loss, row)
            rows.append(grad)
        grads = torch.cat(rows)
    _check_finite(grads, "per-example loss gradient")
    return grads.to(output.dtype)


def _closed_form_loss_grads(criterion: Criterion, output: Tensor, target: Any) -> Tensor | None:
    """Per-example output gradients of the default-configured common criteria, or None.

    * cross-entropy on logits ``(n, C)`` with class indices: ``softmax(o) - e_y``;
    * NLL on log-probabilities ``(n, C)``: ``-e_y``;
    * MSE (``mean``/``sum``): ``2 (o - y) / d`` with ``d`` the elements per example (1 for sum).

    Class weights, label smoothing, ignored targets or other layouts return None (generic path).
    Cost: O(n C), against a ``vmap`` of the criterion's autograd.
    """
    if not isinstance(target, Tensor) or output.dim() < 1:
        return None
    rows = torch.arange(output.shape[0], device=output.device)
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) or criterion in (
        F.cross_entropy,
        F.nll_loss,
    ):
        if isinstance(criterion, nn.CrossEntropyLoss) and criterion.label_smoothing != 0.0:
            return None
        weight = getattr(criterion, "weight", None)
        ignore_index = getattr(criterion, "ignore_index", -100)
        if (
            weight is not None
            or output.dim() != 2
            or target.shape != output.shape[:1]
            or target.dtype not in (torch.int64, torch.int32)
            or bool((target == ignore_index).any())
        ):
            return None
        is_cross_entropy = (
            isinstance(criterion, nn.CrossEntropyLoss) or criterion is F.cross_entropy
        )
        widened = _widened(output)
        grads = torch.softmax(widened, dim=-1) if is_cross_entropy else torch.zeros_like(widened)
        grads[rows, target.long()] -= 1.0
        return grads
    if isinstance(criterion, nn.MSELoss) or criterion is F.mse_loss:
        reduction = getattr(criterion, "reduction", "mean")
        if reduction not in ("mean", "sum") or target.shape != output.shape:
            return None
        per_example = output[0].numel() if reduction == "mean" else 1
        return 2.0 * (_widened(output) - target) / per_example
    return None


def _warn_signal_count(count: int) -> None:
    if count > EXACT_SIGNAL_WARNING_THRESHOLD and count not in _warned_signal_counts:
        _warned_signal_counts.add(count)
        warnings.warn(
            f"fisher='exact' runs {count} backward signals per batch (one per class and output "
            "position), so consolidation costs about that many backward passes per batch; "
            "fisher='sample' (mc_samples signals) or max_samples=n is cheaper",
            stacklevel=4,
        )
