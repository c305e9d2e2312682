"""Diagonal Fisher estimators at the model's current weights, as pure functions.

Every estimator returns *sums* and a count (examples, or batches for ``batched``) so that sums can
be all-reduced across processes before the one division (see :func:`fisher_from_sums`).

=============  ====================================================  ==============================
estimator      per-example term                                      cost per batch of n
=============  ====================================================  ==============================
``exact``      ``sum_c p(c|x) (grad log p(c|x))^2``                  K backward signals (below)
``sample``     ``mean_m (grad log p(y_m|x))^2``, ``y_m ~ p(.|x)``    ``mc_samples`` signals
``empirical``  ``(grad loss(f(x), y))^2`` with the data's label      1 signal
``batched``    ``(grad criterion(batch))^2``, averaged over batches  1 ordinary backward
=============  ====================================================  ==============================

``exact`` and ``sample`` need a likelihood, read from the criterion through the registry in
:mod:`ewc.likelihoods`: categorical over the last output dimension (``nn.CrossEntropyLoss``,
``nn.NLLLoss``; K = positions x classes), Bernoulli per output unit (``nn.BCEWithLogitsLoss``;
K = units) or unit-variance Gaussian (``nn.MSELoss``; K = output components). ``empirical``
takes its closed-form per-example loss gradient from the same registry (any other criterion:
``vmap(grad(criterion))`` over examples).

**Token-level outputs and N.** Outputs ``(n, *S, C)`` with targets ``(n, *S)`` take the class
dimension last, as Hugging Face models emit them. Positions whose target equals the criterion's
``ignore_index`` (``-100`` by default) are left out by every estimator. N, the count the sums are
divided by, is the number of *examples* (sequences), not of tokens: an example's log-likelihood
(``exact``, ``sample``) and its loss (``empirical``) are the sums over its positions that are not
ignored, whatever the criterion's ``reduction``. ``batched`` keeps Avalanche parity: the criterion
on the batch as given (token-level outputs flattened to ``(n * S, C)``, as Hugging Face computes
its loss), and N the number of batches.

**Memory.** ``exact`` signals are generated lazily, a chunk at a time, so that one chunk of
signals is at most :data:`~ewc._per_sample.engine.DEFAULT_MEMORY_BUDGET_BYTES` (at least one
signal); with vocabulary-sized outputs over many positions K is refused before any backward pass
when above :data:`MAX_EXACT_SIGNALS` (use ``fisher='sample'``: one signal per draw for a whole
sequence).

``batched`` reproduces Avalanche's ``EWCPlugin.compute_importances``: it squares mini-batch
gradients, which is *not* the Fisher; it is here for comparison and compatibility.

Errors: bad data, outputs or criteria are reported as :class:`~ewc.errors.ConsolidationError` or
:class:`~ewc.errors.UnsupportedCriterionError` naming the argument and the value; an exception
raised by the data pipeline, the model or the criterion propagates unchanged (the caller,
:meth:`ewc.EWC.consolidate`, wraps it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ewc import huggingface
from ewc._per_sample import squared_grad_sums
from ewc._per_sample.batching import UncuttableBatchError, batch_size_of, first_examples
from ewc._per_sample.engine import DEFAULT_MEMORY_BUDGET_BYTES, SquaredGradSums
from ewc._per_sample.report import warn_fallbacks
from ewc._per_sample.workspace import Workspace
from ewc._typing import Batch, Criterion, ForwardFn, TensorDict, present
from ewc.errors import ConsolidationError, UnsupportedCriterionError
from ewc.likelihoods import LazySignals, Likelihood, likelihood_for, registered_criteria

__all__ = [
    "ESTIMATORS",
    "EXACT_SIGNAL_WARNING_THRESHOLD",
    "MAX_EXACT_SIGNALS",
    "FisherSums",
    "check_estimator",
    "default_forward",
    "fisher_from_sums",
    "fisher_sums",
    "likelihood_of",
    "per_example_loss_grads",
]

ESTIMATORS = ("exact", "sample", "empirical", "batched")
EXACT_SIGNAL_WARNING_THRESHOLD = 100
"""``exact`` warns (once per count) when a batch needs more backward signals than this."""

MAX_EXACT_SIGNALS = 10_000
"""``exact`` refuses, before any backward pass, a batch that needs more signals than this (each
costs about one backward pass): e.g. a 1000-token vocabulary over 20 positions. Raise it on
purpose (``ewc.fisher.MAX_EXACT_SIGNALS = ...``) if you really want that cost."""

_warned_signal_counts: set[int] = set()


@dataclass
class FisherSums:
    """Un-normalised Fisher of one data pass: ``fisher = sums / count``.

    Attributes:
        sums: per parameter, the sum of per-example (``batched``: per-batch) squared gradients.
        count: examples seen (``batched``: batches seen).
        examples: examples seen (equal to ``count`` except for ``batched``).
        batches: batches seen (empty batches are skipped and not counted).
        paths: per parameter, the engine path that computed it.
    """

    sums: TensorDict
    count: int
    examples: int
    batches: int
    paths: dict[str, str] = field(default_factory=dict)


def check_estimator(value: Any, argument: str = "fisher") -> str:
    """``value`` if it names an estimator in :data:`ESTIMATORS`.

    Raises:
        ValueError: naming ``argument``, the value and the valid names.
    """
    if not isinstance(value, str) or value not in ESTIMATORS:
        raise ValueError(
            f"Expected argument `{argument}` to be one of {ESTIMATORS} but got {value!r}"
        )
    return value


def default_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Any]:
    """The forward used when none is given.

    * ``Mapping`` batches (``dict``, Hugging Face ``BatchEncoding``):
      :func:`ewc.huggingface.forward`, ``model(**inputs)`` with the ``labels`` key as target
      (causal LMs shifted);
    * ``(inputs, targets, *ignored)``: ``(model(inputs), targets)``; extra items (Avalanche's task
      labels) are ignored;
    * a bare tensor: ``(model(batch), None)``.

    An output with ``.logits`` (a Hugging Face ``ModelOutput``) is replaced by its logits, aligned
    with the targets as in :func:`ewc.huggingface.aligned`.

    Raises:
        ConsolidationError: the batch is none of these.
    """
    if isinstance(batch, Mapping):
        return huggingface.forward(model, batch)
    if isinstance(batch, Tensor):
        return _logits(model, model(batch), None, batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        target = batch[1] if len(batch) >= 2 else None
        return _logits(model, model(batch[0]), target, batch)
    raise ConsolidationError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); pass "
        "`forward=lambda model, batch: (output, target)` to consolidate"
    )


def _logits(model: nn.Module, output: Any, target: Any, batch: Any) -> tuple[Any, Any]:
    if isinstance(output, Tensor):
        return output, target
    logits = huggingface.logits_of(output)
    if logits is output:
        return output, target
    return huggingface.aligned(model, logits, target, batch)


def likelihood_of(criterion: Criterion) -> str | None:
    """The name of the criterion's likelihood (``"categorical"``, ``"gaussian"``,
    ``"bernoulli"``, ...), or None when the criterion defines none. See :mod:`ewc.likelihoods`."""
    likelihood = likelihood_for(criterion)
    return None if likelihood is None else likelihood.name


def fisher_from_sums(sums: Mapping[str, Tensor], count: int) -> TensorDict:
    """The one division that turns (all-reduced) sums into the Fisher: ``sums / count``."""
    return {name: total / float(count) for name, total in sums.items()}


def fisher_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[Batch],
    criterion: Criterion | None = None,
    *,
    estimator: str,
    mc_samples: int = 1,
    max_samples: int | None = None,
    forward: ForwardFn | None = None,
    on_batch: Callable[[int], None] | None = None,
    logits_reversal: bool = False,
) -> FisherSums:
    """Accumulate the chosen estimator's squared-gradient sums over ``batches``.

    The caller puts the model in eval mode and restores it; this function only reads weights and
    never touches ``.grad``. Batches of size 0 are skipped.

    Args:
        model: the model, in eval mode.
        params: the parameters to estimate, by name.
        batches: any iterable of batches (see :func:`default_forward`).
        criterion: the task loss; None takes :func:`ewc.huggingface.default_criterion` for a
            Hugging Face model.
        estimator: one of :data:`ESTIMATORS`.
        mc_samples: label draws per example for ``sample``.
        max_samples: use only the first ``max_samples`` examples.
        forward: ``forward(model, batch) -> (output, target)``; default :func:`default_forward`.
        on_batch: called with the examples of each batch processed.
        logits_reversal: EWC-DR (Liu & Chang, CVPR 2026): the importance from the loss on the
            negated output, ``loss(-f(x), y)``; ``empirical`` and ``batched`` only.

    Raises:
        ValueError: ``estimator`` is not one of :data:`ESTIMATORS`.
        UnsupportedCriterionError: ``criterion`` is None and cannot be derived, ``exact``/
            ``sample`` meet a criterion with no likelihood, or an option the estimator cannot
            honour (e.g. ``weight`` with ``exact``, ``reduction='none'`` with ``batched``).
        ConsolidationError: no data, NaN/inf, too many ``exact`` signals, an output without an
            autograd graph, bad targets or outputs.

    Cost: ``exact`` K signals, ``sample`` ``mc_samples`` signals, ``empirical`` one signal per
    batch through the per-example engine; ``batched`` one ordinary backward per batch.
    """
    estimator = check_estimator(estimator, "estimator")
    if not isinstance(logits_reversal, bool):
        raise TypeError(
            f"Expected argument `logits_reversal` to be a bool but got {logits_reversal!r}"
        )
    if logits_reversal and estimator in ("exact", "sample"):
        raise ValueError(
            f"Argument `logits_reversal`=True needs fisher='empirical' or 'batched' (the loss on "
            f"the reversed logits with the data's labels) but got fisher={estimator!r}"
        )
    if criterion is None:
        criterion = _default_criterion(model, estimator)
    likelihood = likelihood_for(criterion)
    if estimator in ("exact", "sample") and likelihood is None:
        raise UnsupportedCriterionError(
            f"fisher={estimator!r} needs a likelihood, read from the criterion: one of "
            f"{', '.join(registered_criteria())}; got criterion={criterion!r}. Use "
            "fisher='empirical' for any other criterion."
        )
    if likelihood is not None:
        likelihood.check_estimator(estimator)
    run_model = _checked(forward or default_forward, params)
    if logits_reversal:
        run_model = _reversed(run_model)
    make_signals = _signal_maker(estimator, likelihood, criterion, mc_samples)
    workspace = Workspace()  # the engine's large per-batch buffers, reused batch after batch
    accumulated: TensorDict = {}  # the first batch's fresh sums become the accumulators
    count = examples = batch_count = 0
    paths: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for raw in _limited(batches, max_samples):
        batch = _plain(raw)
        if batch_size_of(batch) == 0:
            continue
        if estimator == "batched":
            sums, seen = _batch_gradient_squares(
                model, params, batch, criterion, likelihood, run_model
            )
            count += 1
            paths = dict.fromkeys(params, "batch-gradient")
        else:
            result = _engine_pass(model, params, batch, run_model, make_signals, workspace)
            sums, seen = result.sums, result.examples
            paths.update(result.paths)
            reasons.update(result.reasons)
            del result
            count += seen
        if seen == 0:
            continue
        batch_count += 1
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


def _default_criterion(model: nn.Module, estimator: str) -> Criterion:
    criterion = huggingface.default_criterion(model)
    if criterion is None:
        raise UnsupportedCriterionError(
            f"Argument `criterion` is None and fisher={estimator!r} cannot derive one: the model "
            f"({type(model).__name__}) is not a Hugging Face model with a task; pass the task "
            "loss, e.g. criterion=nn.CrossEntropyLoss()"
        )
    return criterion


def _plain(batch: Batch) -> Batch:
    """A ``Mapping`` that is not a dict (``BatchEncoding``) as a dict: pytrees see its tensors."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return dict(batch)
    return batch


def _limited(batches: Iterable[Batch], max_samples: int | None) -> Iterator[Batch]:
    """The batches, cut so that at most ``max_samples`` examples are yielded in total.

    Only the cut itself is reported as a ``max_samples`` problem; whatever the loader raises
    propagates unchanged.
    """
    try:
        yield from first_examples(batches, max_samples)
    except UncuttableBatchError as error:
        raise ConsolidationError(f"max_samples={max_samples}: {error}") from error


def _checked(forward: ForwardFn, params: Mapping[str, Tensor]) -> ForwardFn:
    """``forward`` with its result checked: a pair, a floating-point output with examples along
    dim 0 carrying the autograd graph, and targets with one entry per example."""
    needs_graph = any(p.requires_grad for p in params.values())

    def run_model(model: nn.Module, batch: Batch) -> tuple[Tensor, Any]:
        if torch._C._are_functorch_transforms_active():  # inside the engine's vmap fallback
            return _pair(forward(model, batch))
        with torch.enable_grad():  # so that a graph-less output is caught, whoever called
            output, target = _pair(forward(model, batch))
        if output.dim() == 0:
            raise ConsolidationError(
                "forward(model, batch) returned a 0-d output (a scalar, e.g. a loss); the "
                "estimators need per-example outputs with examples along dim 0"
            )
        if not (output.is_floating_point() or output.is_complex()):
            raise ConsolidationError(
                f"forward(model, batch) returned an output of dtype {output.dtype}; the Fisher "
                "needs a floating-point output carrying the autograd graph"
            )
        if needs_graph and not output.requires_grad:
            raise ConsolidationError(
                "forward(model, batch) returned an output without an autograd graph "
                "(requires_grad=False): was it computed under torch.no_grad() or .detach()ed, or "
                "does no parameter being estimated reach it? Its Fisher would be silently zero"
            )
        if isinstance(target, Tensor) and target.dim() >= 1 and target.shape[0] != output.shape[0]:
            raise ConsolidationError(
                f"the target (labels) has {target.shape[0]} entries along dim 0 (shape "
                f"{tuple(target.shape)}) but the model output has {output.shape[0]} examples "
                f"(shape {tuple(output.shape)})"
            )
        return output, target

    return run_model


def _reversed(run_model: ForwardFn) -> ForwardFn:
    """``(-output, target)``: the negation is part of the model, so every engine path
    differentiates ``loss(-f(x), y)``."""

    def run_reversed(model: nn.Module, batch: Batch) -> tuple[Tensor, Any]:
        output, target = run_model(model, batch)
        return -output, target

    return run_reversed


def _pair(result: Any) -> tuple[Tensor, Any]:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        what = (
            f"a {type(result).__name__} of length {len(result)}"
            if isinstance(result, (tuple, list))
            else f"a {type(result).__name__}"
        )
        raise ConsolidationError(
            f"forward(model, batch) must return a pair (output, target); got {what}"
        )
    output, target = result
    if not isinstance(output, Tensor):
        raise ConsolidationError(
            f"forward(model, batch) must return (output, target) with a tensor output; got "
            f"output of type {type(output).__name__}"
        )
    return output, target


def _engine_pass(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    run_model: ForwardFn,
    make_signals: Callable[[Tensor, Any], Tensor | LazySignals],
    workspace: Workspace,
) -> SquaredGradSums:
    """One batch through the engine; lazy signals are read by the engine in budget-sized chunks
    (:mod:`ewc._per_sample.signals`), its buffers come from the pass's ``workspace``."""
    return squared_grad_sums(
        model,
        params,
        batch,
        run_model,
        make_signals,
        memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,  # read at call time: a module setting
        workspace=workspace,
    )


def _batch_gradient_squares(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    criterion: Criterion,
    likelihood: Likelihood | None,
    run_model: ForwardFn,
) -> tuple[TensorDict, int]:
    """``(d criterion(batch) / d theta)^2``: Avalanche's importance term for one mini-batch."""
    names = list(params)
    with torch.enable_grad():
        output, target = run_model(model, batch)
        loss = (
            criterion(output, target)
            if likelihood is None
            else likelihood.batch_loss(output, target)
        )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            reduction = getattr(criterion, "reduction", None)
            raise UnsupportedCriterionError(
                f"fisher='batched' needs a scalar loss from the criterion but got {shape}"
                + (f" (criterion's `reduction`={reduction!r})" if reduction is not None else "")
                + "; use reduction='mean' or 'sum'"
            )
        _check_finite(loss, "loss")
        grads = torch.autograd.grad(loss.reshape(()), [params[n] for n in names], allow_unused=True)
    sums = {
        name: (
            torch.zeros_like(
                params[name], dtype=torch.promote_types(params[name].dtype, torch.float32)
            )
            if grad is None
            else grad.to(torch.promote_types(grad.dtype, torch.float32)).pow(2)
        )
        for name, grad in zip(names, grads)
    }
    return sums, int(output.shape[0])


def _check_finite(tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ConsolidationError(
            f"the {what} is NaN or infinite during consolidation; the consolidated state is "
            "unchanged"
        )


def _signal_maker(
    estimator: str, likelihood: Likelihood | None, criterion: Criterion, mc_samples: int
) -> Callable[[Tensor, Any], Tensor | LazySignals]:
    """Backward signals on the output whose squared per-example gradients give the estimator."""

    def make(output: Tensor, target: Any) -> Tensor | LazySignals:
        _check_finite(output, "model output")
        if estimator == "empirical":
            if target is None:
                raise ConsolidationError(
                    "fisher='empirical' needs targets: batches of (inputs, targets, ...) or a "
                    "`forward` returning (output, target)"
                )
            return per_example_loss_grads(criterion, output, target).unsqueeze(0)
        known = present(likelihood, "the likelihood checked by fisher_sums")
        if estimator == "exact":
            _check_signal_count(known.exact_signal_count(output, target), output)
            return known.exact_signals(output, target)
        return known.sample_signals(output, target, mc_samples)

    return make


def _check_signal_count(count: int, output: Tensor) -> None:
    """Refuse far too many ``exact`` signals before any backward pass; warn about many."""
    if count > MAX_EXACT_SIGNALS:
        raise ConsolidationError(
            f"fisher='exact' would run {count} backward signals per batch for a model output of "
            f"shape {tuple(output.shape)} (one per class but one, per output position), more "
            f"than ewc.fisher.MAX_EXACT_SIGNALS={MAX_EXACT_SIGNALS}; use fisher='sample' "
            "(mc_samples signals: one per draw for a whole sequence) or fisher='empirical'. "
            "max_samples=n bounds the examples used, not the signals per batch."
        )
    if count > EXACT_SIGNAL_WARNING_THRESHOLD and count not in _warned_signal_counts:
        _warned_signal_counts.add(count)
        warnings.warn(
            f"fisher='exact' runs {count} backward signals per batch (one per class but one, per "
            "output position), so consolidation costs about that many backward passes per batch; "
            "fisher='sample' (mc_samples signals) or max_samples=n is cheaper",
            stacklevel=5,
        )


def per_example_loss_grads(criterion: Criterion, output: Tensor, target: Any) -> Tensor:
    """``d loss(f(x_n), y_n) / d f(x_n)`` for every example.

    For a criterion with a registered likelihood (:mod:`ewc.likelihoods`) the closed form, O(n C):
    the example's loss is the sum over its positions not ignored (weights and label smoothing
    applied; see each likelihood). Otherwise the criterion applied to a batch of one,
    ``vmap(grad(criterion))`` over examples, and a loop over examples if that fails.
    """
    likelihood = likelihood_for(criterion)
    if likelihood is not None:
        grads = likelihood.loss_grads(output, target)
        _check_finite(grads, "per-example loss gradient")
        return grads.to(output.dtype)

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
